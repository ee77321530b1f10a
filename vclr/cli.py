"""The `vclr` command. One function per subcommand; `main(argv)` returns the exit code (tests call it directly).

    vclr demo                                  # generate data, train, index, evaluate, search: all on CPU
    vclr train --config configs/demo.yaml optim.lr=0.001
    vclr search --index vclr-demo/index --text "a large red circle on the left" -k 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from vclr.config import INDEX_CHOICES, VclrError, load_config

logger = logging.getLogger("vclr")

DEMO_CONFIG = "demo"  # the built-in configs/demo.yaml, shipped in the package


def _print_hits(hits) -> None:
    for hit in hits:
        print(f"{hit.rank:>3}  {hit.score:+.4f}  {hit.value}")


def _parse_ks(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise VclrError(f"--ks must be comma-separated integers such as 1,5,10, got {text!r}") from None


def add_model_arguments(p, required: bool = True) -> None:
    """The model that embeds: a vclr run, or any open_clip model config with optional weights."""
    default = "" if required else " (default: the model the index was built with)"
    p.add_argument("--run", help=f"a vclr training run dir{default}")
    p.add_argument("--model", help="an open_clip model config instead of a run, e.g. ViT-B-32 or hf-hub:org/repo "
                                   "(`vclr models` lists them)")
    p.add_argument("--pretrained", help="with --model: an open_clip pretrained tag (downloads), or a local checkpoint "
                                        "(.pt/.bin/.safetensors, open_clip's or a vclr model.safetensors)")
    p.add_argument("--checkpoint", choices=["final", "best"], default="final",
                   help="with --run: the final weights, or those at the best validation figure (checkpoints/best)")


def _model_source(args, required: bool = True):
    """The model source the flags name; None (the index's own) when they name none and none is required."""
    from vclr.model_source import model_source

    if not required and not (args.run or args.model or args.pretrained):
        return None
    return model_source(args.run, args.model, args.pretrained, checkpoint=getattr(args, "checkpoint", "final"))


# ---------------------------------------------------------------------------------------------------- subcommands


def add_make_synthetic_arguments(p) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=20000, help="train images")
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def cmd_make_synthetic(args) -> int:
    from vclr.data.synthetic import make_synthetic

    try:
        out = make_synthetic(args.out, args.train, args.test, args.image_size, args.seed)
    except ValueError as e:
        raise VclrError(str(e)) from None
    print(f"wrote {args.train} train and {args.test} test images to {out}")
    return 0


PREPARE_DATASETS = {  # name: (help, example)
    "karpathy": ("Flickr30k / COCO Karpathy split JSON + image folder",
                 "vclr prepare karpathy --json dataset_flickr30k.json --images flickr30k-images --out data/f30k"),
    "fashion-mnist": ("Fashion-MNIST from Debian's dataset-fashion-mnist",
                      "vclr prepare fashion-mnist --out data/fashion-mnist"),
    "openmoji": ("OpenMoji colour emoji (npm package openmoji) with name captions",
                 "vclr prepare openmoji --out data/openmoji --size 64 --skin-tones drop"),
    "webdataset": ("a folder of webdataset .tar shards (key.jpg + key.txt/.json)",
                   "vclr prepare webdataset --shards shards/ --out data/web"),
    "folder": ("a folder of images + a CSV/JSONL/parquet table of captions",
               "vclr prepare folder --images photos/ --captions captions.csv --out data/photos"),
}


def add_prepare_arguments(p) -> None:
    datasets_sub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    parsers = {name: _add(datasets_sub, name, None, help_text, example)
               for name, (help_text, example) in PREPARE_DATASETS.items()}
    d = parsers["karpathy"]
    d.add_argument("--json", required=True, help="dataset_flickr30k.json or dataset_coco.json")
    d.add_argument("--images", required=True, help="folder holding the images (COCO: the folder above train2014/)")
    d.add_argument("--out", required=True)
    d.add_argument("--keep-restval", action="store_true", help="keep COCO's restval as its own split")
    d = parsers["fashion-mnist"]
    d.add_argument("--out", required=True)
    d.add_argument("--source", help="folder with the IDX .gz files (default: the Debian package's, fetched if absent)")
    d.add_argument("--limit", type=int, help="at most this many images per split")
    d = parsers["openmoji"]
    d.add_argument("--out", required=True)
    d.add_argument("--source", help="unpacked npm package folder (default: npm pack into the cache)")
    d.add_argument("--size", type=int, default=64, help="PNG size in pixels")
    d.add_argument("--skin-tones", choices=("drop", "group", "keep"), default="drop",
                   help="skin-tone variants: drop them, group them with their base emoji, or keep each")
    d.add_argument("--test-fraction", type=float, default=0.2, help="share of concepts held out")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--limit", type=int, help="only the first N entries")
    d = parsers["webdataset"]
    d.add_argument("--shards", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--test-fraction", type=float, default=0.1)
    d.add_argument("--seed", type=int, default=0)
    d = parsers["folder"]
    d.add_argument("--images", required=True, help="image folder; the table's paths are relative to it")
    d.add_argument("--captions", required=True, help="the table")
    d.add_argument("--out", required=True)
    d.add_argument("--image-column", default="file_name")
    d.add_argument("--caption-columns", default="captions", help="comma-separated")
    d.add_argument("--test-fraction", type=float, default=0.1)
    d.add_argument("--seed", type=int, default=0)


def cmd_prepare(args) -> int:
    from vclr.data import prepare

    if args.dataset == "karpathy":
        counts = prepare.prepare_karpathy(args.json, args.images, args.out, restval_to_train=not args.keep_restval)
    elif args.dataset == "fashion-mnist":
        counts = prepare.prepare_fashion_mnist(args.out, args.source, args.limit)
    elif args.dataset == "webdataset":
        counts = prepare.prepare_webdataset(args.shards, args.out, args.test_fraction, args.seed)
    elif args.dataset == "openmoji":
        counts = prepare.prepare_openmoji(args.out, args.source, args.size, args.skin_tones, args.test_fraction,
                                          args.seed, args.limit)
    else:
        counts = prepare.prepare_folder(args.images, args.captions, args.out, args.image_column,
                                        tuple(c.strip() for c in args.caption_columns.split(",") if c.strip()),
                                        args.test_fraction, args.seed)
    print(f"wrote {', '.join(f'{n} {split}' for split, n in counts.items())} images' metadata under {args.out}")
    return 0


def add_train_arguments(p) -> None:
    p.add_argument("--config", help="YAML config: a file, or a built-in name such as demo (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.001")


def cmd_train(args) -> int:
    from vclr.train import end_distributed, train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    end_distributed()
    if result.main_process:  # under `accelerate launch`, one report, not one per process
        print(f"trained {result.step} steps in {result.elapsed_s:.0f}s, loss {result.first_loss:.4f} -> "
              f"{result.last_loss:.4f}; run dir {result.run_dir}")
    return 0


def add_index_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--data", help="a folder of images (any tree; captions optional: name.txt beside name.jpg) or a "
                                  "prepared dataset (default: the run's data.test)")
    p.add_argument("--out", required=True, help="index dir to write; an existing index of the same model and data "
                                                "is brought up to date (new, changed and removed files only)")
    p.add_argument("--rebuild", action="store_true", help="build afresh even if --out holds an up-to-date index")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images (default 0: in "
                                                          "the main process)")
    p.add_argument("--batch-size", type=int, default=0, help="images per embedding batch (default: the config's, 512)")
    p.add_argument("--max-ram-gb", type=float, default=4.0, help="embeddings beyond this stream to memory-mapped "
                                                                 "files beside the index (default 4)")
    p.add_argument("--index-type", choices=INDEX_CHOICES, default="auto",
                   help="auto: exact up to 50k items, else every type that fits the memory budget is built and "
                        "measured, and the fastest one meeting --recall-target is kept (exact search included)")
    p.add_argument("--recall-target", type=float, default=0.95,
                   help="recall@10 vs exact search, measured with cross-modal queries (default 0.95)")
    p.add_argument("--memory-budget-gb", type=float, default=0.0, help="index memory budget (0 = no limit)")


def _end_launch() -> None:
    """Under a multi-process launch: wait for every process, then tear the process group down."""
    from vclr.embed_shards import launched_processes, process_state

    if launched_processes() > 1:
        state = process_state()
        state.wait_for_everyone()
        state.destroy_process_group()


