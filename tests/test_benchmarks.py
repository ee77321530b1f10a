"""Every scripts/bench_*.py runs end to end at tiny sizes and prints its JSON lines, so that none can rot. The figures
are not checked here (they are the scripts' job on real sizes); that each script completes and reports is."""

import importlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"


def run_script(name: str, argv: list[str], capsys, monkeypatch) -> list[dict]:
    """scripts/NAME.py's main(argv) in this process (torch and open_clip are imported once for all): -> its JSON
    lines."""
    # under its own name, from scripts/ (the scripts share helpers, and worker processes import them by name)
    monkeypatch.syspath_prepend(str(SCRIPTS))
    module = importlib.import_module(name)
    capsys.readouterr()
    module.main(argv)  # it sets up logging as a program does: conftest puts it back after the test
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines, f"{name} printed no JSON line"
    return lines


def test_every_benchmark_has_a_smoke_test():
    tested = {name for name, _ in CASES} | {"bench_emoji", "bench_emoji_ceiling", "bench_weak", "bench_int8",
                                            "bench_finetune"}
    assert {path.stem for path in SCRIPTS.glob("bench_*.py")} == tested


CASES = [
    ("bench_index", ["--n", "3000", "--d", "16", "--queries", "100", "--kinds", "flat,ivf_flat"]),
    ("bench_duplicates", ["--n", "4000", "--d", "32", "--planted", "40", "--subset", "1000", "--exact-below", "1000"]),
    ("bench_eval", ["--cases", "smoke", "--d", "8"]),
    ("bench_decode", ["--sizes", "128x96", "--count", "4", "--drafts", "0,2", "--workers", "1"]),
    ("bench_embed", ["--images", "8", "--size", "128x96", "--model", "vclr-tiny-rn", "--batch", "4", "--workers", "0",
                     "--folder", "jpegs"]),
    ("bench_demo", ["--steps", "6", "--images", "300", "--batch-size", "32"]),
    ("bench_train", ["--model", "vclr-tiny-rn", "--batch", "8", "--num-images", "32", "--width", "128",
                     "--height", "96", "--steps", "2", "--warmup-steps", "1", "--workers", "0", "--precision", "no",
                     "--no-reference", "--data-dir", "train-data", "--out-dir", "train-out"]),
    ("bench_onnx", ["--models", "vclr-tiny-rn", "--repeats", "2", "--batch", "4"]),
    ("bench_cli", ["--repeats", "1"]),
    ("bench_benchmark", ["--models", "1", "--arch", "vclr-tiny-rn", "--test", "14", "--train", "21", "--val", "14",
                         "--retrieval", "10", "--bootstrap", "20", "--work", "bench-work"]),
    ("bench_serve", ["--images", "300", "--model", "vclr-tiny-rn", "--levels", "1", "--seconds", "1", "--warmup", "0"]),
    ("bench_serve", ["--images", "300", "--model", "vclr-tiny-rn", "--levels", "1", "--seconds", "1", "--warmup", "0",
                     "--backend", "onnx", "--int8"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, argv", CASES, ids=[name for name, _ in CASES])
def test_benchmark_runs_at_tiny_sizes(name, argv, capsys, monkeypatch):
    lines = run_script(name, argv, capsys, monkeypatch)
    assert all(line.get("bench", line.get("benchmark")) for line in lines)


def _emoji_like(folder, concepts: int = 12):
    """A tiny dataset in `vclr prepare openmoji`'s layout (a concept per emoji, name captions), 64 px."""
    from PIL import Image

    for split, offset in (("train", 0), ("test", concepts)):
        (folder / split).mkdir(parents=True)
        rows = []
        for i in range(offset, offset + concepts):
            Image.new("RGB", (64, 64), (20 * i % 255, 90, 255 - 20 * i % 255)).save(folder / split / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "captions": [f"emoji {i}", f"a picture of thing {i}"],
                         "concept": f"thing {i}"})
        (folder / split / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.mark.slow
def test_bench_emoji_runs_at_tiny_sizes(tmp_path, capsys, monkeypatch):
    data = _emoji_like(tmp_path / "emoji")
    [line] = run_script("bench_emoji", ["--data", str(data), "--variants", "scratch", "--minutes", "0.05",
                                        "--set", "data.batch_size=8", "optim.warmup_steps=1"], capsys, monkeypatch)
    assert line["variant"] == "scratch" and line["steps"] > 0 and "test_image_to_text_R@1" in line


@pytest.mark.slow
def test_bench_emoji_ceiling_runs_at_tiny_sizes(tmp_path, capsys, monkeypatch, tiny_lit_model_name,
                                                tiny_hf_text_dir):
    """The LiT recipe's cached-tower path, with a tiny LiT-shaped model standing in for EfficientNet + MiniLM."""
    import timm
    import torch

    data = _emoji_like(tmp_path / "emoji", concepts=20)
    weights = tmp_path / "weights"
    shutil.copytree(tiny_hf_text_dir, weights / "all-MiniLM-L6-v2")
    torch.save(timm.create_model("efficientnet_lite0", pretrained=False).state_dict(),
               weights / "efficientnet_lite0_timm.pt")
    [line] = run_script("bench_emoji_ceiling", ["--data", str(data), "--weights", str(weights), "--folds", "2",
                                                "--max-steps", "2", "--set", f"model.name={tiny_lit_model_name}",
                                                "data.batch_size=8", "optim.warmup_steps=1"], capsys, monkeypatch)
    assert line["folds"] == 2 and line["images"] == 20


@pytest.mark.slow
def test_bench_weak_runs_at_tiny_sizes(small_shapes, tmp_path, capsys, monkeypatch):
    from helpers import untrained_index

    index = untrained_index(small_shapes / "test", tmp_path / "run")
    [line] = run_script("bench_weak", ["--index", str(index), "--captions", "20", "--vocabulary", "demo"], capsys,
                        monkeypatch)
    assert line["captions_drawn"] == 20 and 0 <= line["unrelated_marked_weak"] <= 1
    vocabulary = importlib.import_module("bench_weak").demo_vocabulary()
    assert line["vocabulary_queries"] == len(vocabulary) == 68 and set(line["vocabulary_weak"]) <= set(vocabulary)


@pytest.mark.slow
def test_bench_int8_runs_at_tiny_sizes(small_shapes, tmp_path, capsys, monkeypatch):
    from helpers import untrained_index

    untrained_index(small_shapes / "test", tmp_path / "run")
    [line] = run_script("bench_int8", ["--run", str(tmp_path / "run"), "--data", str(small_shapes / "test")], capsys,
                        monkeypatch)
    assert set(line["recall"]) == {"torch fp32", "onnx fp32", "onnx int8"} and line["guard"]["sample"] > 0
    assert line["min_image_cosine_fp32_export"] >= 0.9999
    assert set(line["by_tower"]) == {"text int8", "image int8"}
    assert all(tower["min_cosine"] > 0.9 for tower in line["by_tower"].values())


@pytest.mark.slow
def test_bench_finetune_runs_at_tiny_sizes(small_shapes, tmp_path, capsys, monkeypatch):
    from helpers import train_overrides

    from vclr.config import load_config
    from vclr.data.prepare import prepare_fashion_mnist
    from vclr.train.loop import train

    if not (Path("/usr/share/datasets/fashion-mnist").is_dir() or shutil.which("apt-get")):
        pytest.skip("no Fashion-MNIST source (Debian's dataset-fashion-mnist)")
    data = tmp_path / "fm"
    prepare_fashion_mnist(data, limit=64)
    base = tmp_path / "base"
    train(load_config(None, train_overrides(small_shapes, base, **{"optim.max_steps": 3, "optim.warmup_steps": 1,
                                                                   "data.batch_size": 16})))
    lines = run_script("bench_finetune", ["--base", str(base), "--base-task", str(small_shapes / "test"), "--data",
                                          str(data), "--steps", "2", "--batch", "16", "--variants", "full,lora8",
                                          "--alphas", "0.5", "--checkpointing-model", "vclr-tiny-vit",
                                          "--checkpointing-batch", "8", "--checkpointing-steps", "2", "--work",
                                          str(tmp_path / "work"), "--bootstrap", "20"], capsys, monkeypatch)
    variants = {line["variant"]: line for line in lines}
    assert {"base", "full", "lora8", "wise0.5", "grad_checkpointing=true"} <= set(variants)
    assert variants["lora8"]["trainable_parameters"] < variants["full"]["trainable_parameters"]
