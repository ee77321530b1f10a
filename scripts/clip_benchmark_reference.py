"""CLIP_benchmark's own `clip_benchmark eval`, as the reference vclr's benchmark is tested and timed against, and
datasets written by its own webdataset converter to compare them on (tests/test_bench_reference.py,
scripts/bench_benchmark.py). The faults it has on this stack are mended in place (each named here; nothing else of
it changes):

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

import contextlib
import inspect
import io
import sys
from pathlib import Path


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


# ----------------------------------------------------------------- data written by CLIP_benchmark's own converter


class _Items(list):
    """(image, target) items with the attributes CLIP_benchmark's converter reads (classes, templates)."""

    classes: list[str] = []
    templates: list[str] = []


HUES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan")


def write_classification(out: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """A zero-shot / linear-probe set in CLIP_benchmark's webdataset layout, written by its own converter: 7 classes
    of disc hue (vclr.data.synthetic.hue_scene) as PNGs, class names and templates included."""
    import numpy as np
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    from vclr.data.synthetic import hue_scene

    rng = np.random.default_rng(seed)
    for split, count in sizes.items():
        items = _Items((hue_scene(rng, i % 7), i % 7) for i in range(count))
        items.classes = [f"{hue} disc" for hue in HUES]
        items.templates = ["a photo of a {c}.", "a picture with a {c}.", "{c}"]
        with contextlib.redirect_stdout(io.StringIO()):
            convert_dataset(items, split, str(out), transform=PIL_to_bytes("png"), image_format="png", verbose=False)
    return out


def write_retrieval(out: Path, count: int, seed: int = 1) -> Path:
    """A retrieval set of `count` JPEGs with 5 captions each, by CLIP_benchmark's own converter. Every caption is
    unique: equal captions tie exactly, and CLIP_benchmark's torch.topk orders ties its own way (vclr by index)."""
    import numpy as np
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_retrieval_dataset

    from vclr.data.synthetic import PLACES, position_scene

    rng = np.random.default_rng(seed)
    colours = ("red", "green", "blue", "yellow", "purple")
    items = []
    for i in range(count):
        colour, shape, where = colours[i % 5], ("circle", "square")[(i // 5) % 2], PLACES[i % 7]
        items.append((position_scene(rng, i % 7, colour, shape == "square"),
                      [f"a {colour} {shape} ({i})", f"shape {i}: a {shape} at the {where}", f"{colour} {shape} {i}",
                       f"picture {i} of a {colour} {shape}", f"the {shape} in {colour}, {where}, {i}"]))
    with contextlib.redirect_stdout(io.StringIO()):
        convert_retrieval_dataset(items, "test", str(out), transform=PIL_to_bytes("jpg"), image_format="jpg",
                                  verbose=False)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mend(_seed_from_argv(argv))
    from clip_benchmark import cli

    import vclr.model.build  # noqa: F401  registers vclr's model configs with open_clip (its tiny ones for timings)

    sys.argv = ["clip_benchmark", *argv]
    return cli.main() or 0


if __name__ == "__main__":
    sys.exit(main())