def cmd_index(args) -> int:
    from vclr.index import IndexOptions
    from vclr.search import build_index

    options = IndexOptions(kind=args.index_type, recall_target=args.recall_target,
                           memory_budget_gb=args.memory_budget_gb)
    if min(args.workers, args.batch_size, args.max_ram_gb) < 0:
        raise VclrError(f"--workers, --batch-size and --max-ram-gb must be >= 0, got {args.workers}, "
                        f"{args.batch_size} and {args.max_ram_gb}")
    update = build_index(_model_source(args), args.data, args.out, options, rebuild=args.rebuild,
                         workers=args.workers, batch_size=args.batch_size,
                         in_memory_max_bytes=int(args.max_ram_gb * 2**30))
    _end_launch()
    if update.index is None:  # under `accelerate launch`, process 0 reports
        return 0
    manifest = update.index.manifest
    live_images = manifest["num_images"] - manifest["deleted_images"]
    print(f"indexed {live_images} images and {manifest['num_texts'] - manifest['deleted_texts']} captions "
          f"(dim {manifest['dim']}) into {args.out}: "
          + ("a fresh build" if update.rebuilt else f"{update.added} added, {update.changed} changed, "
                                                     f"{update.removed} removed, {update.unchanged} unchanged"))
    if update.unreadable:
        print(f"  {len(update.unreadable)} unreadable files skipped (listed in {Path(args.out) / 'manifest.json'}"
              f" under unreadable_files), e.g. {update.unreadable[0]}")
    for modality, tuning in manifest["index"].items():
        setting = f", {tuning['param']}={tuning['value']}" if tuning["param"] else ""
        print(f"  {modality:<7}{tuning['factory']}{setting}: cross-modal recall@{tuning['k']} "
              f"{tuning['recall']:.3f}, {tuning['qps']:.0f} queries/s")
    return 0


def add_index_add_arguments(p) -> None:
    p.add_argument("--index", required=True)
    p.add_argument("--data", required=True)
    add_model_arguments(p, required=False)


def cmd_index_add(args) -> int:
    from vclr.search import add_to_index

    images, captions = add_to_index(args.index, args.data, _model_source(args, required=False))
    print(f"added {images} images and {captions} captions to {args.index}")
    return 0


def add_index_delete_arguments(p) -> None:
    p.add_argument("--index", required=True)
    p.add_argument("--image-ids")
    p.add_argument("--text-ids")


def cmd_index_delete(args) -> int:
    from vclr.search import delete_from_index

    if not args.image_ids and not args.text_ids:
        raise VclrError("nothing to delete: pass --image-ids and/or --text-ids (comma-separated)")
    counts = delete_from_index(args.index, _parse_ids(args.image_ids, "--image-ids"),
                               _parse_ids(args.text_ids, "--text-ids"))
    print(f"{args.index}: {counts['deleted_images']} of {counts['num_images']} images and "
          f"{counts['deleted_texts']} of {counts['num_texts']} captions deleted")
    return 0


def _parse_ids(text: str | None, flag: str) -> list[int]:
    try:
        return [int(v) for v in (text or "").split(",") if v.strip()]
    except ValueError:
        raise VclrError(f"{flag} must be comma-separated integer ids, got {text!r}") from None


def add_serve_arguments(p) -> None:
    from vclr.query_limits import ServiceLimits

    defaults = ServiceLimits()
    p.add_argument("--index", required=True)
    add_model_arguments(p, required=False)
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="torch: the model (or the index's traced text tower); onnx: an export made by `vclr export`, "
                        "answered with onnxruntime alone (no PyTorch needed)")
    p.add_argument("--onnx", metavar="DIR", help="with --backend onnx: the export folder (`vclr export --out DIR`)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mmap", action="store_true", help="memory-map the index instead of reading it into RAM")
    p.add_argument("--api-key", default=os.environ.get("VCLR_API_KEY"),
                   help="require this key (X-API-Key header) on every API request (default: $VCLR_API_KEY; none)")
    p.add_argument("--rate-limit", type=float, default=0.0, metavar="PER_SECOND",
                   help="requests a second allowed per client address, bursts of twice that (default 0: no limit)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="URL",
                   help="let pages from this origin call the API (repeatable; default none: CORS off)")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch, help="queries embedded and searched together")
    p.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                   help="how long a lone query waits for others to join its batch")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue,
                   help="waiting queries beyond this are answered 503 (try again) at once")
    p.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds before a query gets 503")
    p.add_argument("--cache-size", type=int, default=defaults.cache_size, help="text query embeddings kept (LRU)")
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help="compute threads for the model and FAISS (default 0: one per core)")
    p.add_argument("--reload-every", type=float, default=defaults.reload_every_s, metavar="SECONDS",
                   help="check the index folder for a new save this often and swap it in (0: never)")


