"""How far the frozen LiT towers go on OpenMoji (k-fold cross-validation over the train concepts).

Runs on the cached tower outputs of the lit_frozen recipe, for a few training settings of its projections.

    pip install -e '.[lit]' && python scripts/prepare_lit_towers.py --out weights
    python scripts/bench_emoji_ceiling.py                 # one JSON line: mean R@1 both ways per setting

The folds split by concept (crc32 % folds), as bench_emoji's validation split does, and never touch the test
concepts. Each fold trains the recipe's own model (projections and temperature on the cached outputs, vclr's loss,
parameter groups and warmup-cosine schedule) and scores its held-out concepts with vclr's exact recall. A setting
that lifts the mean here lifts what the towers can give; when none does, the towers are the limit.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vclr.config import load_config
from vclr.data.cache import cache_dir
from vclr.data.prepare import prepare_openmoji
from vclr.eval.metrics import retrieval_metrics
from vclr.train.loop import setup
from vclr.train.loss import CombinedLoss
from vclr.train.optim import param_groups, warmup_cosine

ROOT = Path(__file__).resolve().parent.parent
# (name, steps, weight decay, lr): the recipe's settings around its validation-chosen ones
SETTINGS = [("200 steps", 200, 0.1, 1e-3), ("600 steps", 600, 0.1, 1e-3), ("1000 steps", 1000, 0.1, 1e-3),
            ("1000 steps, wd 1.0", 1000, 1.0, 1e-3), ("2000 steps, lr 3e-4", 2000, 0.1, 3e-4)]


def concept_folds(table, data: Path, folds: int) -> np.ndarray:
    """(N,) fold of each training image, by a hash of its concept."""
    concept = {row["file_name"]: row["concept"]
               for row in map(json.loads, (data / "train" / "metadata.jsonl").read_text().splitlines())}
    return np.asarray([zlib.crc32(concept[Path(path).name].encode()) % folds for path in table.image_paths])


def renumber(rows: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Each caption's image as a position in `rows` (sorted), the numbering of a fold's own image array."""
    return np.searchsorted(rows, caption_image)


def train_fold(initial, cfg, images, texts, caption_image, steps: int, weight_decay: float, lr: float, seed: int):
    """The recipe's model trained on cached outputs of one fold's training concepts; one random caption per image."""
    torch.manual_seed(seed)
    model = copy.deepcopy(initial).train()
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.optim.warmup_steps, steps))
    loss_fn = CombinedLoss(cfg.loss)
    captions_of = [np.flatnonzero(caption_image == i) for i in range(len(images))]
    for _ in range(steps):
        rows = torch.randperm(len(images))[:cfg.data.batch_size]
        caps = torch.tensor([captions_of[i][torch.randint(len(captions_of[i]), ()).item()] for i in rows.tolist()])
        out = model(images[rows], texts[caps])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="prepared openmoji dir (default: prepare it into the cache)")
    parser.add_argument("--weights", default=str(ROOT / "weights"), help="scripts/prepare_lit_towers.py output")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=0, help="cap every setting's steps (the smoke test: 2)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data) if args.data else cache_dir() / "bench" / "openmoji-128"
    if not (data / "train" / "metadata.jsonl").is_file():
        prepare_openmoji(data, size=128)
    weights = Path(args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "lit_frozen_minilm_effl0.yaml", [
            f"data.train={data / 'train'}", f"train.output_dir={tmp}", "train.eval_every=0", "data.val_fraction=0",
            f"model.text_tower_dir={weights / 'all-MiniLM-L6-v2'}",
            f"model.image_tower_weights={weights / 'efficientnet_lite0_timm.pt'}", *args.set])
        trainer = setup(cfg)  # computes (or reuses) the locked towers' cached outputs, as a training run does
        model = trainer.accelerator.unwrap_model(trainer.model)
        images, texts = trainer.locked.images.clone(), trainer.locked.texts.clone()  # (N, F), (C, H)
        dataset = trainer.source.dataset
        caption_image = np.asarray(dataset.caption_image)
        fold_of = concept_folds(dataset.table, data, args.folds)
        results = {}
        for name, steps, weight_decay, lr in SETTINGS:
            steps = min(steps, args.max_steps or steps)
            scores = []
            for fold in range(args.folds):
                fit, held = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
                fit_caps, held_caps = (np.flatnonzero(np.isin(caption_image, rows)) for rows in (fit, held))
                trained = train_fold(model, cfg, images[fit], texts[fit_caps],
                                     renumber(fit, caption_image[fit_caps]), steps, weight_decay, lr, seed=fold)
                with torch.no_grad():
                    image_emb = F.normalize(trained.image_from_frozen(images[held]), dim=-1).numpy()
                    text_emb = F.normalize(trained.text_from_frozen(texts[held_caps]), dim=-1).numpy()
                scores.append(retrieval_metrics(image_emb, text_emb, renumber(held, caption_image[held_caps])))
            results[name] = {k: round(float(np.mean([s[k] for s in scores])), 1)
                             for k in ("image_to_text_R@1", "text_to_image_R@1")}
        print(json.dumps({"bench": "emoji_ceiling", "recipe": "lit_frozen_minilm_effl0", "settings": args.set,
                          "folds": args.folds, "images": len(images), "mean_R@1": results}), flush=True)


if __name__ == "__main__":
    main()
