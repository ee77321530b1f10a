"""Evaluate a trained run on a captioned test set; a JSON report and PNG plots.

    vclr eval --run runs/demo --data data/shapes/test --out runs/demo/eval.json --plots runs/demo/plots

Report: exact recall@k both ways (blocked, memory-bounded), mean/median rank, rsum; the recall@k curve; pair
verification precision/recall/F1 at a similarity threshold chosen on a validation half of the images; with
`index_dir`, how much recall the approximate index costs against exact search; with `label_column`, weighted kNN
classification (NPID) and clustering quality (NMI/ARI). Plots: recall@k curves, training loss and temperature
curves (from the run's metrics.jsonl), a retrieval example sheet.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vclr.config import Config, config_hashes
from vclr.data.dataset import CaptionTable, load_caption_table, load_class_labels
from vclr.embed.embedding import class_embeddings, embed_table
from vclr.errors import VclrError
from vclr.eval.metrics import (
    KNN_K,
    KNN_TEMPERATURE,
    adjusted_rand_index,
    best_f1_threshold,
    check_retrieval_inputs,
    cluster,
    image_to_text_ranks,
    knn_classify,
    metrics_from_ranks,
    normalized_mutual_info,
    text_to_image_ranks,
    top_k_accuracy,
    verification_prf,
    zero_shot_metrics,
)
from vclr.model.source import ModelSource, RunSource, as_source, model_identity
from vclr.rundir import read_metrics
from vclr.storage import atomic_write_text

logger = logging.getLogger(__name__)


def _provenance(model_source: ModelSource, data: str, table: CaptionTable, cfg: Config) -> dict:
    """What makes a report's numbers comparable across runs: model, data and their fingerprints."""
    run = {"run_dir": model_source.run_dir} if isinstance(model_source, RunSource) else {}
    return {**model_identity(model_source, cfg), **{k: str(Path(v).resolve()) for k, v in run.items()},
            "dataset": str(data), "dataset_fingerprint": table.fingerprint()}


def _save_report(report: dict, out: str | Path | None) -> None:
    if out:
        atomic_write_text(out, json.dumps(report, indent=2))
        logger.info("wrote %s", out)


def evaluate_run(model_source: ModelSource | str | Path, data: str | None = None, ks: Sequence[int] | None = None,
                 out: str | Path | None = None, plots_dir: str | Path | None = None,
                 index_dir: str | Path | None = None, label_column: str | None = None,
                 knn_train: str | None = None, examples: int = 6) -> dict:
    """Embed `data` (default: the run's data.test) with the run's model and score it; see the module doc."""
    model_source = as_source(model_source)
    model, cfg = model_source.load()
    source = data or cfg.data.test
    if not source:
        raise VclrError("no test data: give `data` or set data.test in the run's config")
    ks = tuple(ks or cfg.eval.ks)
    if any(k <= 0 for k in ks):
        raise VclrError(f"every k must be a positive integer, got {list(ks)}")
    table = load_caption_table(source, cfg.data.image_column, cfg.data.caption_columns)
    start = time.perf_counter()
    emb = embed_table(model, cfg, table)
    check_retrieval_inputs(emb.image_embeddings, emb.text_embeddings, emb.caption_image)
    i2t_ranks, t2i_ranks = exact_ranks(emb)  # (N,), (C,)
    metrics = metrics_from_ranks(i2t_ranks, t2i_ranks, ks)
    curve_ks = [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= len(emb.image_embeddings)]
    report = {"metrics": metrics, **_provenance(model_source, source, table, cfg), "skipped_rows": table.skipped,
              "ks": list(ks),
              "recall_curve": {"k": curve_ks,
                               "image_to_text": [float(100 * (i2t_ranks <= k).mean()) for k in curve_ks],
                               "text_to_image": [float(100 * (t2i_ranks <= k).mean()) for k in curve_ks]},
              "verification": verification_report(emb, cfg.train.seed)}
    if index_dir:
        report["ann_vs_exact"] = ann_vs_exact(index_dir, emb, t2i_ranks, i2t_ranks, ks, config_hashes(cfg.model))
    if label_column:
        report["classification"] = classification_report(model, cfg, source, table, emb, label_column, knn_train)
    report["seconds"] = round(time.perf_counter() - start, 2)
    if plots_dir:
        run_dir = Path(model_source.run_dir) if isinstance(model_source, RunSource) else None
        report["plots"] = write_plots(Path(plots_dir), run_dir, emb, i2t_ranks, t2i_ranks, examples)
    _save_report(report, out)
    return report


