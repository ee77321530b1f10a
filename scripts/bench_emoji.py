"""Emoji image-text benchmark: train on OpenMoji train concepts, score retrieval on held-out concepts.

    pip install -e '.[lit]' && python scripts/prepare_lit_towers.py --out weights
    python scripts/bench_emoji.py --minutes 4 --variants scratch,lit_uncached,lit     # one JSON line per variant
    python scripts/bench_emoji.py --variants lit --validation-only --set model.image_pool_levels=[3,4]  # choosing

Every variant gets the same wall-time budget (train.max_minutes: the schedule is fitted to it, so it completes).
Settings are chosen on a validation split carved from the train concepts (`fit` / `val`, by a hash of the concept,
never by image); the held-out test concepts are scored once per variant, at the end.

Variants (configs/ recipes):
  scratch        both towers from scratch (openmoji_scratch)
  lit_uncached   EfficientNet-Lite0 + MiniLM locked, run every step (lit_frozen, train.cache_locked_towers=false)
  lit            the same, with the locked towers' outputs computed once and cached (lit_frozen)
  siglip         lit with the sigmoid loss (siglip_lit)
  lit_partial    the top layer of each tower unlocked (lit_partial)
  finetune       both towers fine-tuned, lower tower LR and layer-wise decay (lit_finetune)
  lit_augment    lit with data.augment: the locked towers run every step on fresh augmentations (no cache)
  lit_views      lit with data.augment and train.cache_views=4: 4 seeded augmented views per image, cached
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import zlib
from pathlib import Path

from vclr.config import load_config
from vclr.data.cache import cache_dir
from vclr.data.prepare import prepare_openmoji
from vclr.eval.evaluate import evaluate_run
from vclr.model.source import RunSource
from vclr.rundir import read_best, read_metrics
from vclr.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
LIT: list[str] = []  # the recipes name their model (lit_frozen: 224 px, chosen on the validation split)
VARIANTS = {
    "scratch": ("openmoji_scratch", ["optim.max_steps=100000"]),
    "lit_uncached": ("lit_frozen_minilm_effl0", ["train.cache_locked_towers=false", "optim.max_steps=100000"]),
    "lit": ("lit_frozen_minilm_effl0", ["optim.max_steps=100000"]),
    "siglip": ("siglip_lit_minilm_effl0", ["optim.max_steps=100000"]),
    "lit_partial": ("lit_partial_minilm_effl0", ["optim.max_steps=100000"]),
    "finetune": ("lit_finetune_minilm_effl0", ["optim.max_steps=100000"]),
    # augmentation for the locked towers: drawn anew every step (so the towers run every step), or K seeded views
    # of each image computed once and cached (train.cache_views); the augmentation itself comes from --set
    "lit_augment": ("lit_frozen_minilm_effl0", ["data.augment=true", "optim.max_steps=100000"]),
    "lit_views": ("lit_frozen_minilm_effl0", ["data.augment=true", "train.cache_views=4", "optim.max_steps=100000"]),
}


def carve_validation(data: Path, fraction: float = 0.2) -> tuple[Path, Path]:
    """train -> fit + val by concept (a concept's images all land on one side); tables point at train's images."""
    rows = [json.loads(line) for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    splits: dict[str, list[str]] = {"fit": [], "val": []}
    for row in rows:
        side = "val" if zlib.crc32(row["concept"].encode()) % 100 < fraction * 100 else "fit"
        splits[side].append(json.dumps({**row, "file_name": f"../train/{row['file_name']}"}))
    for side, lines in splits.items():
        (data / side).mkdir(exist_ok=True)
        (data / side / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return data / "fit", data / "val"


def run_variant(variant: str, data: Path, weights: Path, minutes: float, tmp: Path, eval_every: int,
                settings: list[str], score_test: bool = True) -> dict:
    config, extra = VARIANTS[variant]
    fit, val = data / "fit", data / "val"
    overrides = [f"data.train={fit}", f"data.val={val}", f"data.test={data / 'test'}",
                 f"train.output_dir={tmp / variant}", f"train.max_minutes={minutes}", "train.checkpoint_every=100000",
                 "train.log_every=25", *extra] + ([f"train.eval_every={eval_every}"] if eval_every else [])
    if variant != "scratch":
        overrides += [*LIT, f"model.text_tower_dir={weights / 'all-MiniLM-L6-v2'}",
                      f"model.image_tower_weights={weights / 'efficientnet_lite0_timm.pt'}"]
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", overrides + settings)
    start = time.perf_counter()
    result = train(cfg)
    wall_s = time.perf_counter() - start
    rows = read_metrics(result.run_dir)
    validation = [r for r in rows if "val_rsum" in r]
    # the test concepts are scored once, at the end, with the checkpoint the validation split chose
    best = read_best(result.run_dir)
    source = RunSource(str(result.run_dir), "best" if best else "final")
    test = evaluate_run(source, str(data / "test"))["metrics"] if score_test else {}
    chosen = best["validation"] if best else (validation[-1] if validation else {})
    return {"bench": "emoji", "variant": variant, "config": config, "settings": settings, "steps": result.step,
            "train_s": round(result.elapsed_s, 1), "wall_s": round(wall_s, 1),
            "steps_per_min": round(result.step / (result.elapsed_s / 60), 1), "minutes_budget": minutes,
            "checkpoint": f"best (step {best['step']})" if best else "final",
            "val_i2t_R@1": chosen.get("val_image_to_text_R@1"), "val_t2i_R@1": chosen.get("val_text_to_image_R@1"),
            "val_rsum": chosen.get("val_rsum"),
            **{f"test_{k}": round(v, 2) for k, v in test.items() if "_R@" in k or k in ("rsum", "num_images")}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="prepared openmoji dir (default: prepare it into the cache)")
    parser.add_argument("--weights", default=str(ROOT / "weights"), help="scripts/prepare_lit_towers.py output")
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall time per variant")
    parser.add_argument("--variants", default="scratch,lit_uncached,lit")
    parser.add_argument("--eval-every", type=int, default=0, help="validation every N steps (default: the "
                        "recipe's; 0 keeps it)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every "
                        "variant: the settings to compare on the validation split")
    parser.add_argument("--validation-only", action="store_true", help="do not score the test concepts (while "
                        "choosing settings; they are scored once, for the chosen ones)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data) if args.data else cache_dir() / "bench" / "openmoji-128"
    if not (data / "test" / "metadata.jsonl").is_file():
        prepare_openmoji(data, size=128)
    carve_validation(data)
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            line = run_variant(variant.strip(), data, Path(args.weights), args.minutes, Path(tmp), args.eval_every,
                               args.set, score_test=not args.validation_only)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
