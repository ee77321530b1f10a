"""`vclr index`, `index-add`, `index-delete`, `search`, `serve` and `export`: the commands over indexes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vclr.cli.common import add_model_arguments, flags_for, model_source_of, print_hits
from vclr.errors import VclrError
from vclr.index.kinds import INDEX_CHOICES


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
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                   help="what runs the towers: torch (the model), onnx (its ONNX export, made once and cached), or "
                        "auto: the fastest on this machine that keeps quality (torch below 1,000 images or on CUDA)")
    p.add_argument("--int8", action="store_true",
                   help="with --backend onnx: int8 towers, checked first on a sample of the collection against fp32 "
                        "(cosine and top-10 neighbours); fp32 embeds instead where they fall short")
    p.add_argument("--ocr", action="store_true",
                   help="also read the text in each image (Tesseract), so that searches find scans, screenshots and "
                        "signs by their words; kept up to date on later re-indexes")
    p.add_argument("--json", action="store_true", help="print what was done as one JSON object (added, changed, "
                                                       "moved, removed, unchanged, unreadable...)")


def _end_launch() -> None:
    """Under a multi-process launch: wait for every process, then tear the process group down."""
    from vclr.embed.processes import launched_processes, process_state

    if launched_processes() > 1:
        state = process_state()
        state.wait_for_everyone()
        state.destroy_process_group()


def cmd_index(args) -> int:
    from vclr.index.build import build_index
    from vclr.index.format import IndexOptions

    options = IndexOptions(kind=args.index_type, recall_target=args.recall_target,
                           memory_budget_gb=args.memory_budget_gb)
    if min(args.workers, args.batch_size, args.max_ram_gb) < 0:
        raise VclrError(f"--workers, --batch-size and --max-ram-gb must be >= 0, got {args.workers}, "
                        f"{args.batch_size} and {args.max_ram_gb}")
    source = model_source_of(args)
    chooser = None
    if args.backend != "torch" or args.int8:
        from vclr.export.backends import choose_towers

        def chooser(paths, loaded):
            return choose_towers(source, paths, loaded, backend=args.backend, int8=args.int8)
    update = build_index(source, args.data, args.out, options, rebuild=args.rebuild, workers=args.workers,
                         batch_size=args.batch_size, in_memory_max_bytes=int(args.max_ram_gb * 2**30), towers=chooser,
                         ocr=args.ocr)
    _end_launch()
    if update.index is None:  # under `accelerate launch`, process 0 reports
        return 0
    manifest = update.index.manifest
    live_images = manifest["num_images"] - manifest["deleted_images"]
    if args.json:
        print(json.dumps(_update_report(update, args.out)))
        return 0
    copies = f" ({update.copies} copies of indexed files)" if update.copies else ""
    print(f"indexed {live_images} images and {manifest['num_texts'] - manifest['deleted_texts']} captions "
          f"(dim {manifest['dim']}) into {args.out}: "
          + ("a fresh build" if update.rebuilt else
             f"{update.added} added{copies}, {update.changed} changed, {update.moved} moved, {update.removed} "
             f"removed, {update.unchanged} unchanged; {update.embedded} embedded"))
    if update.words_read:
        print(f"  read the text in {update.words_read} images (OCR): searches find them by their words")
    choice = update.backend_choice
    if choice is not None:
        print(f"  embedded with {choice.backend} {choice.precision}: {choice.reason}{_guard_note(choice.guard)}")
    if update.unreadable:
        print(f"  {len(update.unreadable)} unreadable files skipped (listed in {Path(args.out) / 'manifest.json'}"
              f" under unreadable_files), e.g. {update.unreadable[0]}")
    for modality, tuning in manifest["index"].items():
        setting = f", {tuning['param']}={tuning['value']}" if tuning["param"] else ""
        print(f"  {modality:<7}{tuning['factory']}{setting}: cross-modal recall@{tuning['k']} "
              f"{tuning['recall']:.3f}, {tuning['qps']:.0f} queries/s")
    return 0


def _guard_note(guard: dict | None) -> str:
    """What the int8 guard measured, for the index report."""
    if guard is None:
        return ""
    if "export_check" in guard:  # refused before any of the collection's images was compared
        return f"; the int8 export failed its own check (cosine {guard['min_cosine']:.4f} on its probes)"
    return (f"; int8 against fp32 on {guard['sample']} of its images: cosine >= {guard['min_cosine']:.4f}, top-10 "
            f"overlap {guard['top10_overlap']:.2f}")


def _update_report(update, out: str) -> dict:
    manifest = update.index.manifest
    report = {"index": str(out), "rebuilt": update.rebuilt,
              "images": manifest["num_images"] - manifest["deleted_images"],
              "captions": manifest["num_texts"] - manifest["deleted_texts"], "dim": manifest["dim"]}
    report.update({name: getattr(update, name) for name in ("added", "changed", "moved", "removed", "unchanged",
                                                            "copies", "embedded", "words_read")})
    report["unreadable"] = list(update.unreadable)
    choice = update.backend_choice
    if choice is not None:
        report["embedder"] = {"backend": choice.backend, "precision": choice.precision, "reason": choice.reason}
    return report


def add_index_add_arguments(p) -> None:
    p.add_argument("--index", required=True)
    p.add_argument("--data", required=True)
    add_model_arguments(p, required=False)


def cmd_index_add(args) -> int:
    from vclr.index.build import add_to_index

    images, captions = add_to_index(args.index, args.data, model_source_of(args, required=False))
    print(f"added {images} images and {captions} captions to {args.index}")
    return 0


def add_index_delete_arguments(p) -> None:
    p.add_argument("--index", required=True)
    p.add_argument("--image-ids")
    p.add_argument("--text-ids")


def cmd_index_delete(args) -> int:
    from vclr.index.build import delete_from_index

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
    from vclr.search.limits import ServiceLimits

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
    from vclr.search.limits import ServiceLimits
    from vclr.serve.app import Access, exposure_warning, serve

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
        print(flags_for(warning), file=sys.stderr)
    print(f"serving {args.index} on http://{args.host}:{args.port}  (Ctrl-C stops)")
    serve(args.index, model_source_of(args, required=False), args.host, args.port, args.mmap, limits, access,
          onnx_dir=args.onnx if args.backend == "onnx" else None)
    return 0


def add_export_arguments(p) -> None:
    add_model_arguments(p, required=False)
    p.add_argument("--index", help="export the model this index was built with (instead of --run/--model)")
    p.add_argument("--format", choices=["onnx", "open_clip"], default="onnx",
                   help="onnx: towers for `vclr serve --backend onnx`; open_clip: open_clip's hub layout, loaded by "
                        "open_clip.create_model_and_transforms('local-dir:OUT') (or hf-hub: after --push-to-hub)")
    p.add_argument("--out", required=True, help="the export folder (onnx: text.onnx, image.onnx, tokenizer.json, "
                                                "export.json; open_clip: open_clip_config.json and the weights; "
                                                "--merge-lora: a run dir)")
    p.add_argument("--merge-lora", action="store_true",
                   help="write the run again with its LoRA adapters merged into plain weights (a run dir at --out)")
    p.add_argument("--push-to-hub", metavar="REPO", help="with --format open_clip: also upload the folder to the "
                                                        "Hugging Face hub as REPO (needs the network and a token)")
    p.add_argument("--int8", action="store_true",
                   help="quantise both towers to int8 (onnxruntime dynamic quantisation): several times faster on "
                        "CPUs with int8 dot-product units (AVX-512 VNNI, AVX-VNNI, AMX, ARM dotprod), approximate")


def cmd_export(args) -> int:
    from vclr.export.onnx import export_onnx

    if args.index and (args.run or args.model):
        raise VclrError("pass either --index (its model) or --run/--model, not both")
    source = model_source_of(args, required=False)
    if source is None and not args.index:
        raise VclrError("name the model to export: --run DIR, --model NAME [--pretrained TAG|FILE], or --index DIR")
    if args.merge_lora or args.format == "open_clip":
        return _export_plain(args, source)
    report = export_onnx(source, args.out, index_dir=args.index, int8=args.int8)
    print(f"exported {report['model']} to {args.out}: text and image towers as {report['precision']} ONNX (dynamic "
          f"batch), checked against PyTorch: cosine >= {report['min_cosine']:.6f}")
    return 0


def _export_plain(args, source) -> int:
    """--merge-lora (a plain run) and --format open_clip (open_clip's hub layout)."""
    if source is None:
        from vclr.export.onnx import index_source

        source = index_source(args.index)
    if args.merge_lora:
        from vclr.model.lora import save_merged_run

        report = save_merged_run(source, args.out)
        print(f"merged the LoRA adapters of {report['model']} into plain weights: run dir {report['out']}")
        return 0
    from vclr.export.open_clip import export_open_clip

    report = export_open_clip(source, args.out, repo=args.push_to_hub)
    checked = f"; open_clip embeds it within {report['max_difference']:.1e} of vclr" \
        if report["max_difference"] is not None else ""
    print(f"exported {report['model']} to {report['out']} in open_clip's layout (open_clip.create_model_and_"
          f"transforms('local-dir:{report['out']}')){checked}" + (f"; uploaded to {report['repo']}" if report["repo"]
                                                                 else ""))
    return 0


def add_search_arguments(p) -> None:
    p.add_argument("--index", required=True)
    p.add_argument("--text", action="append", default=[], metavar="[W:]TEXT",
                   help="what to look for; repeat to combine, weight with a prefix: --text 2:dog (default weight 1)")
    p.add_argument("--image", action="append", default=[], metavar="[W:]FILE",
                   help="an image to look for (alone: its captions, or images when the index has none or --images)")
    p.add_argument("--like", action="append", default=[], type=int, metavar="ID",
                   help="an indexed image id: images like it (itself left out)")
    p.add_argument("--not-text", action="append", default=[], metavar="TEXT", help="what to steer away from")
    p.add_argument("--not-image", action="append", default=[], metavar="FILE", help="an image to steer away from")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep images whose folder=GLOB (2024/**), ext=jpg,heic, after=DATE or before=DATE")
    p.add_argument("--after", metavar="DATE", help="taken on or after this date (EXIF, else file time), 2024-06-01")
    p.add_argument("--before", metavar="DATE", help="taken before this date")
    p.add_argument("--sort", choices=["relevance", "date"], default="relevance",
                   help="date: the hits scoring at least --min-score, newest first")
    p.add_argument("--min-score", type=float, metavar="COSINE", help="leave out hits scoring below this")
    p.add_argument("--distinct", action="store_true",
                   help="one hit per set of near-duplicate images (the threshold `vclr duplicates` calibrated)")
    p.add_argument("--images", action="store_true", help="with one --image: images even if there are captions")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--offset", type=int, default=0, help="skip this many hits (the next page)")
    add_model_arguments(p, required=False)
    p.add_argument("--json", action="store_true", help="print the hits as a JSON list: rank, score, id, path and "
                                                       "taken (images) or caption (captions), weak")


def search_query(args):
    """The query the search flags describe (vclr.search.query), checked before anything heavy is imported."""
    from vclr.search.query import parse_query

    where = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep:
            raise VclrError(f"--where takes KEY=VALUE, e.g. folder=2024/**, got {item!r}")
        where[key.strip()] = value.strip()
    where.update({key: value for key, value in (("after", args.after), ("before", args.before)) if value})
    if not (args.text or args.image or args.like):
        raise VclrError("give at least one of --text, --image or --like")
    query = parse_query(text=args.text, image=args.image, like=args.like, not_text=args.not_text,
                        not_image=args.not_image, where=where, sort=args.sort, min_score=args.min_score, k=args.k,
                        distinct=args.distinct,
                        offset=args.offset, images=args.images or None)
    for term in (*query.positives, *query.negatives):
        if term.kind == "image" and not term.value.is_file():
            raise VclrError(f"query image {term.value} does not exist")
    return query


def cmd_search(args) -> int:
    query = search_query(args)  # every argument is checked before anything heavy is imported or loaded
    from vclr.search.searcher import Searcher

    # a text query needs only the index's own text tower; the model is loaded if the query needs it
    searcher = Searcher.open(args.index, model_source_of(args, required=False), load_model=False)
    hits = searcher.search(query)
    if args.json:
        print(json.dumps([hit.to_json() for hit in hits]))
    else:
        print_hits(hits, dated=query.sort == "date")
    return 0


def add_duplicates_arguments(p) -> None:
    p.add_argument("--index", required=True)
    p.add_argument("--threshold", type=float, metavar="COSINE",
                   help="pairs scoring at least this are duplicates (default: calibrated on the index: re-encoded, "
                        "resized and cropped copies of a sample against their nearest distinct neighbours)")
    p.add_argument("--recalibrate", action="store_true", help="measure the threshold again")
    add_model_arguments(p, required=False)
    p.add_argument("--json", action="store_true", help="print the groups as JSON (threshold, calibration, groups)")
    p.add_argument("--html", metavar="FILE", help="also write a review page: each group's images side by side, the "
                                                  "suggested keeper first")


def cmd_duplicates(args) -> int:
    from tqdm import tqdm

    from vclr.index.format import RetrievalIndex
    from vclr.search.duplicates import find_duplicates, write_review_page
    from vclr.search.searcher import Searcher

    if args.threshold is not None and not -1 <= args.threshold <= 1:
        raise VclrError(f"--threshold is a cosine: it must be in [-1, 1], got {args.threshold}")
    calibration = None
    if args.threshold is None:  # the model embeds copies of a sample (once per index save)
        searcher = Searcher.open(args.index, model_source_of(args, required=False), load_model=False, mmap=True)
        index = searcher.index
        calibration = searcher.duplicate_calibration(args.recalibrate)
    else:  # no model needed
        index = RetrievalIndex.load(args.index, mmap=True)  # vectors read from the page cache, not copied
    threshold = args.threshold if args.threshold is not None else calibration.threshold
    live = index.manifest["num_images"] - index.manifest["deleted_images"]
    with tqdm(total=live, unit="img", desc="near-duplicates", disable=None) as bar:
        groups = find_duplicates(index, threshold, progress=bar.update)
    if args.html:
        write_review_page(args.html, groups, threshold)
    if args.json:
        print(json.dumps({"threshold": threshold, "calibration": calibration and calibration.to_json(),
                          "groups": [g.to_json() for g in groups]}))
        return 0
    how = "given" if calibration is None else (
        f"calibrated: copies of {calibration.copies['n'] // 3} sampled images score >= {calibration.copies['p05']:.4f} "
        f"(5th percentile), their nearest distinct images {calibration.neighbours['median']:.4f} (median)")
    print(f"threshold {threshold:.4f} ({how})")
    extra = sum(len(g.members) - 1 for g in groups)
    print(f"{len(groups)} groups of near-duplicates among {live} images ({extra} copies beyond each keeper)")
    for number, group in enumerate(groups, 1):
        print(f"group {number}:")
        for member in group.members:
            size = f"{member.width}x{member.height}" if member.width else "?"
            mark = "keep" if member is group.keeper else f"{member.score:.4f}"
            taken = _day(member.taken)
            print(f"  {mark:>6}  {size:>11}  {_megabytes(member.bytes):>8}  {taken:>10}  {member.path}")
    if args.html:
        print(f"review page: {args.html}")
    return 0


def _day(timestamp: float | None) -> str:
    import datetime

    return "?" if timestamp is None else datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d")


def _megabytes(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:.2f} MB"
