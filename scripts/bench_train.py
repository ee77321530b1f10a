"""Training throughput end to end from JPEG files: vclr against `python -m open_clip_train.main`, same data, same run.

    pip install -e '.[bench]'        # open_clip_train needs webdataset + braceexpand
    python scripts/bench_train.py --model ViT-B-32 --batch 256 --num-images 40000 --workers 12   # GPU
    python scripts/bench_train.py --model ViT-B-32 --batch 16 --num-images 320 --steps 8 --workers 2   # CPU smoke

Writes photo-sized JPEGs (500x375, textured scenes with captions) once into --data-dir, then trains each system on
them for the same number of steps at the same batch size and precision, and prints one JSON line:
samples/s of each (steady state: the first --warmup-steps are excluded, so compilation and cuDNN autotuning do not
count), their ratio, FLOPs per sample (counted with torch's FlopCounterMode on one training step) and MFU against
the GPU's dense bf16 peak. vclr runs with its fast GPU path: batched nvJPEG decoding (data.decode_on=device), bf16,
TF32, fused AdamW and, with --compile, torch.compile. The levers: --decode-on loader --jpeg-draft F (PIL in the
workers at reduced DCT scale), --patch-dropout P (FLIP, in both systems), --profile-steps N (where vclr's step time
goes: OUT/vclr/profile/ holds the timeline, an operator table and the device's busy share).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vclr.config import DataConfig

COLORS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (230, 210, 40),
          "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
# dense bf16 tensor-core peaks (no sparsity), TFLOP/s
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


# ------------------------------------------------------------------------------------------------------------ data


def _photo(index: int, width: int, height: int, seed: int) -> tuple[Image.Image, str]:
    """A textured scene (smooth background, 1-3 shapes, sensor-like noise) and its caption; JPEGs near photo size."""
    rng = np.random.default_rng((seed, index))
    low = rng.uniform(0, 255, (3, 4, 3)).astype(np.float32)  # coarse colour field, upsampled below
    background = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((width, height), Image.BICUBIC), np.float32)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        size = int(rng.integers(height // 6, height // 2))
        x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        box = (x, y, x + size, y + size)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x, y + size), (x + size // 2, y), (x + size, y + size)], fill=COLORS[color])
        parts.append(f"a {color} {shape}")
    pixels = np.asarray(image, np.float32) + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), "a photo of " + " and ".join(parts)


def _write_photo(job: tuple) -> tuple[str, str]:
    index, folder, width, height, seed = job
    image, caption = _photo(index, width, height, seed)
    name = f"images/{index:07d}.jpg"
    image.save(Path(folder) / name, quality=90)
    return name, caption


def make_photo_dataset(folder: Path, count: int, width: int, height: int, seed: int = 0) -> Path:
    """`count` JPEGs + metadata.jsonl (vclr) + train.tsv (open_clip_train's csv loader). Reused when present."""
    done = folder / "train.tsv"
    if done.is_file() and sum(1 for _ in done.open()) - 1 == count:
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(i, str(folder), width, height, seed) for i in range(count)]
    with ProcessPoolExecutor() as pool:
        rows = list(pool.map(_write_photo, jobs, chunksize=64))
    with open(folder / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps({"file_name": name, "captions": [caption]}) + "\n" for name, caption in rows)
    with open(folder / ".train.tsv.tmp", "w") as f:
        f.write("filepath\ttitle\n")
        f.writelines(f"{folder.resolve() / name}\t{caption}\n" for name, caption in rows)
    os.replace(folder / ".train.tsv.tmp", done)
    return folder


# -------------------------------------------------------------------------------------------------------- systems


def steady_rate(rows: list[dict], batch: int, warmup_steps: int) -> float:
    """Samples/s between the first logged step after warmup and the last step, from metrics.jsonl rows."""
    start = next(r for r in rows if r["step"] >= warmup_steps)
    end = rows[-1]
    return (end["step"] - start["step"]) * batch / (end["elapsed_s"] - start["elapsed_s"])


def run_vclr(args, data: Path, out: Path) -> dict:
    from vclr.config import load_config
    from vclr.train.loop import train

    run = out / "vclr"
    steps = args.warmup_steps + args.steps
    overrides = [f"model.name={args.model}", f"data.train={data}", f"data.batch_size={args.batch}",
                 f"data.num_workers={args.workers}", f"data.decode_on={args.decode_on}", "data.cache_images=false",
                 f"data.jpeg_draft={args.jpeg_draft}", f"model.patch_dropout={args.patch_dropout}",
                 f"train.profile_steps={args.profile_steps}",
                 f"optim.max_steps={steps}", f"optim.warmup_steps={min(10, steps)}", "optim.lr=5e-4",
                 f"train.output_dir={run}", "train.log_every=1", f"train.checkpoint_every={steps + 1}",
                 f"train.mixed_precision={args.precision}", f"train.compile={str(args.compile).lower()}",
                 "train.max_minutes=0"]
    train(load_config(None, overrides))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    profile = run / "profile" / "summary.json"
    return {"samples_per_s": steady_rate(rows, args.batch, args.warmup_steps), "steps": rows[-1]["step"],
            "final_loss": rows[-1]["loss"], "profile": json.loads(profile.read_text()) if profile.is_file() else None}


BATCH_TIME = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/.*?Batch \(t\): ([0-9.]+)")