def exact_ranks(emb) -> tuple[np.ndarray, np.ndarray]:
    """Exact ranks both ways: on the GPU when there is one (score blocks only), else with numpy."""
    import torch

    if torch.cuda.is_available():
        from vclr.eval.metrics_torch import retrieval_ranks

        return retrieval_ranks(emb.image_embeddings, emb.text_embeddings, emb.caption_image, torch.device("cuda"))
    return (image_to_text_ranks(emb.image_embeddings, emb.text_embeddings, emb.caption_image),
            text_to_image_ranks(emb.image_embeddings, emb.text_embeddings, emb.caption_image))


def verification_report(emb, seed: int = 0) -> dict:
    """Is (caption, image) a matching pair? Positives: each caption with its image; negatives: with a random other
    image. The threshold is chosen for F1 on a validation half of the images and reported on the other half."""
    rng = np.random.default_rng(seed)
    n = len(emb.image_embeddings)
    if n < 4:
        return {}
    validation_images = rng.permutation(n)[: n // 2]
    in_validation = np.isin(emb.caption_image, validation_images)
    other = (emb.caption_image + rng.integers(1, n, len(emb.caption_image))) % n  # never the caption's own image
    positive = np.einsum("cd,cd->c", emb.text_embeddings, emb.image_embeddings[emb.caption_image])
    negative = np.einsum("cd,cd->c", emb.text_embeddings, emb.image_embeddings[other])
    threshold = best_f1_threshold(positive[in_validation], negative[in_validation])
    test = ~in_validation
    return {**verification_prf(positive[test], negative[test], threshold),
            "validation_pairs": int(2 * in_validation.sum()), "test_pairs": int(2 * test.sum())}


def ann_vs_exact(index_dir: str | Path, emb, exact_t2i: np.ndarray, exact_i2t: np.ndarray, ks: Sequence[int],
                 model_hash: str | Sequence[str]) -> dict:
    """Recall@k through the saved (possibly approximate) index against the exact figures, both directions."""
    from vclr.index.format import RetrievalIndex

    index = RetrievalIndex.load(index_dir)
    index.check_model(emb.image_embeddings.shape[1], model_hash)
    if index.manifest["num_images"] != len(emb.image_embeddings) or \
            index.manifest["num_texts"] != len(emb.text_embeddings):
        raise VclrError(f"index {index_dir} holds {index.manifest['num_images']} images and "
                        f"{index.manifest['num_texts']} captions, the test set {len(emb.image_embeddings)} and "
                        f"{len(emb.text_embeddings)}: build the index from the same data")
    k_max = max(ks)
    _, image_hits = index.search_images(emb.text_embeddings, k_max)  # (C, k)
    _, text_hits = index.search_texts(emb.image_embeddings, k_max)  # (N, k)
    t2i_hit = image_hits == emb.caption_image[:, None]
    i2t_hit = emb.caption_image[text_hits] == np.arange(len(emb.image_embeddings))[:, None]
    out = {"index": {m: index.manifest["index"][m]["factory"] for m in ("images", "texts")}}
    for k in ks:
        for name, hits, exact in (("text_to_image", t2i_hit, exact_t2i), ("image_to_text", i2t_hit, exact_i2t)):
            approx = float(100 * hits[:, :k].any(axis=1).mean())
            exact_recall = float(100 * (exact <= k).mean())
            out[f"{name}_R@{k}"] = {"index": approx, "exact": exact_recall, "cost": exact_recall - approx}
    return out


def classification_report(model, cfg, source: str, table: CaptionTable, emb, label_column: str,
                          knn_train: str | None, name_column: str = "class_name") -> dict:
    """Weighted kNN classification (train: `knn_train` or the run's data.train) and clustering, on image embeddings."""
    labels, class_names = load_class_labels(source, table.image_paths, label_column, name_column,
                                            cfg.data.image_column)
    labels = labels[emb.rows]  # the readable images'
    out: dict = {"num_classes": len(class_names)}
    train_source = knn_train or cfg.data.train
    if train_source:
        train_table = load_caption_table(train_source, cfg.data.image_column, cfg.data.caption_columns)
        train_labels, train_names = load_class_labels(train_source, train_table.image_paths, label_column,
                                                      name_column, cfg.data.image_column)
        if train_names != class_names:
            raise VclrError(f"{train_source} and {source} name their classes differently; kNN needs one label set")
        train_emb = embed_table(model, cfg, train_table)
        train_labels = train_labels[train_emb.rows]  # readable images only
        scores = knn_classify(train_emb.image_embeddings, train_labels, emb.image_embeddings, len(class_names),
                              KNN_K, KNN_TEMPERATURE)
        out.update(top_k_accuracy(scores, labels, (1, 5)), knn_k=KNN_K, knn_temperature=KNN_TEMPERATURE,
                   knn_train=train_source)
    clusters = cluster(emb.image_embeddings, len(class_names), seed=cfg.train.seed)
    out.update(cluster_nmi=100 * normalized_mutual_info(labels, clusters),
               cluster_ari=100 * adjusted_rand_index(labels, clusters))
    return out


def write_plots(folder: Path, run_dir: Path | None, emb, i2t_ranks: np.ndarray, t2i_ranks: np.ndarray,
                examples: int) -> dict:
    from vclr.eval import plots

    written = {"recall_curves": str(plots.recall_curves(i2t_ranks, t2i_ranks, folder / "recall_curves.png",
                                                        max_k=min(100, len(emb.image_embeddings))))}
    rows = read_metrics(run_dir) if run_dir is not None else []  # training curves: a vclr run's only
    if rows:
        written["training_curves"] = str(plots.training_curves(rows, folder / "training_curves.png"))
    if examples:
        # the first caption of evenly spaced images: their own image's rank is shown by a green frame
        picks = np.unique(np.linspace(0, len(emb.texts) - 1, examples).astype(int))
        k = min(5, len(emb.image_embeddings))
        scores = emb.text_embeddings[picks] @ emb.image_embeddings.T  # (q, N)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        written["examples"] = str(plots.retrieval_examples(
            [emb.texts[i] for i in picks], [[emb.image_paths[j] for j in row] for row in top],
            np.take_along_axis(scores, top, 1), top == emb.caption_image[picks][:, None], folder / "examples.png"))
    return written


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


