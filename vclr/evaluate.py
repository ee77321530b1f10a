"""Evaluate a trained run on a captioned test set: exact recall@k both ways, mean/median rank, rsum; a JSON report.

    vclr eval --run runs/demo --data data/shapes/test --out runs/demo/eval.json
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from vclr.config import Config, VclrError, atomic_write_text, config_hash
from vclr.data.dataset import CaptionTable, load_caption_table, load_class_labels
from vclr.embed import embed_table, embed_texts, load_trained
from vclr.metrics import retrieval_metrics, zero_shot_metrics

logger = logging.getLogger(__name__)


def _provenance(run_dir: str | Path, source: str, table: CaptionTable, cfg: Config) -> dict:
    """What makes a report's numbers comparable across runs: model, data and their fingerprints."""
    return {"run_dir": str(Path(run_dir).resolve()), "dataset": str(source),
            "dataset_fingerprint": table.fingerprint(), "model_name": cfg.model.name,
            "model_config_hash": config_hash(cfg.model)}


def _save_report(report: dict, out: str | Path | None) -> None:
    if out:
        atomic_write_text(out, json.dumps(report, indent=2))
        logger.info("wrote %s", out)


def evaluate_run(run_dir: str | Path, data: str | None = None, ks: Sequence[int] | None = None,
                 out: str | Path | None = None) -> dict:
    """Embed `data` (default: the run's data.test) with the run's model and score retrieval both ways."""
    model, cfg = load_trained(run_dir)
    source = data or cfg.data.test
    if not source:
        raise VclrError("no test data: pass --data DIR or set data.test in the run's config")
    ks = tuple(ks or cfg.eval.ks)
    if any(k <= 0 for k in ks):
        raise VclrError(f"every k must be a positive integer, got {list(ks)}")
    table = load_caption_table(source, cfg.data.image_column, cfg.data.caption_columns)
    start = time.perf_counter()
    emb = embed_table(model, cfg, table)
    metrics = retrieval_metrics(emb.image_embeddings, emb.text_embeddings, emb.text_to_image, ks)
    report = {"metrics": metrics, **_provenance(run_dir, source, table, cfg), "skipped_rows": table.skipped,
              "ks": list(ks), "seconds": round(time.perf_counter() - start, 2)}
    _save_report(report, out)
    return report


def format_metrics_table(metrics: dict, ks: Sequence[int]) -> str:
    """A small fixed-width table: one row per direction."""
    header = f"{'direction':<15}" + "".join(f"{'R@' + str(k):>8}" for k in ks) + f"{'mean_r':>9}{'med_r':>7}"
    lines = [header, "-" * len(header)]
    for direction in ("image_to_text", "text_to_image"):
        cells = "".join(f"{metrics[f'{direction}_R@{k}']:>8.2f}" for k in ks)
        lines.append(f"{direction:<15}{cells}{metrics[f'{direction}_mean_rank']:>9.2f}"
                     f"{metrics[f'{direction}_median_rank']:>7.1f}")
    lines.append(f"rsum {metrics['rsum']:.2f}   ({metrics['num_images']} images, {metrics['num_texts']} captions)")
    return "\n".join(lines)


DEFAULT_TEMPLATES = ("a photo of a {}",)


def class_embeddings(model, cfg, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(K, D) one unit vector per class: the mean of its prompt embeddings, renormalised (CLIP's prompt ensemble)."""
    if not templates or any("{}" not in t for t in templates):
        raise VclrError(f"each zero-shot template needs a '{{}}' for the class name, got {list(templates)}")
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = embed_texts(model, cfg, prompts).reshape(len(class_names), len(templates), -1).mean(axis=1)  # (K, D)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def zero_shot_run(run_dir: str | Path, data: str, label_column: str = "label", name_column: str = "class_name",
                  templates: Sequence[str] = DEFAULT_TEMPLATES, out: str | Path | None = None) -> dict:
    """Zero-shot classification of `data`'s images against prompts built from its class names."""
    model, cfg = load_trained(run_dir)
    table = load_caption_table(data, cfg.data.image_column, cfg.data.caption_columns)
    labels, class_names = load_class_labels(data, table.image_paths, label_column, name_column,
                                            cfg.data.image_column)
    classes = class_embeddings(model, cfg, class_names, templates)
    emb = embed_table(model, cfg, table)
    report = {"metrics": zero_shot_metrics(emb.image_embeddings, classes, labels, class_names),
              **_provenance(run_dir, data, table, cfg), "templates": list(templates), "classes": class_names,
              "num_images": len(labels)}
    _save_report(report, out)
    return report
