"""What every subcommand module shares: the model arguments, hit printing, and the one place where the library's
argument names become flags.

The library's errors name the argument a caller gave (in backticks: "`run` has no config.yaml"); the CLI's user gave
a flag, so `flags_for` rewrites each backticked argument into its flag before the message is printed.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from vclr.errors import VclrError

# library argument -> the flag that sets it
ARGUMENT_FLAGS = {
    "run": "--run", "model": "--model", "pretrained": "--pretrained", "checkpoint": "--checkpoint", "data": "--data",
    "index_dir": "--index", "kind": "--index-type", "recall_target": "--recall-target",
    "memory_budget_gb": "--memory-budget-gb", "resume": "--resume", "source": "--source",
    "test_fraction": "--test-fraction", "skin_tones": "--skin-tones", "label_column": "--label-column",
    "name_column": "--name-column", "grid": "--grid", "api_key": "--api-key", "where": "--where", "sort": "--sort",
    "min_score": "--min-score", "offset": "--offset", "weights": "--text W:TEXT", "backend": "--backend",
    "int8": "--int8", "models": "--model", "datasets": "--dataset", "dataset_root": "--dataset-root",
    "fewshot_k": "--fewshot-k", "alpha": "--alpha", "alphas": "--alphas", "fine_tuned": "--fine-tuned",
    "base": "--base",
}


def flags_for(message: str) -> str:
    """A library message with each backticked argument name replaced by its flag (`run` -> --run DIR)."""
    return re.sub(r"`(\w+)`", lambda m: ARGUMENT_FLAGS.get(m.group(1), m.group(0)), message)


def print_hits(hits, dated: bool = False) -> None:
    """One line a hit: rank, score, path or caption (and the date taken, for a search sorted by date); a weak
    match is marked."""
    for hit in hits:
        date = f"  {(hit.taken or '-')[:10]}" if dated else ""
        words = f"  [text: {hit.words}]" if hit.words else ""
        print(f"{hit.rank:>3}  {hit.score:+.4f}{date}  {hit.value}{'  (weak match)' if hit.weak else ''}{words}")


def parse_ks(text: str) -> list[int]:
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
    p.add_argument("--checkpoint", choices=["final", "best", "ema"], default="final",
                   help="with --run: the final weights, those at the best validation figure (checkpoints/best), or "
                        "their moving average (checkpoints/ema, train.ema_decay)")


def model_source_of(args, required: bool = True):
    """The model source the flags name; None (the index's own) when they name none and none is required."""
    from vclr.model.source import model_source

    if not required and not (args.run or args.model or args.pretrained):
        return None
    return model_source(args.run, args.model, args.pretrained, checkpoint=getattr(args, "checkpoint", "final"))


def add_command(sub, name: str, func, help_text: str, example: str, aliases: Sequence[str] = ()):
    parser = sub.add_parser(name, help=help_text, description=help_text, aliases=list(aliases),
                            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    if func is not None:
        parser.set_defaults(func=func)
    return parser