def standard_templates(class_names: Sequence[str]) -> tuple[str, ...]:
    """open_clip's prompt ensemble for a dataset it has one for (ImageNet's 80 OpenAI templates), else the default."""
    import open_clip

    if set(class_names) == set(open_clip.IMAGENET_CLASSNAMES):
        return tuple(template("{}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES)
    return DEFAULT_TEMPLATES


def zero_shot_run(model_source: ModelSource | str | Path, data: str, label_column: str = "label",
                  name_column: str = "class_name", templates: Sequence[str] | None = None,
                  out: str | Path | None = None) -> dict:
    """Zero-shot classification of `data`'s images against prompts built from its class names (`templates`: open_clip's
    standard ensemble for the dataset when it has one, else DEFAULT_TEMPLATES)."""
    model_source = as_source(model_source)
    model, cfg = model_source.load()
    table = load_caption_table(data, cfg.data.image_column, cfg.data.caption_columns)
    labels, class_names = load_class_labels(data, table.image_paths, label_column, name_column,
                                            cfg.data.image_column)
    templates = tuple(templates or standard_templates(class_names))
    classes = class_embeddings(model, cfg, class_names, templates)
    emb = embed_table(model, cfg, table)
    labels = labels[emb.rows]  # the readable images'
    report = {"metrics": zero_shot_metrics(emb.image_embeddings, classes, labels, class_names),
              **_provenance(model_source, data, table, cfg), "templates": list(templates), "classes": class_names,
              "num_images": len(labels)}
    _save_report(report, out)
    return report
