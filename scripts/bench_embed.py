"""Embedding throughput of `vclr index` on a folder of real-size JPEGs, against a plain open_clip loop.

    python scripts/bench_embed.py --images 2000 --model ViT-B-32 --batch 64 --workers 2

`--backends torch,onnx,onnx-int8` (the default on a CPU): `vclr index --backend torch`, `--backend onnx` and
`--backend onnx --int8` (its guard included; each export is made once before the timing and reported as export_s).
Reference, measured in the same run on the same files: open_clip's own `create_model_and_transforms` model and
`preprocess` in a torch DataLoader (same workers, same batch), then `encode_image` under no_grad (bf16 autocast on
CUDA, as vclr). vclr: the whole `build_index` (scan the folder, decode, embed, build and save the index) from an
open_clip model source. The weights are a random-init checkpoint of the model (speed does not depend on them, and
nothing is downloaded). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image, ImageDraw

import vclr.model.build  # noqa: F401  (vclr's configs registered with open_clip)
from vclr.data.cache import cache_dir
from vclr.export.backends import choose_towers, cpu_flags
from vclr.index.build import build_index
from vclr.model.source import OpenClipSource

BACKENDS = ("torch", "onnx", "onnx-int8")  # what runs the towers in `vclr index` (--backend, --int8)


def _write_jpeg(job: tuple) -> None:
    path, index, width, height = job
    rng = np.random.default_rng((0, index))
    y, x = np.mgrid[0:height, 0:width]
    base = (np.stack([x * rng.uniform(0.2, 0.5), y * rng.uniform(0.2, 0.5), (x + y) * 0.2], -1) % 256)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
        draw.ellipse([x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image.save(path, quality=90)


def make_jpegs(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """Photo-like JPEGs (smooth gradients, shapes and noise: realistic decode cost), made once (in parallel: a GPU
    run makes tens of thousands) and cached."""
    paths = [folder / f"{i // 500:03d}" / f"photo{i:06d}.jpg" for i in range(count)]
    jobs = [(path, i, width, height) for i, path in enumerate(paths) if not path.is_file()]
    for parent in {path.parent for path, *_ in jobs}:
        parent.mkdir(parents=True, exist_ok=True)
    if jobs:
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write_jpeg, jobs, chunksize=64))
    return paths


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.preprocess(Image.open(self.paths[i]))


def open_clip_loop(model_name: str, checkpoint: Path, paths: list[Path], batch: int, workers: int,
                   device: torch.device) -> float:
    """images/s of the plain open_clip loop (model creation not timed)."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    model = model.to(device).eval()
    loader = torch.utils.data.DataLoader(_Files(paths, preprocess), batch_size=batch, num_workers=workers)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        for images in loader:
            model.encode_image(images.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def git_commit() -> str:
    """The checkout's short commit, for a result line (the benchmarks import it from here). A copy without git (a lent
    GPU machine) is told it in VCLR_COMMIT."""
    if os.environ.get("VCLR_COMMIT"):
        return os.environ["VCLR_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", default="500x375", help="JPEG width x height")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", help="JPEG folder (default: made once under the vclr cache)")
    parser.add_argument("--backends", default="", help=f"comma-separated, of {', '.join(BACKENDS)} (default: all "
                                                         "on a CPU, torch on CUDA); the first gives `ratio`")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    folder = Path(args.folder or cache_dir() / "bench" / f"jpegs-{args.images}-{args.size}")
    paths = make_jpegs(folder, args.images, width, height)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.backends.split(",") if args.backends else (["torch"] if device.type == "cuda" else list(BACKENDS))
    unknown = set(names) - set(BACKENDS)
    if unknown:
        parser.error(f"--backends: unknown {', '.join(sorted(unknown))} (known: {', '.join(BACKENDS)})")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        checkpoint = Path(tmp) / "random.pt"
        torch.save(open_clip.create_model(args.model).state_dict(), checkpoint)
        source = OpenClipSource(args.model, str(checkpoint))
        reference = open_clip_loop(args.model, checkpoint, paths, args.batch, args.workers, device)
        rates, export_s, chosen = {}, {}, {}
        for name in names:
            chooser = None
            if name != "torch":
                started = time.perf_counter()  # the export is made once and cached: not part of an index's time
                choose_towers(source, [str(p) for p in paths[:8]], backend="onnx", int8=name == "onnx-int8")
                export_s[name] = round(time.perf_counter() - started, 1)
                chooser = partial(choose_towers, source, backend="onnx", int8=name == "onnx-int8")
            started = time.perf_counter()
            update = build_index(source, str(folder), Path(tmp) / f"index-{name}", workers=args.workers,
                                 batch_size=args.batch, rebuild=True, towers=chooser)
            rates[name] = round(len(paths) / (time.perf_counter() - started), 2)
            choice = update.backend_choice
            chosen[name] = None if choice is None else {"backend": choice.backend, "precision": choice.precision,
                                                        "guard": choice.guard}
    first = names[0]
    print(json.dumps({"benchmark": "embed", "model": args.model, "images": len(paths), "size": args.size,
                      "batch": args.batch, "workers": args.workers, "device": str(device),
                      "torch_threads": torch.get_num_threads(), "cpu_flags": cpu_flags(), "indexed": update.added,
                      "open_clip_images_per_s": round(reference, 2), "vclr_index_images_per_s": rates[first],
                      "ratio": round(rates[first] / reference, 3),
                      "backends_images_per_s": rates, "backends_ratio": {k: round(v / reference, 3)
                                                                          for k, v in rates.items()},
                      "export_s": export_s, "embedded_with": chosen, "commit": git_commit()}))


if __name__ == "__main__":
    main()
