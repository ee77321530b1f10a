"""A benchmark's tables and pictures: results.csv, results.md (models as rows, datasets as columns), bar plots with
the intervals, failure sheets of the worst misses, and report.html tying them together.

    write_reports(Path("bench"), rows, seconds=812.0)      # what `vclr benchmark` writes after the matrix
    write_comparison(Path("bench"), diffs)                 # compare.md / compare.jsonl for `--compare A B`

Tables print figures in percent with their interval ("52.3 [49.1, 55.6]"); results.jsonl and results.csv keep the
fractions CLIP_benchmark reports.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from pathlib import Path

from vclr.storage import atomic_write_text

# the figures a table shows for each task (results.csv and results.jsonl hold all of them)
MAIN_FIGURES = {
    "zeroshot_classification": ("acc1", "mean_per_class_recall"),
    "retrieval": ("image_retrieval_recall@1", "text_retrieval_recall@1"),
    "linear_probe": ("lp_acc1",),
    "compositionality": ("text_acc", "image_acc", "acc"),
    "multilingual_retrieval": ("mean/image_retrieval_recall@1", "mean/text_retrieval_recall@1"),
}
FIGURE_NAMES = {"image_retrieval_recall@1": "text→image R@1", "text_retrieval_recall@1": "image→text R@1",
                "acc1": "top-1", "mean_per_class_recall": "mean per-class recall", "lp_acc1": "linear probe top-1",
                "text_acc": "text score", "image_acc": "image score", "acc": "group score"}


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "x"


def cell_text(row: dict, figure: str) -> str:
    if "error" in row:
        return "error"
    value = row.get("metrics", {}).get(figure)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    low_high = row.get("intervals", {}).get(figure)
    return f"{100 * value:.1f} [{100 * low_high[0]:.1f}, {100 * low_high[1]:.1f}]" if low_high else f"{100 * value:.1f}"


def markdown_tables(rows: list[dict]) -> str:
    """One table per task and main figure: models as rows, datasets as columns."""
    parts = []
    for task, figures in MAIN_FIGURES.items():
        task_rows = [r for r in rows if r.get("task") == task]
        if not task_rows:
            continue
        models = list(dict.fromkeys(r["model"] for r in task_rows))
        datasets = list(dict.fromkeys(r["dataset"] for r in task_rows))
        for figure in figures:
            if not any(figure in r.get("metrics", {}) for r in task_rows):
                continue
            parts.append(f"### {task}: {FIGURE_NAMES.get(figure, figure)} (%, 95% interval)\n")
            parts.append("| model | " + " | ".join(datasets) + " |")
            parts.append("| --- |" + " ---: |" * len(datasets))
            for model in models:
                cells = [next((cell_text(r, figure) for r in task_rows if r["model"] == model and r["dataset"] == d),
                              "") for d in datasets]
                parts.append(f"| {model} | " + " | ".join(cells) + " |")
            parts.append("")
    errors = [r for r in rows if "error" in r]
    if errors:
        parts.append("### cells that failed\n")
        parts += [f"- {r['model']} × {r['dataset']} × {r['task']}: {r['error']}" for r in errors]
        parts.append("")
    return "\n".join(parts)


def results_csv(rows: list[dict]) -> str:
    figures = list(dict.fromkeys(f for r in rows for f in r.get("metrics", {})))
    columns = ["model", "dataset", "task", "units", "seconds", "error"]
    for figure in figures:
        columns += [figure, f"{figure}_low", f"{figure}_high"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = {k: row.get(k, "") for k in columns[:6]}
        for figure, value in row.get("metrics", {}).items():
            flat[figure] = value
            low_high = row.get("intervals", {}).get(figure)
            if low_high:
                flat[f"{figure}_low"], flat[f"{figure}_high"] = low_high
        writer.writerow(flat)
    return buffer.getvalue()


def _plots(out: Path, rows: list[dict]) -> list[Path]:
    from vclr.eval.plots import interval_bars

    written = []
    for task, figures in MAIN_FIGURES.items():
        task_rows = [r for r in rows if r.get("task") == task and "metrics" in r]
        datasets = list(dict.fromkeys(r["dataset"] for r in task_rows))
        models = list(dict.fromkeys(r["model"] for r in task_rows))
        for figure in (f for f in figures if any(f in r["metrics"] for r in task_rows)):
            series = {}
            for model in models:
                cells = []
                for dataset in datasets:
                    row = next((r for r in task_rows if r["model"] == model and r["dataset"] == dataset), None)
                    value = 100 * row["metrics"].get(figure, math.nan) if row else math.nan
                    low, high = row.get("intervals", {}).get(figure, (math.nan, math.nan)) if row else (math.nan,) * 2
                    cells.append((value, 100 * low if not math.isnan(low) else value,
                                  100 * high if not math.isnan(high) else value))
                series[model] = cells
            written.append(interval_bars(datasets, series, f"{FIGURE_NAMES.get(figure, figure)} (%)",
                                         f"{task}: {FIGURE_NAMES.get(figure, figure)}",
                                         out / "plots" / f"{_slug(task)}-{_slug(figure)}.png"))
    return written


def _failure_rows(row: dict) -> list[tuple[str, list[tuple[str, str, bool]]]]:
    sheet = []
    for failure in row.get("failures", []):
        if "caption" in failure:  # retrieval: the caption, its own image, what came first
            sheet.append((f"{failure['caption']}\n(its image ranked {failure['rank']})",
                          [(failure["image"], "its image", True)] +
                          [(p, f"#{i + 1}", False) for i, p in enumerate(failure["retrieved"])]))
        elif "predicted" in failure:  # classification: the image, its class and the model's pick
            sheet.append((f"true: {failure['label']}\npredicted: {failure['predicted']}",
                          [(failure["path"], "", False)]))
        elif "images" in failure:  # compositionality: the instance's images and captions with their scores
            sheet.append(("\n".join(f"{j}: {c}" for j, c in enumerate(failure["captions"])) +
                          f"\nscores {failure['scores']}", [(p, f"image {j}", False)
                                                            for j, p in enumerate(failure["images"])]))
    return sheet


def _failure_sheets(out: Path, rows: list[dict]) -> dict[str, Path]:
    from vclr.eval.plots import failure_sheet

    written = {}
    for row in rows:
        if "cell" not in row or not row.get("failures"):
            continue
        # named by the cell too: a sheet already drawn for these figures is not drawn again on a rerun
        path = out / "failures" / _slug(row["model"]) / \
            f"{_slug(Path(row['dataset']).name)}-{_slug(row['task'])}-{row['cell'][:8]}.png"
        written[row["cell"]] = path if path.is_file() else failure_sheet(
            _failure_rows(row), path, f"{row['model']} on {row['dataset']} ({row['task']}): worst misses")
    return written


def _html(out: Path, rows: list[dict], plots: list[Path], sheets: dict[str, Path], tables: str) -> str:
    body = ["<!doctype html><meta charset=utf-8><title>vclr benchmark</title><style>body{font-family:sans-serif;"
            "max-width:70em;margin:auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:"
            "2px 6px;text-align:right}}img{{max-width:100%}}</style><h1>vclr benchmark</h1>"]
    for block in tables.split("### ")[1:]:
        title, *lines = block.strip().splitlines()
        body.append(f"<h2>{html.escape(title)}</h2>")
        table = [line for line in lines if line.startswith("|")]
        if table:
            body.append("<table>" + "".join(
                "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
                for i, line in enumerate(table) if i != 1) + "</table>")
        body += [f"<p>{html.escape(line)}</p>" for line in lines if line.startswith("- ")]
    body += [f'<p><img src="{p.relative_to(out).as_posix()}" alt="{html.escape(p.stem)}"></p>' for p in plots]
    for row in rows:
        if row.get("cell") in sheets:
            body.append(f"<h3>{html.escape(row['model'])} on {html.escape(row['dataset'])} ({row['task']})</h3>"
                        f'<img src="{sheets[row["cell"]].relative_to(out).as_posix()}" alt="worst misses">')
    return "\n".join(body)


def write_reports(out: Path, rows: list[dict], seconds: float | None = None) -> dict[str, Path]:
    tables = markdown_tables(rows)
    if seconds is not None:
        tables += f"\nThe matrix took {seconds:.1f} s ({len(rows)} cells).\n"
    atomic_write_text(out / "results.md", tables)
    atomic_write_text(out / "results.csv", results_csv(rows))
    plots, sheets = _plots(out, rows), _failure_sheets(out, rows)
    atomic_write_text(out / "report.html", _html(out, rows, plots, sheets, tables))
    return {"results.md": out / "results.md", "results.csv": out / "results.csv", "report.html": out / "report.html"}


def write_comparison(out: Path, diffs: list[dict]) -> str:
    """compare.jsonl and compare.md: B - A per dataset and figure, with its interval and p-value."""
    a, b = diffs[0]["a"], diffs[0]["b"]
    lines = [f"### {b} − {a} (points; paired bootstrap 95% interval; permutation p-value)\n",
             "| dataset | task | figure | A | B | B − A | interval | p |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for d in diffs:
        lines.append(f"| {d['dataset']} | {d['task']} | {d['figure']} | {100 * d['value_a']:.2f} | "
                     f"{100 * d['value_b']:.2f} | "
                     f"{100 * d['difference']:+.2f} | [{100 * d['interval'][0]:+.2f}, {100 * d['interval'][1]:+.2f}] | "
                     f"{d['p_value']:.4f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.jsonl", "".join(json.dumps(d) + "\n" for d in diffs))
    return text
