"""vclr benchmark's figures equal `clip_benchmark eval`'s, bit for bit, on the same files and the same checkpoint.

The reference is CLIP_benchmark itself (the `clip-benchmark` test dependency), run as `clip_benchmark eval` through
scripts/clip_benchmark_reference.py, which mends its three faults on this stack and nothing else (see that file). The
data is written by CLIP_benchmark's own webdataset converter; the model is a random-init open_clip ViT-B-32 saved
as a checkpoint file, which both load through open_clip.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import clip_benchmark_classification, clip_benchmark_retrieval, random_open_clip_checkpoint

from vclr.bench.matrix import benchmark
from vclr.config import BenchmarkConfig

pytest.importorskip("clip_benchmark")
REFERENCE = Path(__file__).resolve().parents[1] / "scripts" / "clip_benchmark_reference.py"
pytestmark = pytest.mark.slow


def reference(root: Path, name: str, checkpoint: Path, dataset: Path, task: str, *extra: str) -> dict:
    """`clip_benchmark eval` of one task; its linear probes share their cached features (its --feature_root)."""
    out = root / f"reference-{name}.json"
    subprocess.run([sys.executable, str(REFERENCE), "eval", "--model", "ViT-B-32", "--pretrained", str(checkpoint),
                    "--dataset", f"wds/{dataset.name}", "--dataset_root", str(dataset), "--task", task, "--no_amp",
                    "--num_workers", "0", "--batch_size", "64", "--feature_root", str(root / "features"),
                    "--output", str(out), "--quiet", *extra], check=True, capture_output=True, cwd=root)
    return json.loads(out.read_text())["metrics"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_benchmark")
    return {"zs": clip_benchmark_classification(root / "zs", {"train": 84, "val": 42, "test": 56}),
            "ret": clip_benchmark_retrieval(root / "ret", 40),
            "checkpoint": random_open_clip_checkpoint(root / "vit-b-32.pt"), "root": root}


@pytest.fixture(autouse=True)
def shared_cache(files, monkeypatch):
    """One vclr cache for the module: the converted datasets keep their paths, so the tests share features."""
    monkeypatch.setenv("VCLR_CACHE", str(files["root"] / "cache"))


def vclr_figures(files, **settings) -> dict:
    """vclr's figures; both tests share one results folder, so the second embeds nothing (its features are kept)."""
    rows = benchmark([f"ViT-B-32,{files['checkpoint']}"], [str(files["zs"]), str(files["ret"])], files["root"] / "out",
                     tasks=("auto", "linear_probe"), settings=BenchmarkConfig(bootstrap=0, **settings), report=False)
    assert not [r for r in rows if "error" in r]
    return {(Path(r["dataset"]).name, r["task"]): r["metrics"] for r in rows}


def test_zero_shot_retrieval_and_linear_probe_equal_clip_benchmark(files):
    ours, root = vclr_figures(files), files["root"]
    theirs = {
        ("zs", "zeroshot_classification"): reference(root, "zs", files["checkpoint"], files["zs"],
                                                     "zeroshot_classification"),
        ("ret", "retrieval"): reference(root, "ret", files["checkpoint"], files["ret"], "zeroshot_retrieval",
                                        "--recall_k", "1", "5", "10"),
        ("zs", "linear_probe"): reference(root, "lp", files["checkpoint"], files["zs"], "linear_probe",
                                          "--train_split", "train", "--val_split", "val"),
    }
    for cell, figures in theirs.items():
        for name, value in figures.items():
            if name in ("epochs", "seed", "fewshot_k", "normalized"):  # its settings, echoed
                continue
            assert ours[cell][name] == value, (cell, name, ours[cell][name], value)  # exactly: bit for bit
    # the figures say something: the probe learns (7 classes: chance 0.14) and the search over weight decays ran
    assert theirs[("zs", "linear_probe")]["lp_acc1"] > 0.4
    assert ours[("zs", "linear_probe")]["weight_decay"] > 0


def test_the_features_themselves_equal_clip_benchmarks(files):
    """Not only the figures: the unit vectors CLIP_benchmark's linear probe cached for the test images (its
    --feature_root) are vclr's, bit for bit (open_clip's preprocess exactly, the same batches)."""
    import torch

    from vclr.bench.datasets import resolve_dataset
    from vclr.bench.features import Featurizer
    from vclr.bench.matrix import model_key, parse_model_spec
    from vclr.data.labelled import load_labelled_images

    vclr_figures(files)  # cached by the test before: nothing is embedded again
    reference(files["root"], "lp", files["checkpoint"], files["zs"], "linear_probe", "--train_split", "train",
              "--val_split", "val")
    [theirs] = (files["root"] / "features").glob("*/features_test.pt")
    paths, _, _ = load_labelled_images(resolve_dataset(str(files["zs"])).split("test"))
    key = model_key(parse_model_spec(f"ViT-B-32,{files['checkpoint']}").source)
    ours, kept = Featurizer(None, None, files["root"] / "out" / "features" / key, 64).images(paths)
    assert len(kept) == len(paths) and np.array_equal(ours, torch.load(theirs).numpy())


def test_a_few_shot_probe_equals_clip_benchmark(files):
    ours = vclr_figures(files, fewshot_k=4, lp_epochs=5)[("zs", "linear_probe")]
    theirs = reference(files["root"], "fewshot", files["checkpoint"], files["zs"], "linear_probe", "--train_split",
                       "train", "--val_split", "val", "--fewshot_k", "4", "--fewshot_epochs", "5")
    assert {k: ours[k] for k in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay")} == \
        {k: theirs[k] for k in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay")}
