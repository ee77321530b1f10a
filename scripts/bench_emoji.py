"""Emoji image-text benchmark: train on OpenMoji train concepts, score retrieval on held-out concepts.

    pip install -e '.[lit]' && python scripts/prepare_lit_towers.py --out weights
    python scripts/bench_emoji.py --minutes 5 --variants a,b,c      # one JSON line per variant

Variants, each given the same wall-time budget on this machine:
  a  both towers from scratch (vclr-tiny-rn)
  b  pretrained EfficientNet-Lite0 + MiniLM, both locked; only projections and temperature train (LiT)
  c  the same pretrained towers, fine-tuned end to end
The step count of each variant is sized from a short timing run, so every learning-rate schedule completes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from vclr.config import load_config
from vclr.data.prepare import cache_dir, prepare_openmoji
from vclr.evaluate import evaluate_run
from vclr.train import train

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "a": ("configs/openmoji_scratch.yaml", []),
    "b": ("configs/lit_frozen_minilm_effl0.yaml", ["model.name=vclr-lit-effl0-minilm-128"]),
    "c": ("configs/lit_finetune_minilm_effl0.yaml", ["model.name=vclr-lit-effl0-minilm-128"]),
}


def overrides_for(variant: str, data: Path, weights: Path, out: Path) -> tuple[Path, list[str]]:
    config, extra = VARIANTS[variant]
    common = [f"data.train={data / 'train'}", f"data.test={data / 'test'}", f"train.output_dir={out}",
              "train.checkpoint_every=100000", "train.log_every=10", "data.batch_size=128"]
    if variant != "a":
        common += [f"model.text_tower_dir={weights / 'all-MiniLM-L6-v2'}",
                   f"model.image_tower_weights={weights / 'efficientnet_lite0_timm.pt'}"]
    return ROOT / config, common + extra


def seconds_per_step(config: Path, overrides: list[str], tmp: Path) -> float:
    """Time a short run (after its first steps) to size the real one."""
    run = tmp / "timing"
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(config, overrides + [f"train.output_dir={run}", "optim.max_steps=12", "optim.warmup_steps=1",
                                           "train.log_every=1"])
    train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return (rows[-1]["elapsed_s"] - rows[1]["elapsed_s"]) / (rows[-1]["step"] - rows[1]["step"])


def run_variant(variant: str, data: Path, weights: Path, minutes: float, tmp: Path) -> dict:
    config, overrides = overrides_for(variant, data, weights, tmp / f"run_{variant}")
    steps = max(20, int(minutes * 60 / seconds_per_step(config, overrides, tmp)))
    cfg = load_config(config, overrides + [f"optim.max_steps={steps}", f"optim.warmup_steps={max(1, steps // 20)}",
                                           f"train.max_minutes={minutes * 1.1}"])
    start = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - start
    metrics = evaluate_run(result.run_dir, str(data / "test"))["metrics"]
    return {"bench": "emoji", "variant": variant, "model": cfg.model.name, "locked": cfg.model.lock_image,
            "steps": result.step, "train_s": round(train_s, 1), "minutes_budget": minutes,
            **{k: round(v, 2) for k, v in metrics.items() if "_R@" in k or k in ("rsum", "num_images", "num_texts")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="prepared openmoji dir (default: prepare it into the cache)")
    parser.add_argument("--weights", default=str(ROOT / "weights"), help="scripts/prepare_lit_towers.py output")
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall time per variant")
    parser.add_argument("--variants", default="a,b,c")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data) if args.data else cache_dir() / "bench" / "openmoji-128"
    if not (data / "test" / "metadata.jsonl").is_file():
        prepare_openmoji(data, size=128)
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            print(json.dumps(run_variant(variant.strip(), data, Path(args.weights), args.minutes, Path(tmp))),
                  flush=True)


if __name__ == "__main__":
    main()
