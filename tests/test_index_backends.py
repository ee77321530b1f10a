"""`vclr index --backend auto|torch|onnx [--int8]`: the collection embedded through the model's ONNX export, int8
guarded on the collection, `auto` choosing the fastest passing backend, and the index recording its embedder."""

import json
from functools import partial

import numpy as np
import pytest
from helpers import untrained_index

import vclr.export.backends as backends
from vclr.cli import main
from vclr.errors import VclrError
from vclr.export.backends import choose_towers, int8_guard
from vclr.export.onnx import export_onnx
from vclr.index.build import build_index
from vclr.index.format import RetrievalIndex
from vclr.model.source import model_source
from vclr.search.onnx import OnnxQueryEncoder


@pytest.fixture(scope="module")
def torch_index(small_shapes, tmp_path_factory):
    """The small test split indexed by an untrained tiny model saved as a run, with PyTorch (the reference)."""
    return untrained_index(small_shapes / "test", tmp_path_factory.mktemp("backends") / "run")


def _run(torch_index):
    return torch_index.parent / "run"


def _vectors(index_dir):
    index = RetrievalIndex.load(index_dir)
    order = np.argsort(index.store.image_paths(list(range(index.manifest["num_images"]))))
    return np.asarray(index.image_embeddings)[order], np.asarray(index.text_embeddings)


def naive_guard(fp32, int8, k):
    """Cosines, and for each vector the share of its k nearest others (by a plain loop) that both sets agree on."""
    fp32 = fp32 / np.linalg.norm(fp32, axis=1, keepdims=True)
    int8 = int8 / np.linalg.norm(int8, axis=1, keepdims=True)
    overlaps = []
    for i in range(len(fp32)):
        others = [j for j in range(len(fp32)) if j != i]
        near32 = sorted(others, key=lambda j: (-float(fp32[i] @ fp32[j]), j))[:k]
        near8 = sorted(others, key=lambda j: (-float(int8[i] @ int8[j]), j))[:k]
        overlaps.append(len(set(near32) & set(near8)) / k)
    return (fp32 * int8).sum(1), float(np.mean(overlaps))


@pytest.mark.parametrize("seed", range(3))
def test_the_guard_equals_a_naive_count(seed):
    rng = np.random.default_rng(seed)
    fp32 = rng.standard_normal((40, 16)).astype(np.float32)
    int8 = fp32 + rng.normal(0, 0.05 * (seed + 1), fp32.shape).astype(np.float32)
    cosines, overlap = naive_guard(fp32, int8, 10)
    guard = int8_guard(fp32, int8)
    assert guard["min_cosine"] == pytest.approx(cosines.min(), abs=1e-5)
    assert guard["top10_overlap"] == pytest.approx(overlap, abs=1e-4)
    assert guard["passed"] == (cosines.min() >= backends.GUARD_MIN_COSINE and overlap >= backends.GUARD_MIN_OVERLAP)


def test_onnx_indexes_equal_the_torch_index(torch_index, small_shapes, tmp_path, monkeypatch):
    """The same collection through the fp32 export equals PyTorch's vectors; through int8 it stays within the guard,
    and each index records what embedded it."""
    # the untrained tiny model's vectors are nearly collapsed: neighbours tie within int8's noise (top-10 overlap
    # 0.57 at cosine 0.99996), so the guard rightly refuses int8 there; this test is about the int8 path itself
    monkeypatch.setattr(backends, "GUARD_MIN_OVERLAP", 0.0)
    source = model_source(run=_run(torch_index))
    reference_images, reference_texts = _vectors(torch_index)
    for precision, bar in (("fp32", 0.9999), ("int8", backends.GUARD_MIN_COSINE)):
        update = build_index(source, str(small_shapes / "test"), tmp_path / precision,
                             towers=partial(choose_towers, source, backend="onnx", int8=precision == "int8"))
        assert update.backend_choice.precision == precision and update.added == len(reference_images)
        images, texts = _vectors(tmp_path / precision)
        assert (images * reference_images).sum(1).min() >= bar and (texts * reference_texts).sum(1).min() >= bar
        manifest = json.loads((tmp_path / precision / "manifest.json").read_text())
        assert manifest["embedder"] == {"backend": "onnx", "precision": precision}
    assert json.loads((torch_index / "manifest.json").read_text())["embedder"] == {"backend": "torch",
                                                                                  "precision": "fp32"}


def test_a_failing_guard_embeds_with_fp32_and_says_so(torch_index, small_shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backends, "GUARD_MIN_COSINE", 1.01)  # no int8 tower reaches it
    assert main(["index", "--run", str(_run(torch_index)), "--data", str(small_shapes / "test"), "--out",
                 str(tmp_path / "idx"), "--backend", "onnx", "--int8"]) == 0
    out = capsys.readouterr().out
    assert "embedded with onnx fp32: int8 failed the guard on this collection" in out
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["embedder"]["precision"] == "fp32"


