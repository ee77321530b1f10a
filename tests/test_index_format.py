"""Index search against numpy brute force; save/load round trip; atomic overwrite."""

import numpy as np
import pytest

from vclr.errors import IndexDirError
from vclr.index.format import RetrievalIndex


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def index():
    rng = np.random.default_rng(0)
    img = _unit(rng.normal(size=(50, 16)))
    t2i = np.repeat(np.arange(50), 2)
    txt = _unit(img[t2i] + 0.3 * rng.normal(size=(100, 16)))
    return RetrievalIndex.build(img, txt, t2i, [f"img{i}.png" for i in range(50)], [f"cap{j}" for j in range(100)],
                                {"model_config_hash": "abc"})


def test_search_matches_brute_force(index):
    rng = np.random.default_rng(1)
    xq = _unit(rng.normal(size=(7, 16)))
    D, I = index.search_images(xq, 5)
    scores = xq @ index.image_embeddings.T
    want = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    assert np.array_equal(I, want)
    np.testing.assert_allclose(D, np.take_along_axis(scores, want, 1), rtol=1e-5)
    D, I = index.search_texts(xq, 200)  # k larger than the collection: all of it
    assert I.shape == (7, 100)


def test_save_load_round_trip(index, tmp_path):
    xq = index.text_embeddings[:9]
    before = index.search_images(xq, 10), index.search_texts(index.image_embeddings[:4], 10)
    index.save(tmp_path / "idx")
    loaded = RetrievalIndex.load(tmp_path / "idx")
    after = loaded.search_images(xq, 10), loaded.search_texts(index.image_embeddings[:4], 10)
    for (d0, i0), (d1, i1) in zip(before, after):
        assert np.array_equal(i0, i1) and np.array_equal(d0, d1)
    assert loaded.image_paths == index.image_paths and loaded.texts == index.texts
    assert np.array_equal(loaded.caption_image, index.caption_image)
    assert loaded.manifest["model_config_hash"] == "abc" and loaded.manifest["num_texts"] == 100


def test_overwrite_replaces_whole_and_leaves_no_temp(index, tmp_path):
    index.save(tmp_path / "idx")
    smaller = RetrievalIndex.build(index.image_embeddings[:3], index.text_embeddings[:3], np.arange(3),
                                   index.image_paths[:3], index.texts[:3])
    smaller.save(tmp_path / "idx")
    assert RetrievalIndex.load(tmp_path / "idx").manifest["num_images"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_failed_save_keeps_previous_index(index, tmp_path, monkeypatch):
    index.save(tmp_path / "idx")
    import vclr.index.format as mod

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mod.np, "save", crash)
    with pytest.raises(OSError):
        index.save(tmp_path / "idx")
    assert RetrievalIndex.load(tmp_path / "idx").manifest["num_images"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_load_errors(tmp_path, index):
    with pytest.raises(IndexDirError, match="does not exist"):
        RetrievalIndex.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexDirError, match="not a vclr index"):
        RetrievalIndex.load(tmp_path / "empty")
    with pytest.raises(IndexDirError, match="query dimension 3"):
        index.search_images(np.zeros((1, 3), dtype=np.float32), 1)
