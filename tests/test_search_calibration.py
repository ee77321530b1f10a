"""Weak-match calibration: the threshold's meaning checked by simulation, the pair sampler against a naive loop, and a
searcher that marks a matching query's hits strong and an unrelated query's hits weak."""

import numpy as np
import pytest

from vclr.index.format import RetrievalIndex
from vclr.search.calibration import MISS_RATE, unrelated_pair_scores, weak_match_threshold
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
