"""Sweeps: train and evaluate every point of a config grid; one table and one plot of metric against parameter.

    vclr sweep --config configs/demo.yaml --grid loss.triplet_margin=0.1,0.3,0.5,0.7,0.9 --out runs/margin \\
        data.train=... data.test=... optim.max_steps=200

Each point trains into OUT/<key>=<value>[,...]/ and is evaluated on data.test. Points that already hold an eval.json
are reused, so an interrupted sweep continues where it stopped. Results: OUT/sweep.json, OUT/sweep.md (a table) and
OUT/sweep.png (recall and rsum against the first grid parameter, one line per value of the others).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from vclr.config import load_config
from vclr.errors import ConfigError, VclrError
from vclr.eval.evaluate import evaluate_run
from vclr.storage import atomic_write_text
from vclr.train.loop import train

logger = logging.getLogger(__name__)

SWEEP_METRICS = ("image_to_text_R@1", "text_to_image_R@1", "rsum")


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """["loss.triplet_margin=0.1,0.3", ...] -> {"loss.triplet_margin": ["0.1", "0.3"], ...}"""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not items:
            raise ConfigError(f"bad `grid` entry {spec!r}: write it as section.key=v1,v2,..., "
                              "e.g. loss.triplet_margin=0.1,0.5")
        if key.strip() in grid:
            raise ConfigError(f"`grid` names {key.strip()} twice")
        grid[key.strip()] = items
    if not grid:
        raise ConfigError("a sweep needs at least one `grid` entry section.key=v1,v2,...")
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in point.items()).replace("/", "_")


def run_sweep(config: str | None, grid_specs: Sequence[str], out: str | Path, overrides: Sequence[str] = ()) -> dict:
    out = Path(out)
    grid = parse_grid(grid_specs)
    points = grid_points(grid)
    # every point's config is checked before the first one trains: a typo fails now, not an hour in
    configs = [load_config(config, [*overrides, *(f"{k}={v}" for k, v in point.items()),
                                    f"train.output_dir={out / point_name(point)}"]) for point in points]
    if not configs[0].data.test:
        raise VclrError("a sweep evaluates every point on data.test: set it in the config or as data.test=DIR")
    rows = []
    for point, cfg in zip(points, configs):
        run_dir = Path(cfg.train.output_dir)
        report_file = run_dir / "eval.json"
        if report_file.is_file():
            logger.info("sweep point %s: reusing %s", point_name(point), report_file)
            report = json.loads(report_file.read_text())
        else:
            logger.info("sweep point %s: training", point_name(point))
            train(cfg, resume=(run_dir / "checkpoints").is_dir())
            report = evaluate_run(run_dir, out=report_file)
        rows.append({**point, **{m: report["metrics"][m] for m in SWEEP_METRICS}})
    result = {"grid": grid, "overrides": list(overrides), "config": config, "rows": rows}
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=2))
    atomic_write_text(out / "sweep.md", format_table(list(grid), rows))
    plot_sweep(grid, rows, out / "sweep.png")
    return result


def format_table(keys: list[str], rows: list[dict]) -> str:
    header = "| " + " | ".join(keys + list(SWEEP_METRICS)) + " |"
    lines = [header, "|" + "---|" * (len(keys) + len(SWEEP_METRICS))]
    for row in rows:
        lines.append("| " + " | ".join([str(row[k]) for k in keys] + [f"{row[m]:.2f}" for m in SWEEP_METRICS]) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(grid: dict[str, list[str]], rows: list[dict], path: Path) -> None:
    from vclr.eval import plots

    first, rest = list(grid)[0], list(grid)[1:]
    series: dict[str, list[float]] = {}
    for others in itertools.product(*(grid[k] for k in rest)):
        label = ",".join(f"{k}={v}" for k, v in zip(rest, others))
        chosen = [r for r in rows if all(r[k] == v for k, v in zip(rest, others))]
        for metric in SWEEP_METRICS:
            series[f"{metric} {label}".strip()] = [r[metric] for r in chosen]
    values = [_number(v) for v in grid[first]]
    plots.sweep_plot(values, series, first, path)


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text
