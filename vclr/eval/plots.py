"""Report figures (matplotlib, PNG): recall@k curves, training curves, a retrieval example sheet, sweep results,
benchmark bars with their intervals and failure sheets.

Every figure is written through vclr.storage's atomic writer and labels its axes and series.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vclr.storage import atomic_write_bytes  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    """Render to memory, then the one durable writer (vclr.storage): a crash never leaves a torn PNG."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def recall_curves(image_to_text_ranks: np.ndarray, text_to_image_ranks: np.ndarray, path: str | os.PathLike,
                  max_k: int = 100, title: str = "") -> Path:
    """Recall@k for k = 1..max_k, both directions, on a log k axis."""
    ks = np.arange(1, max_k + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ranks in (("image → text", image_to_text_ranks), ("text → image", text_to_image_ranks)):
        recall = 100 * np.searchsorted(np.sort(ranks), ks, side="right") / len(ranks)
        ax.plot(ks, recall, label=f"{name} (R@1 {recall[0]:.1f})")
    ax.set_xscale("log")
    ax.set_xlabel("k (log scale)")
    ax.set_ylabel("recall@k (%)")
    ax.set_ylim(0, 100.5)
    ax.set_title(title or "Retrieval recall@k")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def training_curves(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Loss terms and the temperature against the optimizer step, from a run's metrics.jsonl rows; with validation
    rows (train.eval_every), a third panel of validation recall@1 both ways at their steps."""
    train_rows = [r for r in rows if "temperature" in r]
    val_rows = [r for r in rows if "val_rsum" in r]
    panels = 3 if val_rows else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), gridspec_kw={"wspace": 0.35})
    loss_ax, temp_ax = axes[0], axes[1]
    steps = [r["step"] for r in train_rows]
    terms = sorted({k for r in train_rows for k in r if k.endswith("_loss")})
    if len(terms) == 1 and all(r.get(terms[0]) == r.get("loss") for r in train_rows):
        # one term: the total is that term; one line, named both ways, rather than one hiding the other
        loss_ax.plot(steps, [r.get("loss", np.nan) for r in train_rows], label=f"loss = {terms[0]}")
    else:
        for key in ["loss", *terms]:
            loss_ax.plot(steps, [r.get(key, np.nan) for r in train_rows], label=key,
                         linewidth=2.2 if key == "loss" else 1.2, linestyle="-" if key == "loss" else "--")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("Training loss")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend()
    temperatures = [r["temperature"] for r in train_rows]
    temp_ax.plot(steps, temperatures, color="tab:red")
    if temperatures:  # a flat temperature stays flat: at least +-5% of its value on the axis
        middle, spread = float(np.mean(temperatures)), float(np.ptp(temperatures))
        half = max(spread / 2 * 1.1, 0.05 * middle)
        temp_ax.set_ylim(middle - half, middle + half)
    temp_ax.set_xlabel("step")
    temp_ax.set_ylabel("temperature (1 / logit scale)")
    temp_ax.set_title("Learned temperature")
    temp_ax.grid(True, alpha=0.3)
    if val_rows:
        val_ax, val_steps = axes[2], [r["step"] for r in val_rows]
        for key, label in (("val_image_to_text_R@1", "image→text R@1"), ("val_text_to_image_R@1", "text→image R@1")):
            val_ax.plot(val_steps, [r.get(key, np.nan) for r in val_rows], marker="o", label=label)
        val_ax.set_xlabel("step")
        val_ax.set_ylabel("recall@1 (%)")
        val_ax.set_title("Validation")
        val_ax.grid(True, alpha=0.3)
        val_ax.legend()
    return _save(fig, path)


def retrieval_examples(queries: Sequence[str], hit_paths: Sequence[Sequence[str]], hit_scores: np.ndarray,
                       correct: np.ndarray, path: str | os.PathLike) -> Path:
    """One row per text query: the query, then its top-k images with scores; the query's own image framed green."""
    from PIL import Image

    rows, k = len(queries), len(hit_paths[0])
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.7 * (k + 1) + 1.5, 1.8 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2] + [1] * k})
    for r, query in enumerate(queries):
        text_ax = axes[r][0]
        text_ax.axis("off")
        text_ax.text(0, 0.5, "\n".join(_wrap(query, 28)), va="center", fontsize=8)
        for c in range(k):
            ax = axes[r][c + 1]
            with Image.open(hit_paths[r][c]) as image:
                ax.imshow(image.convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            color = "tab:green" if correct[r][c] else "0.8"
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3 if correct[r][c] else 1)
            ax.set_title(f"#{c + 1}  {hit_scores[r][c]:.2f}", fontsize=7)
    fig.suptitle("Text → image: top results (green: the caption's own image)", fontsize=10)
    return _save(fig, path)


def sweep_plot(values: Sequence, metrics: dict[str, Sequence[float]], parameter: str,
               path: str | os.PathLike) -> Path:
    """Each metric against the swept parameter."""
    fig, ax = plt.subplots(figsize=(6, 4))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    for name, ys in metrics.items():
        ax.plot(xs, ys, marker="o", label=name)
    if not numeric:
        ax.set_xticks(xs, [str(v) for v in values])
    ax.set_xlabel(parameter)
    ax.set_ylabel("metric")
    ax.set_title(f"Sweep over {parameter}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def interval_bars(groups: Sequence[str], series: dict[str, Sequence[tuple[float, float, float]]], ylabel: str,
                  title: str, path: str | os.PathLike) -> Path:
    """Grouped bars, one group per dataset and one bar per model (`series`: model -> (value, low, high) per group,
    nan where it has none), the intervals drawn as error bars."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.9 * len(groups) * max(1, len(series)) ** 0.5), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, cells) in enumerate(series.items()):
        values = np.array([c[0] for c in cells], dtype=float)
        errors = np.array([[c[0] - c[1] for c in cells], [c[2] - c[0] for c in cells]], dtype=float)
        xs = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        ax.bar(xs, values, width, yerr=np.nan_to_num(errors), capsize=3, label=name)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=20 if len(groups) > 3 else 0, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def failure_sheet(rows: Sequence[tuple[str, Sequence[tuple[str, str, bool]]]], path: str | os.PathLike,
                  title: str) -> Path:
    """One row per failure: its text on the left, then its images, each (path, label, framed green)."""
    from PIL import Image

    columns = max(1, max((len(images) for _, images in rows), default=1))
    fig, axes = plt.subplots(max(1, len(rows)), columns + 1, figsize=(1.7 * columns + 3.2, 1.8 * max(1, len(rows))),
                             squeeze=False, gridspec_kw={"width_ratios": [2.6] + [1] * columns})
    for r, (text, images) in enumerate(rows):
        axes[r][0].axis("off")
        axes[r][0].text(0, 0.5, "\n".join(line for part in text.split("\n") for line in _wrap(part, 34)),
                        va="center", fontsize=7)
        for c in range(columns):
            ax = axes[r][c + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            image_path, label, framed = images[c]
            with Image.open(image_path) as image:
                ax.imshow(image.convert("RGB"))
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if framed else "0.8")
                spine.set_linewidth(3 if framed else 1)
            ax.set_title(label, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines
