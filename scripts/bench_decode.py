"""Decoding throughput from JPEG files to a model's uint8 input: vclr's decoders against open_clip's preprocess.

    python scripts/bench_decode.py --sizes 500x375,4032x3024 --workers 2          # CPU
    python scripts/bench_decode.py --sizes 500x375 --workers 16 --count 2000      # GPU machine: nvJPEG too

For each JPEG size, images/s (wall clock, --workers processes, one thread each, as DataLoader workers run) of:
- `open_clip_preprocess`: the reference, open_clip's own eval transform on `Image.open(path)` (every pixel decoded);
- `vclr_draft_<f>`: vclr's `ImageDecoder` with data.jpeg_draft=f (f=0: every pixel; 2: vclr's default);
- on CUDA, `nvjpeg`: vclr's `decode_resize` (data.decode_on=device) on batches of --batch encoded files held in RAM.
Also, per draft setting, the mean absolute difference (of 255) of its uint8 input from open_clip's. Prints one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from bench_embed import git_commit, make_jpegs

from vclr.data.cache import cache_dir
from vclr.data.dataset import ImageDecoder, decode_transform, draft_size


def _open_clip_transform(size: int):
    import open_clip

    return open_clip.image_transform(size, is_train=False)


def _decode_share(job: tuple) -> int:
    """One worker's share of the files; returns how many decoded (the work is the point, not the pixels)."""
    kind, paths, size, jpeg_draft = job
    torch.set_num_threads(1)
    if kind == "open_clip":
        from PIL import Image

        transform = _open_clip_transform(size)
        return sum(transform(Image.open(path)).shape[0] == 3 for path in paths)
    decoder = ImageDecoder(decode_transform(size), draft_size(size, jpeg_draft))
    return sum(decoder(path) is not None for path in paths)


def rate(pool: ProcessPoolExecutor, workers: int, kind: str, paths: list[str], size: int, draft: float = 0.0) -> float:
    shares = [(kind, paths[i::workers], size, draft) for i in range(workers)]
    list(pool.map(_decode_share, [(kind, paths[:workers], size, draft)] * workers))  # warm: imports, page cache
    start = time.perf_counter()
    done = sum(pool.map(_decode_share, shares))
    return done / (time.perf_counter() - start)


def difference(paths: list[str], size: int, draft: float) -> float:
    """Mean |vclr - open_clip| of the uint8 model input, over up to 16 files."""
    from PIL import Image

    reference = _open_clip_transform(size)
    decoder = ImageDecoder(decode_transform(size), draft_size(size, draft))
    diffs = []
    for path in paths[:16]:
        ours = decoder(path).float()  # (3, S, S) uint8 -> float
        theirs = reference(Image.open(path))  # normalised float: undo to 0..255
        mean = torch.tensor(reference.transforms[-1].mean).view(3, 1, 1)
        std = torch.tensor(reference.transforms[-1].std).view(3, 1, 1)
        diffs.append(((theirs * std + mean) * 255 - ours).abs().mean().item())
    return float(np.mean(diffs))


def nvjpeg_rate(paths: list[str], size: int, batch: int) -> float:
    from vclr.data.device_decode import decode_resize

    encoded = [Path(p).read_bytes() for p in paths]
    device = torch.device("cuda")
    decode_resize(encoded[:batch], size, device)  # warm: nvJPEG handles, kernels
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(encoded), batch):
        decode_resize(encoded[i:i + batch], size, device)
    torch.cuda.synchronize()
    return len(encoded) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500x375,4032x3024", help="JPEG sizes, width x height, comma-separated")
    parser.add_argument("--count", type=int, default=400, help="files per size (a quarter of it above 4 Mpixels)")
    parser.add_argument("--image-size", type=int, default=224, help="the model's input side")
    parser.add_argument("--drafts", default="0,2,1,0.8", help="data.jpeg_draft settings to measure")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=256, help="nvJPEG batch (CUDA only)")
    args = parser.parse_args(argv)
    drafts = [float(d) for d in args.drafts.split(",")]
    results = {}
    with ProcessPoolExecutor(args.workers) as pool:
        for size_text in args.sizes.split(","):
            width, height = (int(v) for v in size_text.split("x"))
            count = args.count if width * height <= 4_000_000 else max(args.workers, args.count // 4)
            folder = cache_dir() / "bench" / f"jpegs-{count}-{size_text}"
            paths = [str(p) for p in make_jpegs(folder, count, width, height)]
            row = {"files": count, "open_clip_preprocess": round(rate(pool, args.workers, "open_clip", paths,
                                                                           args.image_size), 1)}
            for draft in drafts:
                row[f"vclr_draft_{draft:g}"] = round(rate(pool, args.workers, "vclr", paths, args.image_size, draft), 1)
                row[f"vclr_draft_{draft:g}_abs_diff"] = round(difference(paths, args.image_size, draft), 3)
            if torch.cuda.is_available():
                row["nvjpeg"] = round(nvjpeg_rate(paths, args.image_size, args.batch), 1)
            results[size_text] = row
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"benchmark": "decode", "image_size": args.image_size, "workers": args.workers,
                      "device": device, "images_per_s": results, "commit": git_commit()}))


if __name__ == "__main__":
    main()