def run_open_clip_train(args, data: Path, out: Path) -> dict:
    """open_clip's own trainer on the same JPEGs (its csv loader, PIL decoding in --workers processes)."""
    precision = {"bf16": "amp_bf16", "fp16": "amp", "no": "fp32"}[args.precision]
    cmd = [sys.executable, "-m", "open_clip_train.main", "--train-data", str(data / "train.tsv"),
           "--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key", "title",
           "--model", args.model, "--batch-size", str(args.batch), "--precision", precision,
           "--workers", str(args.workers), "--epochs", "1", "--lr", "5e-4", "--wd", "0.1", "--warmup", "10",
           "--log-every-n-steps", str(args.log_every), "--report-to", "", "--logs", str(out / "open_clip_logs"),
           "--name", f"ref-{int(time.time())}", "--save-frequency", "0", "--seed", "0"]
    if args.compile:
        cmd.append("--torchcompile")
    if args.patch_dropout:
        cmd += ["--force-patch-dropout", str(args.patch_dropout)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"open_clip_train failed (exit {proc.returncode}):\n{log[-3000:]}")
    # each log line holds the average batch time (data wait included) since the previous line
    windows = [(int(n), float(t)) for n, t in BATCH_TIME.findall(log)]
    steady = [t for n, t in windows if n // args.batch > args.warmup_steps] or [t for _, t in windows[1:]]
    if not steady:
        raise SystemExit(f"open_clip_train logged no steady-state batch times; raise --num-images\n{log[-2000:]}")
    return {"samples_per_s": args.batch / (sum(steady) / len(steady)), "log_windows": len(steady),
            "steps": windows[-1][0] // args.batch}


# -------------------------------------------------------------------------------------------------------- figures


def flops_per_sample(model_name: str, patch_dropout: float = 0.0) -> float:
    """Forward + backward FLOPs of one training pair (patches dropped as in training), counted by torch on a batch of
    2 on the CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vclr.config import ModelConfig
    from vclr.model.build import build_model, get_tokenizer, image_preprocess_cfg

    cfg = ModelConfig(name=model_name, patch_dropout=patch_dropout)
    model = build_model(cfg)
    size = image_preprocess_cfg(model)["size"]
    images = torch.randn(2, 3, size, size)
    tokens = get_tokenizer(cfg)(["a photo of a red circle", "a blue square"])
    with FlopCounterMode(display=False) as counter:
        out = model(images, tokens)
        (out["image_features"] * out["text_features"]).sum().backward()
    return counter.get_total_flops() / 2


def peak_tflops(override: float) -> tuple[float | None, str]:
    import torch

    if override:
        return override, "given"
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" is listed before "H100"
        if all(part in name for part in key.split()):
            return value, name
    return None, name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--num-images", type=int, default=40000)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--steps", type=int, default=0, help="measured vclr steps (default: one epoch's worth)")
    parser.add_argument("--warmup-steps", type=int, default=20, help="excluded from both rates")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--precision", choices=["bf16", "fp16", "no"], default="")
    parser.add_argument("--compile", action="store_true", help="torch.compile in both systems")
    parser.add_argument("--log-every", type=int, default=10, help="open_clip_train's logging window (steps)")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "vclr-bench-photos"))
    parser.add_argument("--out-dir", default="")
    parser.add_argument("--no-reference", action="store_true", help="skip open_clip_train")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: a table)")
    parser.add_argument("--decode-on", choices=["device", "loader"], default="device",
                        help="vclr's decoding: batched nvJPEG on the device, or PIL in the loader's workers")
    parser.add_argument("--jpeg-draft", type=float, default=DataConfig.jpeg_draft,
                        help="data.jpeg_draft (--decode-on loader)")
    parser.add_argument("--patch-dropout", type=float, default=0.0, help="FLIP patch dropout in both systems")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="torch.profiler over this many vclr steps: trace and tables in OUT/vclr/profile/ "
                             "(profiling slows those steps: take speed figures from a run without it)")
    args = parser.parse_args(argv)

    import torch
    from bench_embed import git_commit

    args.precision = args.precision or ("bf16" if torch.cuda.is_available() else "no")
    epoch_steps = args.num_images // args.batch
    args.steps = args.steps or max(1, epoch_steps - args.warmup_steps)
    args.warmup_steps = min(args.warmup_steps, max(0, epoch_steps - 2))
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="vclr-bench-train-"))
    data = make_photo_dataset(Path(args.data_dir) / f"{args.num_images}x{args.width}x{args.height}",
                              args.num_images, args.width, args.height)

    vclr = run_vclr(args, data, out)
    reference = None if args.no_reference else run_open_clip_train(args, data, out)
    flops = flops_per_sample(args.model, args.patch_dropout)
    peak, device = peak_tflops(args.peak_tflops)
    mfu = None if peak is None else round(vclr["samples_per_s"] * flops / (peak * 1e12), 4)
    print(json.dumps({
        "bench": "train", "device": device, "model": args.model, "batch": args.batch, "precision": args.precision,
        "compile": args.compile, "images": args.num_images, "image_wh": [args.width, args.height],
        "workers": args.workers, "warmup_steps": args.warmup_steps, "decode_on": args.decode_on,
        "jpeg_draft": args.jpeg_draft if args.decode_on == "loader" else None, "patch_dropout": args.patch_dropout,
        "vclr_samples_per_s": round(vclr["samples_per_s"], 1), "vclr_steps": vclr["steps"],
        "open_clip_train_samples_per_s": None if reference is None else round(reference["samples_per_s"], 1),
        "ratio": None if reference is None else round(vclr["samples_per_s"] / reference["samples_per_s"], 3),
        "gflops_per_sample": round(flops / 1e9, 2), "peak_tflops": peak, "vclr_mfu": mfu,
        "open_clip_train_mfu": None if peak is None or reference is None
        else round(reference["samples_per_s"] * flops / (peak * 1e12), 4),
        "vclr_profile": vclr["profile"], "out_dir": str(out), "commit": git_commit(),
    }))


if __name__ == "__main__":
    main()
