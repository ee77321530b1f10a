"""Demo training throughput vs a bare open_clip step on the same model and batch, measured in the same run.

    .venv/bin/python scripts/bench_demo.py --steps 60            # prints one JSON line

vclr: the full `vclr.train.loop` loop on the synthetic demo data (data loading, tokens, Accelerate, InfoNCE + triplet,
clipping, schedule). Reference: open_clip's CLIP + open_clip's ClipLoss + AdamW on pre-made tensors (no data
pipeline at all), i.e. the ceiling for this model on this device. The ratio shows what the pipeline costs.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import open_clip
import torch

from vclr.config import BUILTIN_CONFIGS, load_config
from vclr.data.synthetic import make_synthetic
from vclr.model.build import build_model, image_preprocess_cfg
from vclr.train.loop import train

CONFIG = BUILTIN_CONFIGS / "demo.yaml"


def reference_samples_per_s(model_name: str, batch: int, steps: int, device: torch.device) -> float:
    from vclr.config import ModelConfig

    dual = build_model(ModelConfig(name=model_name))
    size = image_preprocess_cfg(dual)["size"]
    model = dual.clip.to(device).train()
    context = open_clip.get_model_config(model_name)["text_cfg"]["context_length"]
    images = torch.randn(batch, 3, size, size, device=device)
    tokens = torch.randint(1, 49000, (batch, context), device=device)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"].exp())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data", help="existing synthetic dataset (default: generate --images images in a temp dir)")
    parser.add_argument("--images", type=int, default=4000, help="train images generated when --data is not given")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the demo config's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else make_synthetic(Path(tmp) / "data", args.images, 100)
        cfg = load_config(CONFIG, [f"data.train={data / 'train'}", f"data.test={data / 'test'}",
                                   f"train.output_dir={Path(tmp) / 'run'}", f"optim.max_steps={args.steps}",
                                   f"optim.warmup_steps={min(5, args.steps)}", "train.log_every=5",
                                   "train.max_minutes=0", f"train.checkpoint_every={args.steps}",
                                   *([f"data.batch_size={args.batch_size}"] if args.batch_size else [])])
        result = train(cfg)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    warm_up = min(10, args.steps // 2)  # the first steps are left out: allocator warm-up
    steady = [r["samples_per_s"] for r in rows if r["step"] > warm_up]
    vclr_rate = sum(steady) / len(steady)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref_rate = reference_samples_per_s(cfg.model.name, cfg.data.batch_size, max(5, args.steps // 4), device)
    print(json.dumps({
        "bench": "demo_train", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "model": cfg.model.name, "batch": cfg.data.batch_size,
        "steps": result.step, "vclr_samples_per_s": round(vclr_rate, 1),
        "open_clip_step_samples_per_s": round(ref_rate, 1), "ratio_vclr_over_reference": round(vclr_rate / ref_rate, 3),
    }))


if __name__ == "__main__":
    main()
