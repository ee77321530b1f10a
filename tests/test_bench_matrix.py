"""The benchmark matrix: every task against its reference (CLIP_benchmark's own functions for compositionality and
per-language retrieval), caches that compute only new cells, a killed run that continues, and bad input that fails
one cell in one line while the others complete."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import untrained_run

from vclr.bench import matrix
from vclr.bench.datasets import UnknownDataset, resolve_dataset
from vclr.bench.matrix import benchmark, compare, parse_model_spec
from vclr.cli.main import main
from vclr.config import BenchmarkConfig
from vclr.data.synthetic import hue_scene
from vclr.errors import VclrError

FAST = BenchmarkConfig(bootstrap=50, lp_epochs=2)


def write_split(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def labelled_dataset(root: Path, sizes=None, classnames=True) -> Path:
    """7 hue classes in vclr's standard format (split folders + classnames.txt + templates)."""
    rng = np.random.default_rng(0)
    for split, count in (sizes or {"train": 42, "test": 28}).items():
        rows = []
        for i in range(count):
            (root / split).mkdir(parents=True, exist_ok=True)
            hue_scene(rng, i % 7).save(root / split / f"{i:03d}.png")
            rows.append({"file_name": f"{i:03d}.png", "label": i % 7})
        write_split(root / split, rows)
    if classnames:
        (root / "classnames.txt").write_text("".join(f"hue {i}\n" for i in range(7)))
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{c}\n")
    return root


