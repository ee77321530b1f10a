"""Weak-match calibration: the threshold's meaning checked by simulation, the pair sampler and the standouts against
naive loops, and searchers that mark a matching query's hits strong and an unrelated query's hits weak."""

import numpy as np
import pytest

from vclr.index.format import RetrievalIndex
from vclr.search.calibration import (
    MISS_RATE,
    NULL_PHRASES,
    STANDOUT_Z,
    standout,
    standout_threshold,
    unrelated_pair_scores,
    weak_match_threshold,
)
from vclr.search.searcher import Searcher


def test_an_unrelated_querys_best_hit_passes_the_threshold_about_miss_rate_of_the_time():
    rng = np.random.default_rng(0)
    threshold = weak_match_threshold(rng.standard_normal(1_000_000), searched_items=100)
    best_of_unrelated = rng.standard_normal((4000, 100)).max(1)  # 4000 unrelated queries over 100 items each
    assert np.mean(best_of_unrelated > threshold) == pytest.approx(MISS_RATE, abs=0.02)


def test_pair_scores_equal_a_naive_loop_without_related_pairs():
    rng = np.random.default_rng(1)
    captions, images = rng.standard_normal((7, 4)), rng.standard_normal((5, 4))
    owner = np.array([0, 0, 1, 2, 3, 4, 4])  # caption -> its image
    naive = [captions[c] @ images[i] for c in range(7) for i in range(5) if owner[c] != i]
    np.testing.assert_allclose(np.sort(unrelated_pair_scores(captions, images, owner)), np.sort(naive), rtol=1e-5)
    naive_images = [images[a] @ images[b] for a in range(5) for b in range(5) if a != b]
    np.testing.assert_allclose(np.sort(unrelated_pair_scores(images, images)), np.sort(naive_images), rtol=1e-5)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def searcher():
    """200 images and one caption each, close to its image (cosine ~0.7): no model needed for vector queries."""
    rng = np.random.default_rng(2)
    images = _unit(rng.standard_normal((200, 64)))
    captions = _unit(images + 0.7 * _unit(rng.standard_normal((200, 64))))
    index = RetrievalIndex.build(images, captions, np.arange(200), [f"img{i}.png" for i in range(200)],
                                 [f"caption {i}" for i in range(200)])
    return Searcher(index, encoder=None)  # vector queries only


def test_a_matching_query_is_strong_and_an_unrelated_one_weak(searcher):
    own = searcher.by_image_embedding(searcher.index.image_embeddings[3:4], k=3)
    assert own[0].caption == "caption 3" and not own[0].weak and all(h.weak for h in own[1:])
    unrelated = _unit(np.random.default_rng(3).standard_normal((1, 64)))
    assert all(h.weak for h in searcher.by_image_embedding(unrelated, k=5))
    assert all(h.weak for h in searcher.like(3, k=5))  # random images are unrelated to each other
    assert searcher.first_captions(own) == [None, None, None]  # caption hits carry their text already
    images = searcher.by_image_embedding(searcher.index.image_embeddings[3:4], k=2, images=True)
    assert images[0].id == 3 and searcher.first_captions(images) == ["caption 3", f"caption {images[1].id}"]


def test_standout_and_its_threshold_equal_naive_loops():
    rng = np.random.default_rng(4)
    queries, sample = _unit(rng.standard_normal((3, 8))), _unit(rng.standard_normal((20, 8)))
    scores = rng.uniform(-1, 1, (3, 2))  # (Q, k)
    tails = [sorted(sample @ q)[18] + 0.05 * (sorted(sample @ q)[19] - sorted(sample @ q)[18]) for q in queries]
    naive = np.array([[s - tail for s in row] for row, tail in zip(scores, tails)])  # the 95th percentile of 20
    np.testing.assert_allclose(standout(scores, queries, sample), naive, rtol=1e-4)
    null = rng.standard_normal(101)
    median = sorted(null)[50]
    mad = sorted(abs(z - median) for z in null)[50]
    assert standout_threshold(null) == pytest.approx(median + STANDOUT_Z * 1.4826 * mad)


class _Texts:
    """A query encoder for vectors the test makes up: text -> its vector."""

    def __init__(self, vectors: dict):
        self.vectors = vectors

    def embed_texts(self, texts):
        return np.stack([self.vectors[t] for t in texts])


def test_a_text_query_that_picks_its_image_out_is_strong_and_one_about_nothing_here_weak():
    """Every text sits near the collection (a model trained on one kind of picture): an unrelated query scores higher
    than a real caption does, but only the caption's hit stands out from the rest of the collection."""
    rng = np.random.default_rng(5)
    d = 64
    common = _unit(rng.standard_normal((1, d)))  # what every image and every text share
    images = _unit(common + 0.8 * _unit(rng.standard_normal((300, d))))
    near = lambda v: _unit(v + 0.5 * _unit(rng.standard_normal((1, d))))[0]  # noqa: E731
    vectors = {phrase: near(common) for phrase in NULL_PHRASES}
    vectors["a stapler"] = near(common)
    vectors["caption of 7"] = _unit(images[7:8] + 0.9 * _unit(rng.standard_normal((1, d))))[0]
    index = RetrievalIndex.build(images, images[:1], np.arange(1), [f"img{i}.png" for i in range(300)], ["x"])
    searcher = Searcher(index, encoder=_Texts(vectors))
    [caption], [unrelated] = (searcher.by_text(t, k=1) for t in ("caption of 7", "a stapler"))
    assert caption.id == 7 and not caption.weak
    assert unrelated.weak and unrelated.score > caption.score  # a rule on the score would have it the other way
    assert searcher.weak_standout() == pytest.approx(
        standout_threshold(standout(index.search_images(np.stack([vectors[p] for p in NULL_PHRASES]), 1)[0],
                                    np.stack([vectors[p] for p in NULL_PHRASES]), searcher._image_sample())))