def cmd_serve(args) -> int:
    from vclr.query_limits import ServiceLimits
    from vclr.serve import Access, exposure_warning, serve

    if not 0 < args.port < 65536:
        raise VclrError(f"--port must be 1..65535, got {args.port}")
    if args.backend == "onnx" and not args.onnx:
        raise VclrError("--backend onnx needs --onnx DIR: the folder written by `vclr export --format onnx --out DIR`")
    if args.backend == "onnx" and (args.run or args.model):
        raise VclrError("--backend onnx answers with the export in --onnx; --run/--model name a PyTorch model")
    if args.rate_limit < 0:
        raise VclrError(f"--rate-limit must be >= 0 (0: no limit), got {args.rate_limit}")
    limits = ServiceLimits(args.max_batch, args.batch_wait_ms, args.max_queue, args.timeout, args.cache_size,
                           args.threads, args.reload_every)
    access = Access(args.api_key or None, args.rate_limit, tuple(args.cors_origin))
    warning = exposure_warning(args.host, access)
    if warning:
        print(warning, file=sys.stderr)
    print(f"serving {args.index} on http://{args.host}:{args.port}  (Ctrl-C stops)")
    serve(args.index, _model_source(args, required=False), args.host, args.port, args.mmap, limits, access,
          onnx_dir=args.onnx if args.backend == "onnx" else None)
    return 0


def add_export_arguments(p) -> None:
    add_model_arguments(p, required=False)
    p.add_argument("--index", help="export the model this index was built with (instead of --run/--model)")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, help="the export folder: text.onnx, image.onnx, tokenizer.json, "
                                                "export.json (preprocessing, model identity, checksums)")


def cmd_export(args) -> int:
    from vclr.export_onnx import export_onnx

    if args.index and (args.run or args.model):
        raise VclrError("pass either --index (its model) or --run/--model, not both")
    source = _model_source(args, required=False)
    if source is None and not args.index:
        raise VclrError("name the model to export: --run DIR, --model NAME [--pretrained TAG|FILE], or --index DIR")
    report = export_onnx(source, args.out, index_dir=args.index)
    print(f"exported {report['model']} to {args.out}: text and image towers as ONNX (dynamic batch), checked "
          f"against PyTorch: cosine >= {report['min_cosine']:.6f}")
    return 0


def add_search_arguments(p) -> None:
    p.add_argument("--index", required=True)
    p.add_argument("--text", help="text -> images")
    p.add_argument("--image", help="image file -> captions, or images when the index has no captions (or --images)")
    p.add_argument("--like", type=int, metavar="ID", help="indexed image id -> the images most like it")
    p.add_argument("--images", action="store_true", help="with --image: return images even if there are captions")
    p.add_argument("-k", type=int, default=5)
    add_model_arguments(p, required=False)
    p.add_argument("--json", action="store_true", help="print the hits as a JSON list: rank, score, id and path "
                                                       "(images) or caption (captions)")


def cmd_search(args) -> int:
    from vclr.query_limits import check_k, check_text_query

    if sum(x is not None for x in (args.text, args.image, args.like)) != 1:
        raise VclrError("give exactly one of --text, --image or --like")
    if args.text is not None:
        check_text_query(args.text)
    if args.image is not None and not Path(args.image).is_file():
        raise VclrError(f"query image {args.image} does not exist")
    check_k(args.k)  # every argument is checked before anything heavy is imported or loaded
    from vclr.search import Searcher

    # a text query needs only the index's own text tower; the model is loaded if the query needs it
    searcher = Searcher.open(args.index, _model_source(args, required=False), load_model=False)
    if args.text is not None:
        hits = searcher.by_text(args.text, args.k)
    elif args.image is not None:
        hits = searcher.by_image_file(args.image, args.k, images=args.images or None)
    else:
        hits = searcher.like(args.like, args.k)
    if args.json:
        print(json.dumps([hit.to_json() for hit in hits]))
    else:
        _print_hits(hits)
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
    from vclr.evaluate import evaluate_run, format_metrics_table

    ks = _parse_ks(args.ks) if args.ks else None
    source = _model_source(args)
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
    from vclr.evaluate import zero_shot_run

    source = _model_source(args)
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
    from vclr.sweep import SWEEP_METRICS, format_table, run_sweep

    result = run_sweep(args.config, args.grid, args.out, args.overrides)
    print(format_table(list(result["grid"]), result["rows"]), end="")
    print(f"sweep: {Path(args.out) / 'sweep.json'}, {Path(args.out) / 'sweep.md'}, {Path(args.out) / 'sweep.png'}"
          f" ({', '.join(SWEEP_METRICS)})")
    return 0


def add_models_arguments(p) -> None:
    pass  # no options


def cmd_models(args) -> int:
    from vclr.model import list_models

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
    from vclr.evaluate import evaluate_run, format_metrics_table
    from vclr.search import build_index, search_by_text
    from vclr.rundir import MODEL_FILE, latest_checkpoint
    from vclr.train import train

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
    _print_hits(search_by_text(index, query, 5))
    print(f"demo finished in {time.perf_counter() - start:.0f}s; report {out / 'eval.json'}")
    return 0


