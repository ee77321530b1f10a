"""`vclr wise-ft`: interpolate a fine-tuned model with the model it started from (one alpha, or a sweep scored by
`vclr benchmark`)."""

from __future__ import annotations

from pathlib import Path

from vclr.errors import VclrError


def add_wise_ft_arguments(p) -> None:
    p.add_argument("--base", required=True, metavar="SPEC",
                   help="the model fine-tuning started from: a run dir, NAME[,PRETRAINED] or hf-hub:org/repo")
    p.add_argument("--fine-tuned", required=True, metavar="RUN", help="the fine-tuned run (LoRA runs are merged)")
    p.add_argument("--alpha", type=float, help="one interpolation: (1 - alpha) * base + alpha * fine-tuned")
    p.add_argument("--alphas", help="a sweep: comma-separated alphas, e.g. 0,0.25,0.5,0.75,1 (with --benchmark)")
    p.add_argument("--benchmark", action="append", default=[], metavar="DATASET",
                   help="with --alphas: datasets (as `vclr benchmark --dataset`) to score each alpha on; repeatable")
    p.add_argument("--task", action="append", default=[], help="benchmark tasks (default: auto)")
    p.add_argument("--dataset-root", help="where CLIP_benchmark-named datasets lie (as `vclr benchmark`)")
    p.add_argument("--out", required=True, help="the run dir (--alpha) or the sweep folder (--alphas)")


def _alphas(text: str) -> list[float]:
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise VclrError(f"--alphas must be comma-separated numbers in [0, 1] such as 0,0.5,1, got {text!r}") from None


def cmd_wise_ft(args) -> int:
    if (args.alpha is None) == (args.alphas is None):
        raise VclrError("give --alpha A (one interpolated run) or --alphas A,B,... with --benchmark (a sweep)")
    if args.alpha is not None:
        from vclr.eval.wise_ft import save_wise_ft

        out = save_wise_ft(args.base, args.fine_tuned, args.alpha, args.out)
        print(f"WiSE-FT at alpha {args.alpha:g}: run dir {out}")
        return 0
    from vclr.eval.wise_ft import wise_ft_sweep

    if not args.benchmark:
        raise VclrError("--alphas scores each alpha on datasets: give them with --benchmark DATASET (repeatable)")
    result = wise_ft_sweep(args.base, args.fine_tuned, _alphas(args.alphas), args.benchmark, args.out,
                           tasks=tuple(args.task or ["auto"]), dataset_root=args.dataset_root)
    print((Path(args.out) / "wise_ft.md").read_text(), end="")
    print(f"runs and scores in {args.out} (wise_ft.json, wise_ft.md" + (", wise_ft.png)" if "plot" in result else ")"))
    return 0
