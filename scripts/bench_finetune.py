"""Fine-tune a "published" model on a new task and measure what it gains there and what it loses on its own task,
for full fine-tuning, LoRA (rank 8 and 16), EMA and WiSE-FT; with trainable parameters, peak memory and steps/s.

    make demo                                              # the base: the demo run, trained on shapes
    vclr prepare fashion-mnist --out data/fashion-mnist-5k --limit 5000
    python scripts/bench_finetune.py --base vclr-demo/run --data data/fashion-mnist-5k      # one JSON line each

The base model (a vclr run) is fine-tuned on the new data's training captions (Fashion-MNIST: "a photo of a
t-shirt", ...) from its own weights (`model.pretrained=BASE/model.safetensors`), every variant for the same number
of steps with the base's loss, each in its own `vclr train` process (so its peak memory is its own:
RUN/train_report.json). Then `vclr benchmark` scores the base and every variant on the base task (the base's
test split: text->image R@1) and the new task (the new data's test split: zero-shot top-1, its class names and
prompts), and WiSE-FT interpolates the fully fine-tuned run with the base at each --alphas. Gradient
checkpointing's memory saving is measured apart, on --checkpointing-model (a ViT, whose blocks open_clip can
recompute; the demo model's ResNet image tower cannot), a few steps with and without.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = {  # name -> (overrides, the checkpoint benchmarked)
    "full": ([], "final"),
    "full_ema": (["train.ema_decay=0.99"], "ema"),
    "lora8": (["model.lora_rank=8", "model.lora_alpha=16"], "final"),
    "lora16": (["model.lora_rank=16", "model.lora_alpha=32"], "final"),
}
LORA_LR_SCALE = 10  # adapters start at zero and are few: the usual LoRA practice is a ~10x higher learning rate


def _vclr_train(run: Path, overrides: list[str], config: Path | None = None) -> dict:
    """One `vclr train` in its own process (its peak memory its own) -> its RUN/train_report.json."""
    subprocess.run([str(Path(sys.executable).parent / "vclr"), "-q", "train",
                    *(["--config", str(config)] if config else []), f"train.output_dir={run}", "train.max_minutes=0",
                    "train.checkpoint_every=100000", *overrides],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads((run / "train_report.json").read_text())


def _train(run: Path, base: Path, data: Path, args, extra: list[str], lr: float) -> dict:
    overrides = [f"model.pretrained={base / 'model.safetensors'}", f"data.train={data / 'train'}",
                 f"data.test={data / 'test'}", f"optim.max_steps={args.steps}", f"optim.lr={lr}",
                 f"optim.warmup_steps={max(1, args.steps // 10)}", f"data.batch_size={args.batch}",
                 "loss.triplet_warmup_steps=0", *extra]
    return _vclr_train(run, overrides, base / "config.yaml")


def _figures(rows: list[dict], base_task: str, new_task: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for row in rows:
        if "metrics" not in row:
            continue
        name = Path(row["dataset"]).as_posix()
        figure = "image_retrieval_recall@1" if row["task"] == "retrieval" else "acc1"
        key = "base_task" if name.endswith(base_task) else "new_task" if name.endswith(new_task) else None
        if key:
            out.setdefault(row["model"], {})[key] = round(100 * row["metrics"][figure], 2)
            out[row["model"]][f"{key}_interval"] = [round(100 * v, 2) for v in row["intervals"].get(figure, [])]
    return out


def checkpointing_memory(work: Path, data: Path, args) -> list[dict]:
    """Peak memory and steps/s of a few training steps of --checkpointing-model with and without recomputation."""
    lines = []
    for flag in ("false", "true"):
        report = _vclr_train(work / f"ckpt-{flag}", [
            f"model.name={args.checkpointing_model}", f"data.train={data / 'train'}",
            f"optim.max_steps={args.checkpointing_steps}", "optim.warmup_steps=1",
            f"data.batch_size={args.checkpointing_batch}", f"train.grad_checkpointing={flag}", "loss.triplet_weight=0"])
        lines.append({"bench": "finetune", "variant": f"grad_checkpointing={flag}",
                      "model": args.checkpointing_model, "batch": args.checkpointing_batch,
                      "peak_memory_gb": round(report["peak_memory_bytes"] / 1e9, 3), "memory": report["peak_memory"],
                      "steps_per_s": report["steps_per_s"]})
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="vclr-demo/run", help="the 'published' model: a vclr run")
    parser.add_argument("--base-task", default="shapes", help="its own task's test set (a benchmark dataset)")
    parser.add_argument("--data", default="data/fashion-mnist-5k", help="the new task: a prepared dataset with "
                                                                        "train/ and test/ (class names for zero-shot)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4, help="full fine-tuning's learning rate (LoRA: 10x)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--alphas", default="0.25,0.5,0.75", help="WiSE-FT alphas between the base and `full`")
    parser.add_argument("--checkpointing-model", default="ViT-B-32")
    parser.add_argument("--checkpointing-batch", type=int, default=32)
    parser.add_argument("--checkpointing-steps", type=int, default=3)
    parser.add_argument("--work", default="bench-finetune")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    from vclr.bench.matrix import benchmark
    from vclr.config import BenchmarkConfig
    from vclr.eval.wise_ft import save_wise_ft
    from vclr.export.backends import machine

    base, data, work = Path(args.base).resolve(), Path(args.data).resolve(), Path(args.work).resolve()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    reports, specs = {}, [f"base={base}"]
    lrs = {name: args.lr * (LORA_LR_SCALE if name.startswith("lora") else 1) for name in variants}
    for name in variants:
        extra, checkpoint = VARIANTS[name]
        reports[name] = _train(work / name, base, data, args, extra, lrs[name])
        specs.append(f"{name}={work / name}" + ("@ema" if checkpoint == "ema" else ""))
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()] if "full" in variants else []
    for alpha in alphas:
        specs.append(f"wise{alpha:g}={save_wise_ft(str(base), str(work / 'full'), alpha, work / f'wise-{alpha:g}')}")
    rows = benchmark(specs, [args.base_task, str(data / "test")], work / "benchmark",
                     settings=BenchmarkConfig(bootstrap=args.bootstrap))
    figures = _figures(rows, args.base_task, f"{data.name}/test")
    reference, host = figures["base"], machine()
    for label in ["base", *variants, *(f"wise{a:g}" for a in alphas)]:
        # WiSE-FT costs what the full fine-tuning it interpolates cost (the interpolation itself is free)
        trained = "full" if label.startswith("wise") else label
        report = reports.get(trained, {})
        line = {"bench": "finetune", "variant": label, **figures.get(label, {}),
                "new_task_gain": round(figures.get(label, {}).get("new_task", 0) - reference["new_task"], 2),
                "base_task_loss": round(reference["base_task"] - figures.get(label, {}).get("base_task", 0), 2),
                "steps": args.steps, "batch": args.batch}
        if trained in reports:
            line.update(lr=lrs[trained],
                        trainable_parameters=report.get("trainable_parameters"),
                        total_parameters=report.get("total_parameters"),
                        peak_memory_gb=round(report.get("peak_memory_bytes", 0) / 1e9, 3),
                        steps_per_s=report.get("steps_per_s"))
        print(json.dumps({**line, **host}), flush=True)
    if args.checkpointing_steps:
        for line in checkpointing_memory(work, data, args):
            print(json.dumps({**line, **host}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
