"""When is a search hit a weak match? Calibrated on the index itself, against pairs that are unrelated.

A query about something the collection does not hold ("pizza" over photos of shapes) still gets a top hit: the image
that scores highest by chance. Its score is then no better than what unrelated pairs reach. The threshold is a score
that an unrelated query's best hit, among the N items it searches, stays under 9 times in 10: the (1 - 0.1/N)
quantile of the scores of random unrelated pairs (N such scores all stay under it with probability ~0.9).

    threshold = weak_match_threshold(pair_scores, searched_items)   # a hit is weak when score <= threshold

Unrelated pairs are drawn at random: an image and a caption of another image (across modalities), two different
images (image to image). An index without captions pairs its images with a fixed set of everyday phrases instead.
Deleted items still take part: their vectors are as unrelated as any.
"""

from __future__ import annotations

import numpy as np

SAMPLE = 1000  # queries and items drawn: up to 1M pairs, one (1000, d) @ (d, 1000) product
MISS_RATE = 0.1  # how often an unrelated query's best hit may still pass as a match

# captionless indexes: varied everyday phrases, any one of which most images of a collection do not show
PHRASES = (
    "a photo of a dog", "a cat sleeping on a sofa", "a plate of pasta", "a pizza", "a red car on a street",
    "a mountain landscape", "a beach at sunset", "a city skyline at night", "a bowl of fruit", "a bicycle",
    "a person playing guitar", "a bird on a branch", "a cup of coffee", "a snowy forest", "a child smiling",
    "an airplane in the sky", "a wooden table", "a bunch of flowers", "a football match", "a computer keyboard",
    "a horse in a field", "a birthday cake", "a river with a bridge", "an old building", "a pair of shoes",
    "a train station", "a glass of wine", "a fish in an aquarium", "a desert road", "a laptop on a desk",
    "a red heart", "a smiling face", "a star", "a blue circle", "a green square", "an arrow pointing left",
    "a musical note", "a traffic light", "a flag", "a clock", "the number seven", "the letter A",
)


def weak_match_threshold(pair_scores: np.ndarray, searched_items: int) -> float:
    """The (1 - MISS_RATE/N) quantile of unrelated-pair scores (N = searched items), within the sample's resolution."""
    scores = np.asarray(pair_scores, dtype=np.float64)
    if scores.size == 0:
        return float("-inf")
    q = min(1 - MISS_RATE / max(searched_items, 1), 1 - 1 / scores.size)
    return float(np.quantile(scores, q))


def unrelated_pair_scores(queries: np.ndarray, items: np.ndarray, related: np.ndarray | None = None,
                          sample: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """Scores (dot products) of every pair of up to `sample` random queries and `sample` random items, leaving out
    the pairs `related[query] == item` marks (a caption and its own image) or, with `related` None and the queries
    being the items themselves, each item with itself. -> (pairs,)"""
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(len(queries), min(sample, len(queries)), replace=False))
    i = np.sort(rng.choice(len(items), min(sample, len(items)), replace=False))
    scores = np.asarray(queries[q], dtype=np.float32) @ np.asarray(items[i], dtype=np.float32).T  # (Q, I)
    own = related[q] if related is not None else q  # the item each query must not be paired with
    return scores[own[:, None] != i[None, :]]