def test_auto_picks_the_fastest_passing_backend_and_times_it_once(torch_index, small_shapes, monkeypatch):
    paths = [str(p) for p in sorted((small_shapes / "test").rglob("*.png"))]
    source = model_source(run=_run(torch_index))
    assert choose_towers(source, paths).backend == "torch"  # a small collection: no export
    monkeypatch.setattr(backends, "AUTO_MIN_IMAGES", 1)
    timed = []
    real_rate = backends._rate
    monkeypatch.setattr(backends, "_rate", lambda run, count: timed.append(count) or real_rate(run, count))
    first = choose_towers(source, paths)
    assert len(timed) == 3 and set(first.speeds) == {"torch", "onnx fp32", "onnx int8"}
    best = max(first.speeds, key=first.speeds.get) if first.guard["passed"] else None
    assert best is None or f"{first.backend} {first.precision}".replace("torch fp32", "torch") == best
    again = choose_towers(source, paths)
    assert len(timed) == 3 and again.speeds == first.speeds  # the machine's figures are kept
    monkeypatch.setattr(backends, "GUARD_MIN_COSINE", 1.01)
    assert choose_towers(source, paths).precision == "fp32"  # int8 never wins when it fails the guard


def test_reindexing_with_another_backend_builds_afresh(torch_index, small_shapes, tmp_path):
    source = model_source(run=_run(torch_index))
    build_index(source, str(small_shapes / "test"), tmp_path / "idx")
    same = build_index(source, str(small_shapes / "test"), tmp_path / "idx")
    assert not same.rebuilt and same.added == 0  # an up-to-date torch index: nothing embedded
    other = build_index(source, str(small_shapes / "test"), tmp_path / "idx",
                        towers=partial(choose_towers, source, backend="onnx"))
    assert other.rebuilt and other.added > 0


def test_an_index_built_through_onnx_refuses_another_models_encoder(torch_index, small_shapes, tmp_path):
    source = model_source(run=_run(torch_index))
    build_index(source, str(small_shapes / "test"), tmp_path / "idx",
                towers=partial(choose_towers, source, backend="onnx", int8=True))
    export_onnx(model_source(model="vclr-tiny-vit"), tmp_path / "other")
    with pytest.raises(VclrError, match="vclr export --index"):
        OnnxQueryEncoder.load(tmp_path / "other").check_index(RetrievalIndex.load(tmp_path / "idx"))


def test_backend_errors_name_the_problem(torch_index, small_shapes, tmp_path, capsys):
    with pytest.raises(VclrError, match="no weights"):
        choose_towers(model_source(model="vclr-tiny-rn"), ["x.jpg"], backend="onnx")
    with pytest.raises(VclrError, match="`backend` onnx"):
        choose_towers(model_source(run=_run(torch_index)), ["x.jpg"], backend="torch", int8=True)
    assert main(["index", "--run", str(_run(torch_index)), "--data", str(small_shapes / "test"), "--out",
                 str(tmp_path / "idx"), "--backend", "torch", "--int8"]) == 2
    assert "--backend onnx" in capsys.readouterr().err


def test_a_model_whose_int8_export_fails_its_check_is_indexed_in_fp32(torch_index, small_shapes, tmp_path,
                                                                      monkeypatch, capsys):
    """The OpenMoji LiT model's int8 export fails its own probes (MiniLM's int8 text: cosine 0.96): `onnx
    --int8` and `auto` embed in fp32 and say so, and the refused export is not tried again."""
    import vclr.export.onnx as onnx_mod

    monkeypatch.setattr(onnx_mod, "MIN_COSINE_INT8", 1.01)  # no int8 export passes its check
    exports = []
    real = onnx_mod.export_onnx
    monkeypatch.setattr(onnx_mod, "export_onnx", lambda *a, **k: exports.append(k.get("int8")) or real(*a, **k))
    assert main(["index", "--run", str(_run(torch_index)), "--data", str(small_shapes / "test"), "--out",
                 str(tmp_path / "idx"), "--backend", "onnx", "--int8"]) == 0
    assert "embedded with onnx fp32: int8 failed the guard" in capsys.readouterr().out
    assert exports.count(True) == 1
    monkeypatch.setattr(backends, "AUTO_MIN_IMAGES", 1)
    paths = [str(p) for p in sorted((small_shapes / "test").rglob("*.png"))]
    choice = choose_towers(model_source(run=_run(torch_index)), paths)
    assert choice.precision == "fp32" and "int8" not in choice.speeds and "export_check" in choice.guard
    assert exports.count(True) == 1  # refused once, remembered
