"""The `vclr` command: its parser, the table of subcommands and the error contract. `main(argv)` returns the exit
code (tests call it directly); each subcommand's arguments and function live beside each other in data_cmds,
train_cmds and index_cmds.

    vclr demo                                  # generate data, train, index, evaluate, search: all on CPU
    vclr train --config configs/demo.yaml optim.lr=0.001
    vclr search --index vclr-demo/index --text "a large red circle on the left" -k 5
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from vclr.cli.bench_cmds import add_benchmark_arguments, cmd_benchmark
from vclr.cli.common import add_command, flags_for
from vclr.cli.data_cmds import add_make_synthetic_arguments, add_prepare_arguments, cmd_make_synthetic, cmd_prepare
from vclr.cli.finetune_cmds import add_wise_ft_arguments, cmd_wise_ft
from vclr.cli.index_cmds import (
    add_duplicates_arguments,
    add_export_arguments,
    add_index_add_arguments,
    add_index_arguments,
    add_index_delete_arguments,
    add_search_arguments,
    add_serve_arguments,
    cmd_duplicates,
    cmd_export,
    cmd_index,
    cmd_index_add,
    cmd_index_delete,
    cmd_search,
    cmd_serve,
)
from vclr.cli.train_cmds import (
    add_demo_arguments,
    add_eval_arguments,
    add_models_arguments,
    add_sweep_arguments,
    add_train_arguments,
    add_zero_shot_arguments,
    cmd_demo,
    cmd_eval,
    cmd_models,
    cmd_sweep,
    cmd_train,
    cmd_zero_shot,
)
from vclr.errors import VclrError

logger = logging.getLogger("vclr")


class _Parser(argparse.ArgumentParser):
    """argparse with vclr's error contract: one line on stderr (no usage block), exit status 2."""

    def error(self, message: str):
        print(f"vclr: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


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
    ("duplicates", cmd_duplicates, add_duplicates_arguments,
     "find near-duplicate images in an index (groups with a suggested keeper)",
     "vclr duplicates --index photos-index --html duplicates.html"),
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
    ("benchmark", cmd_benchmark, add_benchmark_arguments,
     "score models x datasets x tasks (zero-shot, retrieval, linear probe...) as CLIP_benchmark, with intervals",
     "vclr benchmark --model demo=vclr-demo/run --model ViT-B-32,vit.pt --dataset shapes --dataset fashion-mnist "
     "--out bench"),
    ("wise-ft", cmd_wise_ft, add_wise_ft_arguments,
     "interpolate a fine-tuned run with its base model (WiSE-FT): one alpha, or a sweep scored by vclr benchmark",
     "vclr wise-ft --base vclr-demo/run --fine-tuned runs/ft --alphas 0,0.5,1 --benchmark shapes --out runs/wise"),
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
        add_arguments(add_command(sub, name, func, help_text, example, *aliases))
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
        print(f"vclr: error: {flags_for(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vclr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