# ----------------------------------------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with vclr's error contract: one line on stderr (no usage block), exit status 2."""

    def error(self, message: str):
        print(f"vclr: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _add(sub, name: str, func, help_text: str, example: str, aliases: Sequence[str] = ()):
    parser = sub.add_parser(name, help=help_text, description=help_text, aliases=list(aliases),
                            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    if func is not None:
        parser.set_defaults(func=func)
    return parser


COMMANDS = [  # name, function, argument adder, help, example (aliases)
    ("demo", cmd_demo, add_demo_arguments, "generate data, train, index, evaluate and search, end to end",
     "vclr demo"),
    ("make-synthetic", cmd_make_synthetic, add_make_synthetic_arguments, "write the synthetic captioned-shapes dataset",
     "vclr make-synthetic --out data/shapes --train 20000 --test 1000"),
    ("prepare", cmd_prepare, add_prepare_arguments,
     "convert a dataset into vclr's standard format (images + metadata.jsonl)",
     "vclr prepare karpathy --json dataset_flickr30k.json --images flickr30k-images --out data/f30k"),
    ("train", cmd_train, add_train_arguments, "train a dual encoder",
     "vclr train --config configs/demo.yaml optim.lr=0.001"),
    ("index", cmd_index, add_index_arguments, "embed a dataset with a trained model and save a FAISS index",
     "vclr index --run vclr-demo/run --data vclr-demo/data/test --out vclr-demo/index", ["embed"]),
    ("index-add", cmd_index_add, add_index_add_arguments, "embed more data and add it to an index, without rebuilding",
     "vclr index-add --index vclr-demo/index --data data/more"),
    ("index-delete", cmd_index_delete, add_index_delete_arguments,
     "delete images (with their captions) or captions by id",
     "vclr index-delete --index vclr-demo/index --image-ids 3,17"),
    ("serve", cmd_serve, add_serve_arguments, "search service: JSON API and web page over an index",
     "vclr serve --index vclr-demo/index --port 8000"),
    ("export", cmd_export, add_export_arguments,
     "write a model's text and image towers as ONNX, for `vclr serve --backend onnx` without PyTorch",
     "vclr export --run vclr-demo/run --format onnx --out vclr-demo/onnx"),
    ("search", cmd_search, add_search_arguments, "search an index by text (-> images) or by image (-> captions)",
     "vclr search --index vclr-demo/index --text 'a red circle' -k 5"),
    ("eval", cmd_eval, add_eval_arguments, "retrieval recall@k both ways on a test set; writes a JSON report",
     "vclr eval --run vclr-demo/run --data vclr-demo/data/test --ks 1,5,10"),
    ("zero-shot", cmd_zero_shot, add_zero_shot_arguments,
     "zero-shot classification: images vs prompts of their class names",
     "vclr zero-shot --run runs/fmnist --data data/fashion-mnist/test --template 'a photo of a {}'"),
    ("sweep", cmd_sweep, add_sweep_arguments, "train + evaluate every point of a config grid; table and plot",
     "vclr sweep --config configs/demo.yaml --grid loss.triplet_margin=0.1,0.5,0.9 --out runs/margin"),
    ("models", cmd_models, add_models_arguments, "list model configs accepted by model.name", "vclr models"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vclr", description="Train, index, search and evaluate image-text retrieval models.",
                     epilog="example:\n  vclr demo", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors (and library logs)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' own logs (transformers, accelerate, datasets, open_clip)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, func, add_arguments, help_text, example, *aliases in COMMANDS:
        add_arguments(_add(sub, name, func, help_text, example, *aliases))
    return parser


LIBRARY_LOGGERS = ("transformers", "accelerate", "datasets", "httpx", "open_clip", "timm", "torch")


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    """vclr's own log at INFO (-q: warnings only). The libraries' chatter (transformers' weight LOAD REPORT tables,
    accelerate's notices) is hidden unless -v/--debug: vclr reports what matters in its own words."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vclr").setLevel(logging.WARNING if quiet else logging.INFO)
    library_level = logging.INFO if verbose else logging.ERROR
    if not verbose:
        # transformers sets its own level from this variable when it is first imported, which comes later
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for library in LIBRARY_LOGGERS:
        logging.getLogger(library).setLevel(library_level)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)  # open_clip logs through the root


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet, args.verbose or args.debug)
    try:
        return args.func(args)
    except VclrError as e:
        if args.debug:
            raise
        print(f"vclr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vclr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
