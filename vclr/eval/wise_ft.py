"""WiSE-FT along alpha: runs interpolated between a base model and its fine-tuned version, each scored by the
benchmark, and a plot of every dataset's figure against alpha.

    vclr wise-ft --base ViT-B-32,laion2b_s34b_b79k --fine-tuned runs/ft --alpha 0.5 --out runs/wise-0.5
    vclr wise-ft --base vclr-demo/run --fine-tuned runs/ft --alphas 0,0.25,0.5,0.75,1 \\
        --benchmark shapes --benchmark data/fashion-mnist/test --out runs/wise

Each alpha's run goes to OUT/alpha-<a>/ (reused when it was made from the same two models); the scores come from
`vclr benchmark` (OUT/benchmark/, cached and resumable as ever); OUT/wise_ft.json, wise_ft.md and wise_ft.png hold
each dataset's main figure against alpha (alpha 0 is the base model, 1 the fine-tuned one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from vclr.bench.matrix import benchmark, parse_model_spec
from vclr.bench.report import MAIN_FIGURES
from vclr.config import BenchmarkConfig
from vclr.errors import VclrError
from vclr.model.adapt import describe_wise_ft, wise_ft
from vclr.rundir import save_model_as_run
from vclr.storage import atomic_write_text

logger = logging.getLogger(__name__)

RECORD = "wise_ft.json"  # in each interpolated run: the two models and alpha


def save_wise_ft(base: str, fine_tuned: str, alpha: float, out: str | Path) -> Path:
    """The run interpolated at `alpha` between the models `base` and `fine_tuned` name (model specs, as `vclr
    benchmark` takes them); reused when OUT already holds the same interpolation."""
    base_source, tuned_source = parse_model_spec(base).source, parse_model_spec(fine_tuned).source
    record = describe_wise_ft(base_source, tuned_source, alpha)
    out = Path(out)
    if (out / RECORD).is_file() and json.loads((out / RECORD).read_text()) == record:
        return out
    model, cfg = wise_ft(base_source, tuned_source, alpha)
    save_model_as_run(out, cfg, model)
    atomic_write_text(out / RECORD, json.dumps(record, indent=2))
    logger.info("wrote the WiSE-FT run at alpha %g to %s", alpha, out)
    return out


def _curves(rows: list[dict], labels: dict[str, float]) -> dict[str, list[float]]:
    """"dataset figure" -> its value at each alpha (the first main figure of each task)."""
    curves: dict[str, dict[float, float]] = {}
    for row in rows:
        figures = MAIN_FIGURES.get(row.get("task"), ())
        if "metrics" not in row or not figures or figures[0] not in row["metrics"]:
            continue
        curves.setdefault(f"{Path(row['dataset']).name} {figures[0]}", {})[labels[row["model"]]] = \
            100 * row["metrics"][figures[0]]
    return {name: [values.get(a, float("nan")) for a in sorted(labels.values())] for name, values in curves.items()}


def wise_ft_sweep(base: str, fine_tuned: str, alphas: Sequence[float], datasets: Sequence[str], out: str | Path, *,
                  tasks: Sequence[str] = ("auto",), dataset_root: str | None = None,
                  settings: BenchmarkConfig = BenchmarkConfig()) -> dict:
    """Interpolate at every alpha, benchmark every run on `datasets`, plot each dataset's figure against alpha."""
    from vclr.eval.plots import sweep_plot

    if not alphas or not datasets:
        raise VclrError("a WiSE-FT sweep needs `alphas` and at least one `datasets` entry to score them on")
    out = Path(out)
    alphas = sorted(set(float(a) for a in alphas))
    runs = {f"a{a:g}": save_wise_ft(base, fine_tuned, a, out / f"alpha-{a:g}") for a in alphas}
    rows = benchmark([f"{label}={run}" for label, run in runs.items()], datasets, out / "benchmark", tasks=tasks,
                     dataset_root=dataset_root, settings=settings)
    curves = _curves(rows, {label: a for label, a in zip(runs, alphas)})
    result = {"base": base, "fine_tuned": fine_tuned, "alphas": alphas, "curves": curves,
              "runs": {label: str(run) for label, run in runs.items()}}
    atomic_write_text(out / "wise_ft.json", json.dumps(result, indent=2))
    header = "| alpha | " + " | ".join(curves) + " |\n| ---: |" + " ---: |" * len(curves) + "\n"
    atomic_write_text(out / "wise_ft.md", header + "".join(
        f"| {a:g} | " + " | ".join(f"{curves[c][i]:.2f}" for c in curves) + " |\n" for i, a in enumerate(alphas)))
    if curves:
        result["plot"] = str(sweep_plot(alphas, curves, "alpha (0: base, 1: fine-tuned)", out / "wise_ft.png"))
    return result