def image_files(folder: Path, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        hue_scene(rng, i % 7).save(folder / f"{i:03d}.png")
    return [f"{i:03d}.png" for i in range(count)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("bench") / "tiny")


@pytest.fixture
def counted(monkeypatch):
    """Counts the cells the matrix computes."""
    calls = []
    score = matrix.score_cell

    def counting(featurizer, dataset, task, settings):
        calls.append((Path(dataset.name).name, task))
        return score(featurizer, dataset, task, settings)

    monkeypatch.setattr(matrix, "score_cell", counting)
    return calls


def test_a_rerun_computes_only_the_new_cells_and_reuses_features(run, small_shapes, tmp_path, counted):
    labelled = labelled_dataset(tmp_path / "hues")
    benchmark([str(run)], [str(small_shapes / "test")], tmp_path / "out", settings=FAST)
    assert counted == [("test", "retrieval")]
    counted.clear()
    rows = benchmark([str(run), f"other={run}"], [str(small_shapes / "test"), str(labelled)], tmp_path / "out",
                     tasks=("auto", "linear_probe"), settings=FAST)
    # the first model's retrieval cell was done; "other" is the same model and weights: its cells are cached too
    assert counted == [("hues", "zeroshot_classification"), ("hues", "linear_probe")]
    assert [(r["model"], Path(r["dataset"]).name, r["task"]) for r in rows] == [
        ("tiny", "test", "retrieval"), ("tiny", "hues", "zeroshot_classification"), ("tiny", "hues", "linear_probe"),
        ("other", "test", "retrieval"), ("other", "hues", "zeroshot_classification"), ("other", "hues", "linear_probe")]
    features = list((tmp_path / "out" / "features").rglob("*.npy"))
    assert len([f for f in features if "vectors" in f.name]) == 3  # retrieval, hue test (shared by both tasks), train
    for name in ("results.md", "results.csv", "report.html", "results.jsonl"):
        assert (tmp_path / "out" / name).is_file()
    assert "| tiny |" in (tmp_path / "out" / "results.md").read_text()


def test_a_killed_benchmark_continues_where_it_stopped(run, small_shapes, tmp_path, monkeypatch):
    labelled = labelled_dataset(tmp_path / "hues")
    done = []
    score = matrix.score_cell

    def dies_on_the_second_cell(featurizer, dataset, task, settings):
        if done:
            raise KeyboardInterrupt
        done.append(task)
        return score(featurizer, dataset, task, settings)

    monkeypatch.setattr(matrix, "score_cell", dies_on_the_second_cell)
    with pytest.raises(KeyboardInterrupt):
        benchmark([str(run)], [str(small_shapes / "test"), str(labelled)], tmp_path / "out", settings=FAST)
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 1  # the finished cell is kept
    monkeypatch.setattr(matrix, "score_cell", score)
    rows = benchmark([str(run)], [str(small_shapes / "test"), str(labelled)], tmp_path / "out", settings=FAST)
    assert [r["task"] for r in rows] == ["retrieval", "zeroshot_classification"] and all("metrics" in r for r in rows)


def test_every_figure_has_an_interval_around_it(run, small_shapes, tmp_path):
    rows = benchmark([str(run)], [str(small_shapes / "test")], tmp_path / "out",
                     settings=BenchmarkConfig(bootstrap=200))
    row = rows[0]
    assert set(row["intervals"]) == set(row["metrics"])
    for name, (low, high) in row["intervals"].items():
        assert low <= row["metrics"][name] + 1e-6 and row["metrics"][name] <= high + 1e-6
    assert row["units"] == 200 and row["dataset_fingerprint"] and row["model_key"]


def test_retrieval_recall_is_vclrs_exact_metric(run, small_shapes, tmp_path):
    from vclr.data.dataset import load_caption_table
    from vclr.embed.embedding import embed_table
    from vclr.eval.metrics import retrieval_metrics
    from vclr.model.source import model_source

    row = benchmark([str(run)], [str(small_shapes / "test")], tmp_path / "out", settings=FAST)[0]
    model, cfg = model_source(run=str(run)).load()
    emb = embed_table(model, cfg, load_caption_table(small_shapes / "test"))
    expected = retrieval_metrics(emb.image_embeddings, emb.text_embeddings, emb.caption_image, (1, 5, 10))
    for k in (1, 5, 10):  # vclr eval's percentages, to float32 rounding (the embedding batches differ)
        assert 100 * row["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(
            expected[f"text_to_image_R@{k}"], abs=0.51)
        assert 100 * row["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(
            expected[f"image_to_text_R@{k}"], abs=0.51)


def _clip_benchmark_loader(model, items):
    """(images, captions) items through the model's own open_clip preprocess, batched as CLIP_benchmark's loaders."""
    import open_clip
    from PIL import Image

    from vclr.model.build import image_preprocess_cfg

    p = image_preprocess_cfg(model)
    transform = open_clip.image_transform(p["size"], is_train=False, mean=p["mean"], std=p["std"],
                                          resize_mode=p.get("resize_mode"), interpolation=p.get("interpolation"))

    def load(paths):
        images = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
        return images if len(paths) > 1 else images[0]

    data = [(load(paths), captions) for paths, captions in items]
    return torch.utils.data.DataLoader(data, batch_size=64, collate_fn=lambda b: (
        torch.utils.data.default_collate([x for x, _ in b]), [c for _, c in b]))


@pytest.mark.parametrize("images_per_group", [1, 2])
def test_compositionality_equals_clip_benchmarks_image_caption_selection(run, tmp_path, images_per_group):
    """SugarCrepe-shaped (one image, its caption and a hard negative) and Winoground-shaped (two images, two
    captions) sets, scored by CLIP_benchmark's own `image_caption_selection.evaluate` as the reference."""
    selection = pytest.importorskip("clip_benchmark.metrics.image_caption_selection")
    from vclr.model.build import get_tokenizer
    from vclr.model.source import model_source

    names = image_files(tmp_path / "sel" / "test", 40 * images_per_group)
    rows = [{"file_names": names[i * images_per_group:(i + 1) * images_per_group],
             "captions": [f"a disc of hue {i % 7}", f"a disc of hue {(i + 3) % 7} at {i}"]} for i in range(40)]
    write_split(tmp_path / "sel" / "test", rows)
    ours = benchmark([str(run)], [str(tmp_path / "sel")], tmp_path / "out", settings=FAST)[0]
    assert ours["task"] == "compositionality"
    model, cfg = model_source(run=str(run)).load()
    folder = tmp_path / "sel" / "test"
    loader = _clip_benchmark_loader(model, [([folder / n for n in r["file_names"]], r["captions"]) for r in rows])
    theirs = selection.evaluate(model, loader, get_tokenizer(cfg.model), "cpu", amp=False)
    assert ours["metrics"] == theirs


def test_multilingual_retrieval_equals_clip_benchmark_per_language(run, tmp_path):
    retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    from vclr.model.build import get_tokenizer
    from vclr.model.source import model_source

    names = image_files(tmp_path / "ml" / "test", 30)
    rows = [{"file_name": n, "captions_en": [f"a disc of hue {i % 7}, {i}", f"picture {i}"],
             "captions_de": [f"eine Scheibe mit Farbton {i % 7}, {i}", f"Bild {i}"]} for i, n in enumerate(names)]
    write_split(tmp_path / "ml" / "test", rows)
    ours = benchmark([str(run)], [str(tmp_path / "ml")], tmp_path / "out", settings=FAST)[0]
    assert ours["task"] == "multilingual_retrieval"
    model, cfg = model_source(run=str(run)).load()
    for lang in ("de", "en"):
        loader = _clip_benchmark_loader(model, [([tmp_path / "ml" / "test" / r["file_name"]], r[f"captions_{lang}"])
                                                for r in rows])
        theirs = retrieval.evaluate(model, loader, get_tokenizer(cfg.model), "cpu", amp=False, recall_k_list=[1, 5])
        for name, value in theirs.items():
            assert ours["metrics"][f"{lang}/{name}"] == value, (lang, name)
    assert ours["metrics"]["mean/image_retrieval_recall@1"] == pytest.approx(
        np.mean([ours["metrics"][f"{lang}/image_retrieval_recall@1"] for lang in ("de", "en")]))


def test_compare_gives_paired_differences_of_two_models(run, small_shapes, tmp_path):
    other = untrained_run(tmp_path / "other", seed=1)
    benchmark([str(run), str(other)], [str(small_shapes / "test")], tmp_path / "out", settings=FAST)
    diffs = compare(tmp_path / "out", "tiny", "other", resamples=100, permutations=199)
    assert {d["figure"] for d in diffs} == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    for d in diffs:
        assert d["difference"] == pytest.approx(d["value_b"] - d["value_a"]) and 0 < d["p_value"] <= 1
        assert d["interval"][0] <= d["difference"] <= d["interval"][1]
    with pytest.raises(VclrError, match="has no results"):
        compare(tmp_path / "out", "tiny", "nobody")


def test_model_specs_name_every_source(run):
    assert parse_model_spec(str(run)).label == "tiny"
    assert parse_model_spec(f"mine={run}@best").source.checkpoint == "best"
    spec = parse_model_spec("ViT-B-32,laion2b_s34b_b79k")
    assert (spec.label, spec.source.name, spec.source.pretrained) == ("ViT-B-32,laion2b_s34b_b79k", "ViT-B-32",
                                                                       "laion2b_s34b_b79k")
    assert parse_model_spec("hf-hub:timm/ViT-B-16-SigLIP").source.name == "hf-hub:timm/ViT-B-16-SigLIP"


# ------------------------------------------------------------------------------------------------------ bad input


def test_an_unknown_dataset_lists_the_known_ones(run, tmp_path, capsys):
    with pytest.raises(UnknownDataset, match="fashion-mnist.*openmoji.*shapes"):
        resolve_dataset("no-such-set")
    assert main(["benchmark", "--model", str(run), "--dataset", "no-such-set", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown dataset 'no-such-set'" in err and "cifar10" in err


class _NoText:
    """A model source whose model cannot embed text."""

    def __init__(self, run):
        self.inner = parse_model_spec(str(run)).source

    def load(self, device=None):
        model, cfg = self.inner.load(device)

        def refuse(*args, **kwargs):
            raise NotImplementedError("this model has no text tower")

        model.encode_text = refuse
        return model, cfg

    def describe(self):
        return {"kind": "no-text", **self.inner.describe()}


def test_bad_cells_fail_in_one_line_and_the_others_complete(run, small_shapes, tmp_path, monkeypatch, capsys):
    nameless = labelled_dataset(tmp_path / "nameless", classnames=False)  # no classnames.txt, no class_name column
    labelled = labelled_dataset(tmp_path / "hues")
    broken = tmp_path / "broken"  # CLIP_benchmark's layout with a truncated shard
    (broken / "test").mkdir(parents=True)
    (broken / "test" / "nshards.txt").write_text("1\n")
    with tarfile.open(broken / "test" / "0.tar", "w") as archive:
        archive.add(labelled / "test" / "000.png", arcname="s0.png")
    (broken / "test" / "0.tar").write_bytes((broken / "test" / "0.tar").read_bytes()[:700])
    original = matrix.parse_model_spec
    monkeypatch.setattr(matrix, "parse_model_spec", lambda text: matrix.ModelSpec("notext", _NoText(run), text)
                        if text == "notext" else original(text))
    code = main(["benchmark", "--model", str(run), "--model", "notext", "--dataset", str(nameless), "--dataset",
                 str(broken), "--dataset", str(labelled), "--dataset", str(small_shapes / "test"), "--task", "auto",
                 "--task", "linear_probe", "--bootstrap", "20", "--lp-epochs", "2", "--out", str(tmp_path / "out")])
    assert code == 1
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    errors = {(r["model"], Path(r["dataset"]).name, r["task"]): r["error"] for r in rows if "error" in r}
    assert "no class names for zero-shot" in errors[("tiny", "nameless", "zeroshot_classification")]
    assert "cannot embed text" in errors[("notext", "hues", "zeroshot_classification")]
    assert "cannot embed text" in errors[("notext", "test", "retrieval")]
    ok = {(r["model"], Path(r["dataset"]).name, r["task"]) for r in rows if "metrics" in r}
    assert {("tiny", "hues", "zeroshot_classification"), ("tiny", "test", "retrieval"),
            ("notext", "hues", "linear_probe"), ("tiny", "nameless", "linear_probe")} <= ok
    assert all(len(message.splitlines()) == 1 for message in errors.values())
    summary = (tmp_path / "out" / "results.md").read_text()
    assert "cells that failed" in summary and "0.tar is broken" in summary and "0.tar is broken" in captured.out
    assert "cells failed" in captured.out


def test_clip_benchmark_names_come_from_its_hub_copies_or_say_why_not(monkeypatch):
    pytest.importorskip("clip_benchmark")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VclrError, match="clip-benchmark/wds_cifar10.*dataset_root"):
        resolve_dataset("cifar10")


def test_clip_benchmark_builder_datasets_are_written_in_the_standard_format(tmp_path, monkeypatch):
    """A name CLIP_benchmark's builder knows, with a root that is not its webdataset layout, goes through the builder
    (here its offline `dummy` set): images, labels, its class names and its templates for the name."""
    pytest.importorskip("clip_benchmark")
    from vclr.bench import datasets

    monkeypatch.setattr(datasets, "clip_benchmark_names", lambda: ["dummy"])
    data = resolve_dataset("dummy", root=str(tmp_path / "downloads"))
    assert data.kind == "classification" and data.classnames == ("blank image", "noisy image")
    assert data.templates and all("{c}" in t for t in data.templates)  # CLIP_benchmark's templates for "dummy"
    rows = (data.split("test") / "metadata.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["label"] == 0 and (data.split("test") / json.loads(rows[0])["file_name"]).is_file()


def test_a_model_that_does_not_load_fails_its_cells_and_the_others_run(run, small_shapes, tmp_path):
    labelled = labelled_dataset(tmp_path / "hues")
    rows = benchmark([f"broken=vclr-tiny-rn,{tmp_path / 'missing.pt'}", str(run)],
                     [str(small_shapes / "test"), str(labelled)], tmp_path / "out", settings=FAST, report=False)
    broken = [r for r in rows if r["model"] == "broken"]
    assert len(broken) == 2 and all("does not load" in r["error"] and "missing.pt" in r["error"] for r in broken)
    assert all("metrics" in r for r in rows if r["model"] == "tiny") and len(rows) == 4
