"""`vclr benchmark` against `clip_benchmark eval` on the same cells, the same files and the same machine, in one run.

    python scripts/bench_benchmark.py                     # 5 random-init ViT-B-32 checkpoints x 3 datasets
    python scripts/bench_benchmark.py --models 2 --arch vclr-tiny-rn --test 28 --train 42 --val 14 --retrieval 20

The matrix: N models (random-init open_clip checkpoints of --arch, seeds 0..N-1, saved as files: what users pass as
`--pretrained`) x 3 datasets in CLIP_benchmark's webdataset layout, written by its own converter: `hues` (7 classes:
zero-shot and a linear probe with its weight-decay search on the val split), `hues2` (zero-shot, another draw) and
`shapes` (retrieval, 5 captions an image). Cells: zero-shot on both classification sets, the probe on `hues`,
retrieval on `shapes`: 4 per model.

Both systems run as the user would, as processes from the command line, with the same batch size, loader workers and
fp32 (`--no_amp` for CLIP_benchmark: its CPU default is bf16 autocast), from empty caches. CLIP_benchmark needs three
invocations (one per task: its `auto` picks a task by dataset name), through scripts/clip_benchmark_reference.py
(its faults on this stack mended). One JSON line: both wall times, their ratio, a rerun of the vclr matrix with
everything cached, how many figures of the two agree exactly, the CPU and its flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import clip_benchmark_reference as reference

from vclr.export.backends import machine

SCRIPTS = Path(__file__).resolve().parent


def _checkpoints(folder: Path, arch: str, count: int) -> list[Path]:
    import torch

    from vclr.model.source import model_source

    paths = []
    for seed in range(count):
        torch.manual_seed(seed)
        model, _ = model_source(model=arch).load(torch.device("cpu"))  # vclr's own configs are open_clip's too
        paths.append(folder / f"{arch}-seed{seed}.pt")
        torch.save(model.clip.state_dict(), paths[-1])
    return paths


def _datasets(root: Path, args) -> dict[str, Path]:
    return {"hues": reference.write_classification(root / "hues", {"train": args.train, "val": args.val,
                                                                   "test": args.test}, seed=0),
            "hues2": reference.write_classification(root / "hues2", {"test": args.test}, seed=2),
            "shapes": reference.write_retrieval(root / "shapes", args.retrieval)}


def _timed(command: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - start


def run_vclr(arch: str, checkpoints: list[Path], data: dict[str, Path], out: Path, args, env: dict) -> float:
    command = ["vclr", "-q", "benchmark", "--out", str(out), "--task", "auto", "--task", "linear_probe",
               "--batch-size", str(args.batch), "--workers", str(args.workers), "--bootstrap", str(args.bootstrap)]
    command += [a for c in checkpoints for a in ("--model", f"{c.stem}={arch},{c}")]
    command += [a for path in data.values() for a in ("--dataset", str(path))]
    return _timed([str(Path(sys.executable).parent / command[0]), *command[1:]], out.parent, env)


def run_clip_benchmark(arch: str, checkpoints: list[Path], data: dict[str, Path], out: Path, args, env: dict) -> float:
    out.mkdir(parents=True, exist_ok=True)
    common = ["--pretrained_model", *[f"{arch},{c}" for c in checkpoints], "--dataset_root",
              str(data["hues"].parent / "{dataset}"), "--no_amp", "--batch_size", str(args.batch), "--num_workers",
              str(args.workers), "--feature_root", str(out / "features"), "--quiet",
              "--output", str(out / "{dataset}_{pretrained}_{task}.json")]
    calls = [["--dataset", "wds/hues", "wds/hues2", "--task", "zeroshot_classification"],
             ["--dataset", "wds/shapes", "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10"],
             ["--dataset", "wds/hues", "--task", "linear_probe", "--train_split", "train", "--val_split", "val"]]
    return sum(_timed([sys.executable, str(SCRIPTS / "clip_benchmark_reference.py"), "eval", *call, *common], out, env)
               for call in calls)


def agreement(vclr_out: Path, reference_out: Path) -> tuple[int, int]:
    """(figures equal, figures compared) between the two systems' results."""
    ours = {}
    for line in (vclr_out / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        task = {"retrieval": "zeroshot_retrieval"}.get(row["task"], row["task"])
        ours[(Path(row["dataset"]).name, row["model"], task)] = row.get("metrics", {})
    equal = compared = 0
    for path in reference_out.glob("*.json"):
        row = json.loads(path.read_text())
        mine = ours.get((row["dataset"].split("/", 1)[-1], Path(row["pretrained"]).stem, row["task"]), {})
        for name, value in row["metrics"].items():
            if name in ("epochs", "seed", "fewshot_k", "normalized"):
                continue
            compared += 1
            equal += mine.get(name) == value
    return equal, compared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--test", type=int, default=140, help="test images of each classification set")
    parser.add_argument("--train", type=int, default=210)
    parser.add_argument("--val", type=int, default=70)
    parser.add_argument("--retrieval", type=int, default=100, help="retrieval images (5 captions each)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="vclr's intervals (CLIP_benchmark has none)")
    parser.add_argument("--work", default="bench-benchmark", help="scratch folder (emptied first)")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    data = _datasets(work / "data", args)
    checkpoints = _checkpoints(work, args.arch, args.models)
    env = {**os.environ, "VCLR_CACHE": str(work / "vclr-cache"), "PYTHONWARNINGS": "ignore"}
    vclr_s = run_vclr(args.arch, checkpoints, data, work / "vclr", args, env)
    cached_s = run_vclr(args.arch, checkpoints, data, work / "vclr", args, env)
    reference_s = run_clip_benchmark(args.arch, checkpoints, data, work / "clip_benchmark", args, env)
    equal, compared = agreement(work / "vclr", work / "clip_benchmark")
    print(json.dumps({"bench": "benchmark", "arch": args.arch, "models": args.models, "datasets": len(data),
                      "cells": 4 * args.models, "images_per_model": 2 * args.test + args.train + args.val
                      + args.retrieval, "vclr_s": round(vclr_s, 1), "clip_benchmark_s": round(reference_s, 1),
                      "speedup": round(reference_s / vclr_s, 2), "vclr_rerun_cached_s": round(cached_s, 1),
                      "figures_equal": equal, "figures_compared": compared, "vclr_bootstrap": args.bootstrap,
                      "batch": args.batch, "workers": args.workers, **machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
