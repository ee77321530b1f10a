"""Models x datasets x tasks in one call: every cell scored once, cached, resumable, with intervals.

    rows = benchmark(models=["demo=vclr-demo/run", "ViT-B-32,vit.pt"], datasets=["shapes", "fashion-mnist"],
                     out="bench/")                                  # vclr.benchmark(...), `vclr benchmark`
    diffs = compare("bench/", "demo", "ViT-B-32")                   # paired differences with p-values

A model spec is any model source vclr knows, with an optional `LABEL=` in front: a run directory (`DIR`, or
`DIR@best` for its best checkpoint, `DIR@ema` for its weights' moving average), an open_clip config with optional
weights as CLIP_benchmark writes them (`ViT-B-32`, `ViT-B-32,laion2b_s34b_b79k`, `ViT-B-32,weights.pt`),
`local-dir:DIR` (an open_clip export) or `hf-hub:org/repo`.

OUT holds `results.jsonl` (one row per model x dataset x task: every figure, its interval, the model's identity and
the dataset's fingerprint), `features/` (each model's embeddings of each dataset: zero-shot and a linear probe
share the test images' features) and `outcomes/` (per-unit outcomes behind each figure, for `compare`). A cell is
known by its model (identity and weights), its dataset's fingerprint, its task and the settings that change its
figures: a rerun with one more model or dataset computes only the new cells, and a killed run continues from the
last finished cell (rows and arrays are written atomically as each is done). A cell that fails (a dataset without
class names, a model that cannot embed text, a broken shard) is one line in the log and an `error` row; the other
cells still run, and a rerun tries the failed ones again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vclr.bench.datasets import BenchmarkDataset, UnknownDataset, resolve_dataset
from vclr.bench.features import Featurizer
from vclr.bench.stats import Outcomes, intervals, paired_difference
from vclr.bench.tasks import TASKS, TaskResult, check_tasks, tasks_for
from vclr.config import BenchmarkConfig, config_hash
from vclr.errors import VclrError
from vclr.model.source import ModelSource, OpenClipSource, RunSource, model_source
from vclr.rundir import CONFIG_FILE
from vclr.storage import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
FORMAT_VERSION = 1  # of results.jsonl rows and outcomes/*.npz
# settings that change no figure: they stay out of a cell's key
UNKEYED_SETTINGS = {"num_workers", "failures"}


@dataclass(frozen=True)
class ModelSpec:
    label: str
    source: ModelSource
    spec: str


def parse_model_spec(text: str) -> ModelSpec:
    """`[LABEL=]SPEC` (see the module docstring) -> the model source it names."""
    label, sep, spec = text.partition("=")
    if not sep or "/" in label or "," in label:  # an `=` inside a path or a tag is no label
        label, spec = "", text
    spec = spec.strip()
    run, _, checkpoint = spec.rpartition("@") if spec.endswith(("@best", "@ema")) else (spec, "", "final")
    if (Path(run) / CONFIG_FILE).is_file():
        return ModelSpec(label or Path(run).resolve().name, model_source(run=run, checkpoint=checkpoint or "final"),
                         text)
    name, _, pretrained = spec.partition(",")
    if not name:
        raise VclrError(f"model spec {text!r} names no model: give a run dir, NAME[,PRETRAINED] or hf-hub:org/repo")
    label = label or (f"{name},{Path(pretrained).name}" if pretrained else name)
    return ModelSpec(label, model_source(model=name, pretrained=pretrained or None), text)


def _weights_stamp(source: ModelSource) -> list:
    """Size and mtime of the weights a source reads: retraining a run in place makes new cells, not stale ones."""
    if isinstance(source, RunSource):
        path = source._weights()
    elif isinstance(source, OpenClipSource) and source._is_file():
        path = Path(source.pretrained)
    else:
        return []
    if not path.exists():  # the model will not load: its cells fail with the loader's own message
        return [str(path), None]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def model_key(source: ModelSource) -> str:
    return hashlib.sha256(json.dumps([source.describe(), _weights_stamp(source)]).encode()).hexdigest()[:16]


def settings_key(settings: BenchmarkConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in UNKEYED_SETTINGS}


def cell_key(model: str, dataset: BenchmarkDataset, task: str, settings: BenchmarkConfig) -> str:
    blob = json.dumps([model, dataset.fingerprint(), task, settings_key(settings)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ResultStore:
    """OUT/results.jsonl (rewritten atomically after each cell) and the outcome arrays beside it."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        path = self.out / RESULTS_FILE
        self.rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
            if path.is_file() else []

    def done(self, cell: str) -> dict | None:
        return next((r for r in self.rows if r.get("cell") == cell and "error" not in r), None)

    def add(self, row: dict, figures: dict[str, Outcomes] | None = None) -> None:
        if figures:
            buffer = io.BytesIO()
            np.savez(buffer, **{f"{kind}:{name}": getattr(o, kind) for name, o in figures.items()
                                for kind in ("num", "den", "groups") if getattr(o, kind) is not None})
            atomic_write_bytes(self.out / "outcomes" / f"{row['cell']}.npz", buffer.getvalue())
        self.rows = [r for r in self.rows if r.get("cell") != row["cell"]] + [row]
        atomic_write_text(self.out / RESULTS_FILE, "".join(json.dumps(r) + "\n" for r in self.rows))

    def outcomes(self, cell: str) -> dict[str, Outcomes]:
        with np.load(self.out / "outcomes" / f"{cell}.npz") as stored:
            names = {key.split(":", 1)[1] for key in stored.files}
            return {name: Outcomes(stored[f"num:{name}"], stored[f"den:{name}"],
                                   stored[f"groups:{name}"] if f"groups:{name}" in stored.files else None)
                    for name in names}


