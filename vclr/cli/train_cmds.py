"""`vclr train`, `eval`, `zero-shot`, `sweep`, `models` and `demo`: the commands that train and evaluate models."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from vclr.cli.common import add_model_arguments, model_source_of, parse_ks, print_hits
from vclr.config import load_config

DEMO_CONFIG = "demo"  # the built-in configs/demo.yaml, shipped in the package


def add_train_arguments(p) -> None:
    p.add_argument("--config", help="YAML config: a file, or a built-in name such as demo (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.001")


def cmd_train(args) -> int:
    from vclr.train.loop import end_distributed, train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    end_distributed()
    if result.main_process:  # under `accelerate launch`, one report, not one per process
        print(f"trained {result.step} steps in {result.elapsed_s:.0f}s, loss {result.first_loss:.4f} -> "
              f"{result.last_loss:.4f}; run dir {result.run_dir}")
        if result.report:
            r = result.report
            memory = "peak CUDA memory" if r["peak_memory"].startswith("cuda") else "peak process memory"
            print(f"trainable parameters {r['trainable_parameters']:,} of {r['total_parameters']:,} "
                  f"({100 * r['trainable_share']:.2f}%), {memory} {r['peak_memory_bytes'] / 2**30:.2f} GiB, "
                  f"{r['steps_per_s']} steps/s")
    return 0


def add_eval_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--data", help="test dataset (default: the run's data.test)")
    p.add_argument("--ks", help="comma-separated k values (default: the run's eval.ks)")
    p.add_argument("--out", help="report path (default: RUN/eval-DATASET.json, or eval-DATASET-MODEL.json here with "
                                 "--model; plots beside it in a -plots folder)")
    p.add_argument("--plots", help="folder for the PNG plots (default: REPORT-plots/ beside the report)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--index", help="also score retrieval through this index: what the ANN index costs vs exact")
    p.add_argument("--label-column", help="class labels in the data: adds kNN classification and clustering")
    p.add_argument("--knn-train", help="labelled dataset the kNN votes come from (default: the run's data.train)")


def cmd_eval(args) -> int:
    from vclr.eval.evaluate import evaluate_run, format_metrics_table

    ks = parse_ks(args.ks) if args.ks else None
    source = model_source_of(args)
    # one report per dataset: evaluating on another dataset must not replace an earlier report
    out = Path(args.out or _default_report(args, f"eval-{_dataset_slug(args)}"))
    plots = None if args.no_plots else (args.plots or out.with_name(f"{out.stem}-plots"))
    report = evaluate_run(source, args.data, ks, out, plots, args.index, args.label_column, args.knn_train)
    print(format_metrics_table(report["metrics"], report["ks"]))
    if report.get("verification"):
        v = report["verification"]
        print(f"pair verification at similarity >= {v['threshold']:.3f} (chosen on a validation half): "
              f"precision {v['precision']:.2f}, recall {v['recall']:.2f}, F1 {v['f1']:.2f}")
    for key, value in report.get("ann_vs_exact", {}).items():
        if key != "index":
            print(f"  through the index {key}: {value['index']:.2f} vs exact {value['exact']:.2f} "
                  f"(cost {value['cost']:.2f})")
    if "classification" in report:
        c = report["classification"]
        print("classification: " + ", ".join(f"{k} {v:.2f}" for k, v in c.items()
                                              if isinstance(v, float)))
    print(f"report: {out}" + (f"; plots: {', '.join(report['plots'].values())}" if report.get("plots") else ""))
    return 0


def _dataset_slug(args) -> str:
    """A file-name-safe name of the dataset evaluated: its folder and split (`openmoji-test`), or table name."""
    data = args.data
    if not data and args.run:
        from vclr.rundir import load_run_config

        data = load_run_config(args.run).data.test
    path = Path(data or "test")
    parts = [path.parent.name, path.stem] if path.suffix or path.name in ("test", "val", "train", "validation") \
        else [path.name]
    return "-".join(p for p in parts if p).replace(" ", "_") or "test"


def _default_report(args, kind: str) -> Path:
    if args.run:
        return Path(args.run) / f"{kind}.json"
    return Path(f"{kind}-{args.model.replace('/', '_').replace(':', '_')}.json")


def add_zero_shot_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="dataset with a label column and a class-name column")
    p.add_argument("--label-column", default="label")
    p.add_argument("--name-column", default="class_name")
    p.add_argument("--template", action="append", help="prompt with {} for the class name; repeat to ensemble "
                                                        "(default: open_clip's ensemble for the dataset when it has "
                                                        "one, e.g. ImageNet's, else 'a photo of a {}')")
    p.add_argument("--out", help="report path (default: RUN/zero_shot.json, or zero_shot-MODEL.json here)")


def cmd_zero_shot(args) -> int:
    from vclr.eval.evaluate import zero_shot_run

    source = model_source_of(args)
    out = args.out or _default_report(args, "zero_shot")
    report = zero_shot_run(source, args.data, args.label_column, args.name_column, args.template, out)
    metrics = report["metrics"]
    print(f"zero-shot on {report['num_images']} images, {len(report['classes'])} classes: "
          + ", ".join(f"{k.split('_')[-1]} {v:.2f}" for k, v in metrics.items() if "/" not in k))
    for name in report["classes"]:
        if f"zero_shot_top1/{name}" in metrics:
            print(f"  {name:<24}{metrics[f'zero_shot_top1/{name}']:>7.2f}")
    print(f"report: {out}")
    return 0


def add_sweep_arguments(p) -> None:
    p.add_argument("--config", help="base YAML config")
    p.add_argument("--grid", action="append", default=[], required=True, metavar="key=v1,v2,...",
                   help="a swept config key and its values; repeat for a product grid")
    p.add_argument("--out", required=True, help="folder for the runs, sweep.json/.md/.png")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every point")


def cmd_sweep(args) -> int:
    from vclr.eval.sweep import SWEEP_METRICS, format_table, run_sweep

    result = run_sweep(args.config, args.grid, args.out, args.overrides)
    print(format_table(list(result["grid"]), result["rows"]), end="")
    print(f"sweep: {Path(args.out) / 'sweep.json'}, {Path(args.out) / 'sweep.md'}, {Path(args.out) / 'sweep.png'}"
          f" ({', '.join(SWEEP_METRICS)})")
    return 0


def add_models_arguments(p) -> None:
    pass  # no options


def cmd_models(args) -> int:
    from vclr.model.build import list_models

    print("\n".join(list_models()))
    return 0


def add_demo_arguments(p) -> None:
    p.add_argument("--out", default="vclr-demo", help="folder for data, run, index and report (default vclr-demo)")
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train again even if the folder holds a trained model")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.max_steps=100")


def cmd_demo(args) -> int:
    """generate -> train -> index -> eval -> one search, under args.out; reuses finished steps when re-run."""
    from vclr.data.synthetic import make_synthetic
    from vclr.eval.evaluate import evaluate_run, format_metrics_table
    from vclr.index.build import build_index
    from vclr.rundir import MODEL_FILE, latest_checkpoint
    from vclr.search.searcher import search_by_text
    from vclr.train.loop import train

    out = Path(args.out)
    data, run, index = out / "data", out / "run", out / "index"
    start = time.perf_counter()
    if not (data / "test" / "metadata.jsonl").is_file():
        print(f"[1/5] generating the synthetic shapes dataset in {data}")
        make_synthetic(data, args.train_images, args.test_images, seed=args.seed)
    else:
        print(f"[1/5] reusing the dataset in {data}")
    cfg = load_config(DEMO_CONFIG, [f"data.train={data / 'train'}", f"data.test={data / 'test'}",
                                    f"train.output_dir={run}", f"train.seed={args.seed}", *args.overrides])
    if (run / MODEL_FILE).is_file() and not args.retrain:
        print(f"[2/5] reusing the trained model in {run} (--retrain to train again)")
    else:
        budget = f", fitted to {cfg.train.max_minutes} min" if cfg.train.max_minutes else ""
        print(f"[2/5] training {cfg.model.name} for up to {cfg.optim.max_steps} steps{budget}")
        resume = latest_checkpoint(run) is not None and not args.retrain
        if args.retrain and run.exists():
            shutil.rmtree(run)
        result = train(cfg, resume=resume)
        print(f"      {result.step} steps in {result.elapsed_s:.0f}s, loss {result.first_loss:.3f} -> "
              f"{result.last_loss:.3f}")
    print(f"[3/5] indexing the test split into {index}")
    built = build_index(run, str(data / "test"), index).index  # re-runs: only what changed (nothing, or all)
    print("[4/5] evaluating retrieval on the held-out test split")
    report = evaluate_run(run, str(data / "test"), out=out / "eval.json", plots_dir=out / "plots")
    print(format_metrics_table(report["metrics"], report["ks"]))
    query, truth = built.texts[0], built.image_paths[built.caption_image[0]]  # a held-out caption and its image
    print(f"[5/5] vclr search --index {index} --text {query!r} -k 5    (its own image: {Path(truth).name})")
    print_hits(search_by_text(index, query, 5))
    print(f"demo finished in {time.perf_counter() - start:.0f}s; report {out / 'eval.json'}")
    return 0
