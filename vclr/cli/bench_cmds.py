"""`vclr benchmark`: models x datasets x tasks into one table, CLIP_benchmark's figures with intervals, and paired
comparisons between two models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SETTING_FLAGS = {  # flag -> BenchmarkConfig field
    "batch_size": "batch_size", "workers": "num_workers", "bootstrap": "bootstrap", "seed": "seed",
    "fewshot_k": "fewshot_k", "lp_epochs": "lp_epochs", "lp_lr": "lp_lr", "lp_val_proportion": "lp_val_proportion",
    "failures": "failures",
}


def add_benchmark_arguments(p) -> None:
    p.add_argument("--model", action="append", default=[], metavar="SPEC",
                   help="[LABEL=]SPEC, repeatable: a run dir (DIR or DIR@best), an open_clip NAME[,PRETRAINED] "
                        "(tag or weights file, as CLIP_benchmark writes it) or hf-hub:org/repo")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME",
                   help="repeatable: a path (split folder, dataset folder, CLIP_benchmark webdataset layout, shard "
                        "folder), one of vclr's names (fashion-mnist, openmoji, shapes) or CLIP_benchmark's (cifar10, "
                        "mscoco_captions, wds/NAME ...)")
    p.add_argument("--out", required=True, help="results folder (results.jsonl/csv/md, plots, caches; reruns reuse it)")
    p.add_argument("--task", action="append", default=[], metavar="TASK",
                   help="auto (each dataset's own), zeroshot_classification, retrieval, linear_probe, "
                        "compositionality, multilingual_retrieval; repeatable (default: auto)")
    p.add_argument("--dataset-root", help="where CLIP_benchmark-named datasets lie: a folder or a template with "
                                          "{dataset} / {dataset_cleaned}, as CLIP_benchmark's --dataset_root "
                                          "(default: the hub's clip-benchmark/wds_* copies)")
    p.add_argument("--language", action="append", default=[], help="caption languages of CLIP_benchmark's "
                                                                   "multilingual sets (default: en)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="paired difference B - A of two models' figures (labels) with interval and p-value")
    p.add_argument("--batch-size", type=int, help="embedding batch (default 64, CLIP_benchmark's)")
    p.add_argument("--workers", type=int, help="image decoding workers (default 0)")
    p.add_argument("--bootstrap", type=int, help="resamples behind each 95%% interval (default 1000; 0: none)")
    p.add_argument("--seed", type=int, help="bootstrap, linear probe and split seed (default 0)")
    p.add_argument("--fewshot-k", type=int, help="linear probe: examples per class (default -1: all)")
    p.add_argument("--lp-epochs", type=int, help="linear probe epochs (default 10)")
    p.add_argument("--lp-lr", type=float, help="linear probe learning rate (default 0.1)")
    p.add_argument("--lp-val-proportion", type=float,
                   help="share of train that picks the weight decay when a dataset has no val split (default 0.2)")
    p.add_argument("--failures", type=int, help="worst misses per failure sheet (default 8)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")


def _settings(args):
    from vclr.config import BenchmarkConfig

    given = {field: getattr(args, flag) for flag, field in SETTING_FLAGS.items() if getattr(args, flag) is not None}
    return dataclasses.replace(BenchmarkConfig(), **given)


def cmd_benchmark(args) -> int:
    from vclr.bench.matrix import benchmark, compare
    from vclr.bench.report import markdown_tables, write_comparison
    from vclr.errors import VclrError

    out = Path(args.out)
    rows = []
    if args.model or args.dataset:
        rows = benchmark(args.model, args.dataset, out, tasks=tuple(args.task or ["auto"]),
                         dataset_root=args.dataset_root, languages=tuple(args.language or ["en"]),
                         settings=_settings(args))
        if args.json:
            print("".join(json.dumps({k: v for k, v in r.items() if k != "failures"}) + "\n" for r in rows), end="")
        else:
            print(markdown_tables(rows))
    elif not args.compare:
        raise VclrError("give --model and --dataset (each repeatable), or --compare A B on an earlier --out")
    if args.compare:
        diffs = compare(out, *args.compare, resamples=args.bootstrap, seed=args.seed or 0)
        text = write_comparison(out, diffs)
        print(text if not args.json else "".join(json.dumps(d) + "\n" for d in diffs), end="")
    failed = [r for r in rows if "error" in r]
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.jsonl'}, {out / 'report.html'}"
          + (f"; comparison: {out / 'compare.md'}" if args.compare else ""))
    if failed:
        print(f"{len(failed)} of {len(rows)} cells failed (see above and results.md)")
        return 1
    return 0
