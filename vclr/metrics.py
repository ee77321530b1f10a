"""Retrieval metrics: pure numpy functions of L2-normalised embeddings.

Any number of captions per image: `text_to_image[c]` is the image of caption c. Image->text is a hit at k when ANY
of the image's captions is in the top k. Ranks are 1-based. Ties are broken by index: among equal scores the
candidate with the lower index ranks first (the order a stable sort on -score gives), so results are deterministic.
Scores are computed in blocks of queries, so memory stays at (block x candidates) floats.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _ranks_of_targets(scores: np.ndarray, target_scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """1-based rank of each row's target among that row's candidates, ties broken by candidate index."""
    columns = np.arange(scores.shape[1])[None, :]  # (1, N)
    ahead = (scores > target_scores[:, None]) | ((scores == target_scores[:, None]) & (columns < target_index[:, None]))
    return ahead.sum(axis=1) + 1  # (b,)


def _blocks(total: int, block: int):
    """(start, stop) of consecutive query blocks: memory stays at block x candidates scores."""
    for start in range(0, total, block):
        yield start, min(start + block, total)


def text_to_image_ranks(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_to_image: np.ndarray,
                        block: int = 4096) -> np.ndarray:
    """(C,) rank of each caption's own image among all images."""
    ranks = np.empty(len(text_embeddings), dtype=np.int64)
    for start, stop in _blocks(len(text_embeddings), block):
        scores = text_embeddings[start:stop] @ image_embeddings.T  # (b, N)
        targets = text_to_image[start:stop]
        target_scores = scores[np.arange(stop - start), targets]
        ranks[start:stop] = _ranks_of_targets(scores, target_scores, targets)
    return ranks


def image_to_text_ranks(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_to_image: np.ndarray,
                        block: int = 1024) -> np.ndarray:
    """(N,) rank of the best-ranked caption of each image among all captions."""
    ranks = np.empty(len(image_embeddings), dtype=np.int64)
    for start, stop in _blocks(len(image_embeddings), block):
        scores = image_embeddings[start:stop] @ text_embeddings.T  # (b, C)
        positive = text_to_image[None, :] == np.arange(start, stop)[:, None]  # (b, C)
        positive_scores = np.where(positive, scores, -np.inf)
        best_score = positive_scores.max(axis=1)  # (b,)
        best_index = np.argmax(positive_scores == best_score[:, None], axis=1)  # first (lowest index) best positive
        ranks[start:stop] = _ranks_of_targets(scores, best_score, best_index)
    return ranks


def _summary(prefix: str, ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    out[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    return out


def check_retrieval_inputs(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                           text_to_image: np.ndarray) -> None:
    if image_embeddings.ndim != 2 or text_embeddings.ndim != 2 or image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(f"embeddings must be (N, D) and (C, D); got {image_embeddings.shape} and "
                         f"{text_embeddings.shape}")
    if text_to_image.shape != (len(text_embeddings),):
        raise ValueError(f"text_to_image must have one entry per caption: {text_to_image.shape} vs "
                         f"{len(text_embeddings)} captions")
    if len(text_to_image) and (text_to_image.min() < 0 or text_to_image.max() >= len(image_embeddings)):
        raise ValueError("text_to_image holds an image index out of range")
    if len(np.unique(text_to_image)) != len(image_embeddings):
        raise ValueError("every image needs at least one caption for image->text recall")


def retrieval_metrics(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_to_image: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k (percent) both ways, mean/median rank, and rsum (the sum of all the recalls)."""
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    check_retrieval_inputs(image_embeddings, text_embeddings, text_to_image)
    image_embeddings = np.ascontiguousarray(image_embeddings, dtype=np.float32)
    text_embeddings = np.ascontiguousarray(text_embeddings, dtype=np.float32)
    metrics = _summary("image_to_text", image_to_text_ranks(image_embeddings, text_embeddings, text_to_image), ks)
    metrics |= _summary("text_to_image", text_to_image_ranks(image_embeddings, text_embeddings, text_to_image), ks)
    metrics["rsum"] = sum(v for k, v in metrics.items() if "_R@" in k)
    metrics["num_images"] = len(image_embeddings)
    metrics["num_texts"] = len(text_embeddings)
    return metrics


def zero_shot_metrics(image_embeddings: np.ndarray, class_embeddings: np.ndarray, labels: np.ndarray,
                      class_names: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (percent) of classifying each image by its most similar class embedding, and per-class top-1.

    Ties between classes go to the lower class index, as everywhere in this module.
    """
    scores = np.asarray(image_embeddings, dtype=np.float32) @ np.asarray(class_embeddings, dtype=np.float32).T
    labels = np.asarray(labels, dtype=np.int64)
    ranks = _ranks_of_targets(scores, scores[np.arange(len(labels)), labels], labels)  # (N,) rank of the true class
    out = {f"zero_shot_top{k}": float(100.0 * np.mean(ranks <= k)) for k in ks if k <= scores.shape[1]}
    for c, name in enumerate(class_names):
        members = labels == c
        if members.any():
            out[f"zero_shot_top1/{name}"] = float(100.0 * np.mean(ranks[members] <= 1))
    return out
