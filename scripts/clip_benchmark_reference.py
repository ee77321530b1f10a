"""CLIP_benchmark's own `clip_benchmark eval`, as the reference vclr's benchmark is tested and timed against, with
the faults it has on this stack mended in place (each named here; nothing else of it changes):

1. numpy >= 2.4: `metrics.zeroshot_classification.accuracy` calls float() on a one-element array (TypeError: only
   0-dimensional arrays can be converted to Python scalars); the same float32 sum is read with `.item()`.
2. Its linear probe runs on CUDA only (`assert device == 'cuda'` and `.cuda()` calls): the same code with
   `.to(device)`, so it runs on the CPU.
3. Its linear probe draws the few-shot permutation, and `random_split` a validation proportion, from torch's global
   generator wherever model creation and data loading left it (so its figure depends on the architecture and on how
   many loaders ran); both are seeded with --seed right before, which is vclr's convention
   (vclr/bench/linear_probe.py) and what CLIP_benchmark gives when the generator was just seeded.

    python scripts/clip_benchmark_reference.py eval --model ViT-B-32 --pretrained ckpt.pt --dataset wds/shapes \
        --dataset_root data/shapes_wds --task zeroshot_classification --no_amp --output out.json

Use --no_amp on a CPU: its default autocast runs bf16 there (2.7x slower than fp32 here, and other figures).
"""

from __future__ import annotations

import inspect
import sys


def _seed_from_argv(argv: list[str]) -> int:
    return int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0


def _fixed_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's accuracy with its float() of a one-element array read by .item() (fault 1)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().item() / n for k in topk]


def _patched_source(module, replacements: dict[str, str]) -> str:
    source = inspect.getsource(module)
    for old, new in replacements.items():
        if old not in source:
            raise SystemExit(f"clip_benchmark_reference: {module.__name__} no longer holds {old!r}; update this patch")
        source = source.replace(old, new)
    return source


def mend(seed: int) -> None:
    import torch
    import torch.utils.data
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    zeroshot_classification.accuracy = _fixed_accuracy  # fault 1 (linear_probe imports it anew just below)
    source = _patched_source(linear_probe, {  # faults 2 and 3
        "assert device == 'cuda'": "pass",
        ".cuda()": ".to(device)",
        "torch.randperm(length)": "torch.randperm(length, generator=torch.Generator().manual_seed(seed))",
    })
    exec(compile(source, linear_probe.__file__, "exec"), linear_probe.__dict__)
    random_split = torch.utils.data.random_split

    def seeded_random_split(dataset, lengths, generator=None):  # fault 3, the validation proportion's split
        return random_split(dataset, lengths, generator=torch.Generator().manual_seed(seed))

    torch.utils.data.random_split = seeded_random_split


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mend(_seed_from_argv(argv))
    from clip_benchmark import cli

    sys.argv = ["clip_benchmark", *argv]
    return cli.main() or 0


if __name__ == "__main__":
    sys.exit(main())