def _one_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return message if isinstance(error, VclrError) else f"{type(error).__name__}: {message}"


def score_cell(featurizer: Featurizer, dataset: BenchmarkDataset, task: str,
               settings: BenchmarkConfig) -> tuple[TaskResult, dict[str, tuple[float, float]]]:
    """One task on one dataset with one model's features: its result and the interval of each figure."""
    result = TASKS[task].run(featurizer, dataset, settings)
    return result, intervals(result.figures, settings.bootstrap, settings.confidence, settings.seed)


class TextTowerError(VclrError):
    """The model could not embed text (a text task fails; image-only tasks still run)."""


class _TextGuard(Featurizer):
    """A featurizer whose text embedding failures say so in one line."""

    def captions(self, *args, **kwargs):
        return self._guarded(super().captions, *args, **kwargs)

    def classes(self, *args, **kwargs):
        return self._guarded(super().classes, *args, **kwargs)

    @staticmethod
    def _guarded(embed, *args, **kwargs):
        try:
            return embed(*args, **kwargs)
        except VclrError:
            raise
        except Exception as e:
            raise TextTowerError(f"the model cannot embed text ({_one_line(e)})") from e


def _row(spec: ModelSpec, key: str, cfg, dataset: BenchmarkDataset, task: str, settings: BenchmarkConfig,
         cell: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        vclr_version = version("vclr")
    except PackageNotFoundError:  # a source checkout that was never installed
        vclr_version = "unknown"
    return {"format_version": FORMAT_VERSION, "cell": cell, "model": spec.label, "model_spec": spec.spec,
            "model_source": spec.source.describe(), "model_key": key,
            **({"model_name": cfg.model.name, "model_config_hash": config_hash(cfg.model)} if cfg else {}),
            "dataset": dataset.name, "dataset_kind": dataset.kind, "dataset_fingerprint": dataset.fingerprint(),
            "task": task, "settings": settings_key(settings), "vclr_version": vclr_version}


def _resolve_all(datasets: Sequence[str], root: str | None, languages: tuple[str, ...]) -> dict:
    """name -> BenchmarkDataset, or the one-line reason it cannot be read; an unknown name stops everything."""
    resolved: dict[str, BenchmarkDataset | str] = {}
    for name in datasets:
        try:
            resolved[name] = resolve_dataset(name, root, languages)
        except UnknownDataset:
            raise
        except Exception as e:  # a broken shard, a missing split: this dataset's cells fail, the others run
            resolved[name] = _one_line(e)
            logger.error("dataset %s: %s", name, resolved[name])
    return resolved


def _model_cells(spec: ModelSpec, resolved: dict, tasks: tuple[str, ...], settings: BenchmarkConfig,
                 store: ResultStore) -> None:
    key, loaded, featurizer = model_key(spec.source), None, None
    for name, dataset in resolved.items():
        if isinstance(dataset, str):
            continue
        for task in tasks_for(dataset, tasks):
            cell = cell_key(key, dataset, task, settings)
            if store.done(cell):
                continue
            start = time.perf_counter()
            try:
                if loaded is None:
                    logger.info("loading model %s", spec.label)
                    loaded = spec.source.load()
                    featurizer = _TextGuard(loaded[0], loaded[1], store.out / "features" / key, settings.batch_size,
                                            settings.num_workers)
                result, cis = score_cell(featurizer, dataset, task, settings)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                message = _one_line(e)
                if loaded is None:  # the model does not load: every cell of it fails the same way
                    logger.error("model %s: %s", spec.label, message)
                    _fail_all(spec, key, resolved, tasks, settings, store, f"the model does not load: {message}")
                    return
                logger.error("%s x %s x %s: %s", spec.label, name, task, message)
                store.add({**_row(spec, key, loaded[1], dataset, task, settings, cell), "error": message})
                continue
            row = {**_row(spec, key, loaded[1], dataset, task, settings, cell), "metrics": result.metrics,
                   "intervals": {k: list(v) for k, v in cis.items()}, "units": result.units,
                   "seconds": round(time.perf_counter() - start, 2), "failures": result.failures}
            store.add(row, result.figures)
            logger.info("%s x %s x %s: %s", spec.label, name, task,
                        ", ".join(f"{k} {v:.4f}" for k, v in list(result.metrics.items())[:4]))


def _fail_all(spec: ModelSpec, key: str, resolved: dict, tasks: tuple[str, ...], settings: BenchmarkConfig,
              store: ResultStore, message: str) -> None:
    for dataset in (d for d in resolved.values() if not isinstance(d, str)):
        for task in tasks_for(dataset, tasks):
            cell = cell_key(key, dataset, task, settings)
            if not store.done(cell):
                store.add({**_row(spec, key, None, dataset, task, settings, cell), "error": message})


def benchmark(models: Sequence[str], datasets: Sequence[str], out: str | Path, *, tasks: Sequence[str] = ("auto",),
              dataset_root: str | None = None, languages: Sequence[str] = ("en",),
              settings: BenchmarkConfig = BenchmarkConfig(), report: bool = True) -> list[dict]:
    """Score every model on every dataset (see the module docstring); returns this matrix's rows, error rows
    included. `report`: also write results.csv, results.md, the plots and the failure sheets."""
    if not models or not datasets:
        raise VclrError("a benchmark needs at least one `models` entry and one `datasets` entry")
    specs = _unique_labels([parse_model_spec(m) for m in models])
    resolved = _resolve_all(datasets, dataset_root, tuple(languages))
    tasks = check_tasks(tuple(tasks))  # an unknown task name fails here, before any model loads
    for name, dataset in resolved.items():
        if not isinstance(dataset, str) and not tasks_for(dataset, tasks):
            logger.warning("dataset %s (%s) fits none of the tasks %s", name, dataset.kind, ", ".join(tasks))
    store = ResultStore(out)
    start = time.perf_counter()
    for spec in specs:
        _model_cells(spec, resolved, tuple(tasks), settings, store)
    rows = _matrix_rows(store, specs, resolved, tuple(tasks), settings)
    if report:
        from vclr.bench.report import write_reports

        write_reports(Path(out), rows, seconds=time.perf_counter() - start)
    return rows


def _unique_labels(specs: list[ModelSpec]) -> list[ModelSpec]:
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        seen[spec.label] = seen.get(spec.label, 0) + 1
        count = seen[spec.label]
        out.append(spec if count == 1 else dataclasses.replace(spec, label=f"{spec.label}-{count}"))
    return out


def _matrix_rows(store: ResultStore, specs: list[ModelSpec], resolved: dict, tasks: tuple[str, ...],
                 settings: BenchmarkConfig) -> list[dict]:
    """This call's cells, in matrix order, with an error row for each dataset that could not be read."""
    rows = []
    for spec in specs:
        key = model_key(spec.source)
        for name, dataset in resolved.items():
            if isinstance(dataset, str):
                rows.append({"model": spec.label, "dataset": name, "task": "-", "error": dataset})
                continue
            for task in tasks_for(dataset, tasks):
                cell = cell_key(key, dataset, task, settings)
                found = next((r for r in store.rows if r.get("cell") == cell), None)
                if found is not None:
                    rows.append({**found, "model": spec.label})
    return rows


def compare(out: str | Path, a: str, b: str, *, resamples: int | None = None, permutations: int = 9999,
            seed: int = 0) -> list[dict]:
    """B - A for every dataset and figure both models have in OUT/results.jsonl, on the same units: the difference,
    its paired bootstrap interval and its permutation p-value (vclr.bench.stats)."""
    store = ResultStore(out)
    ok = [r for r in store.rows if "error" not in r]
    labels = {r["model"] for r in ok}
    for label in (a, b):
        if label not in labels:
            raise VclrError(f"model {label!r} has no results in {out} (it has: {', '.join(sorted(labels)) or 'none'})")
    rows = []
    for row_a in (r for r in ok if r["model"] == a):
        row_b = next((r for r in ok if r["model"] == b and r["dataset_fingerprint"] == row_a["dataset_fingerprint"]
                      and r["task"] == row_a["task"] and r["settings"] == row_a["settings"]), None)
        if row_b is None:
            continue
        outcomes_a, outcomes_b = store.outcomes(row_a["cell"]), store.outcomes(row_b["cell"])
        for figure in (f for f in row_a["metrics"] if f in outcomes_a and f in outcomes_b):
            diff = paired_difference(outcomes_a[figure], outcomes_b[figure],
                                     resamples or row_a["settings"]["bootstrap"] or 1000,
                                     row_a["settings"]["confidence"], permutations, seed)
            rows.append({"a": a, "b": b, "dataset": row_a["dataset"], "task": row_a["task"], "figure": figure,
                         **diff.as_dict()})
    if not rows:
        raise VclrError(f"models {a!r} and {b!r} share no dataset and task in {out}")
    return rows
