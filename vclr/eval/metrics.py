"""Retrieval metrics: pure numpy functions of L2-normalised embeddings.

Any number of captions per image: `caption_image[c]` is the image of caption c. Image->text is a hit at k when ANY
of the image's captions is in the top k. Ranks are 1-based. Ties are broken by index: among equal scores the
candidate with the lower index ranks first (the order a stable sort on -score gives), so results are deterministic.
Scores are computed in blocks of queries sized to a memory budget (about 1 GiB: `block_rows`), so 1M captions x 200k
images run in a few GiB; the dense matrix is never built.

Also here: weighted kNN classification (NPID), clustering quality (k-means via faiss; NMI, ARI) and threshold-based
pair verification (precision / recall / F1).
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np


def _ranks_of_targets(scores: np.ndarray, target_scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """1-based rank of each row's target among that row's candidates, ties broken by candidate index.

    Two passes over the block (> and >=) for all rows; the index tie-break is worked out only for the rare rows where
    another candidate scores exactly the target's score.
    """
    greater = np.count_nonzero(scores > target_scores[:, None], axis=1)  # (b,)
    equal = np.count_nonzero(scores >= target_scores[:, None], axis=1) - greater  # (b,) includes the target itself
    ranks = greater + 1
    for row in np.flatnonzero(equal > 1):
        ties = np.flatnonzero(scores[row] == target_scores[row])
        ranks[row] += np.count_nonzero(ties < target_index[row])
    return ranks


def _blocks(total: int, block: int):
    """(start, stop) of consecutive query blocks: memory stays at block x candidates scores."""
    for start in range(0, total, block):
        yield start, min(start + block, total)


MAX_BLOCK_BYTES = 1 << 30  # the score block and its masks stay near this size, whatever the collection


def block_rows(candidates: int, max_bytes: int = MAX_BLOCK_BYTES) -> int:
    """Query rows per block so that a (rows, candidates) float32 block plus a boolean mask or two fit `max_bytes`."""
    return max(1, min(8192, max_bytes // max(1, candidates * (4 + 2))))


def text_to_image_ranks(image_embeddings: np.ndarray, text_embeddings: np.ndarray, caption_image: np.ndarray,
                        block: int | None = None) -> np.ndarray:
    """(C,) rank of each caption's own image among all images."""
    block = block or block_rows(len(image_embeddings))
    ranks = np.empty(len(text_embeddings), dtype=np.int64)
    for start, stop in _blocks(len(text_embeddings), block):
        scores = text_embeddings[start:stop] @ image_embeddings.T  # (b, N)
        targets = caption_image[start:stop]
        target_scores = scores[np.arange(stop - start), targets]
        ranks[start:stop] = _ranks_of_targets(scores, target_scores, targets)
    return ranks


def image_to_text_ranks(image_embeddings: np.ndarray, text_embeddings: np.ndarray, caption_image: np.ndarray,
                        block: int | None = None) -> np.ndarray:
    """(N,) rank of the best-ranked caption of each image among all captions.

    Each image's captions are found through a by-image ordering of the captions (no (b, C) positive mask), so a block
    costs its score matrix and the comparison masks only.
    """
    block = block or block_rows(len(text_embeddings))
    by_image = np.argsort(caption_image, kind="stable")  # caption ids grouped by image, ascending within an image
    group_start = np.searchsorted(caption_image[by_image], np.arange(len(image_embeddings) + 1))  # (N + 1,)
    ranks = np.empty(len(image_embeddings), dtype=np.int64)
    for start, stop in _blocks(len(image_embeddings), block):
        scores = image_embeddings[start:stop] @ text_embeddings.T  # (b, C)
        captions = by_image[group_start[start]:group_start[stop]]  # this block's positives, grouped by image
        rows = caption_image[captions] - start
        values = scores[rows, captions]
        groups = group_start[start:stop] - group_start[start]  # where each image's captions begin in `captions`
        best_score = np.maximum.reduceat(values, groups)  # (b,)
        # ties among an image's own captions: the lowest caption index is its best, as a stable sort would say
        best_index = np.minimum.reduceat(np.where(values == best_score[rows], captions, len(caption_image)), groups)
        ranks[start:stop] = _ranks_of_targets(scores, best_score, best_index)
    return ranks


def _summary(prefix: str, ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    out[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    return out


def check_retrieval_inputs(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                           caption_image: np.ndarray) -> None:
    if image_embeddings.ndim != 2 or text_embeddings.ndim != 2 or image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(f"embeddings must be (N, D) and (C, D); got {image_embeddings.shape} and "
                         f"{text_embeddings.shape}")
    if caption_image.shape != (len(text_embeddings),):
        raise ValueError(f"text_to_image must have one entry per caption: {caption_image.shape} vs "
                         f"{len(text_embeddings)} captions")
    if len(caption_image) and (caption_image.min() < 0 or caption_image.max() >= len(image_embeddings)):
        raise ValueError("text_to_image holds an image index out of range")
    if len(np.unique(caption_image)) != len(image_embeddings):
        raise ValueError("every image needs at least one caption for image->text recall")


def retrieval_metrics(image_embeddings: np.ndarray, text_embeddings: np.ndarray, caption_image: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k (percent) both ways, mean/median rank, and rsum (the sum of all the recalls)."""
    caption_image = np.asarray(caption_image, dtype=np.int64)
    check_retrieval_inputs(image_embeddings, text_embeddings, caption_image)
    image_embeddings = np.ascontiguousarray(image_embeddings, dtype=np.float32)
    text_embeddings = np.ascontiguousarray(text_embeddings, dtype=np.float32)
    return metrics_from_ranks(image_to_text_ranks(image_embeddings, text_embeddings, caption_image),
                              text_to_image_ranks(image_embeddings, text_embeddings, caption_image), ks)


def metrics_from_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """The summary of `retrieval_metrics` from already computed ranks ((N,) and (C,))."""
    metrics = _summary("image_to_text", i2t_ranks, ks) | _summary("text_to_image", t2i_ranks, ks)
    metrics["rsum"] = sum(v for k, v in metrics.items() if "_R@" in k)
    metrics["num_images"] = len(i2t_ranks)
    metrics["num_texts"] = len(t2i_ranks)
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


# ------------------------------------------------------------------------------------------------ classification


KNN_K = 200  # NPID's settings: the report states the ones used from here
KNN_TEMPERATURE = 0.07


def knn_classify(train_embeddings: np.ndarray, train_labels: np.ndarray, test_embeddings: np.ndarray,
                 num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """(M, K) class scores of weighted kNN (NPID, Wu et al. 2018): the top-k neighbours by cosine vote for their
    class with weight exp(similarity / temperature)."""
    index = faiss.IndexFlatIP(train_embeddings.shape[1])
    index.add(np.ascontiguousarray(train_embeddings, dtype=np.float32))
    k = min(k, len(train_embeddings))
    similarities, neighbours = index.search(np.ascontiguousarray(test_embeddings, dtype=np.float32), k)  # (M, k)
    weights = np.exp(similarities.astype(np.float64) / temperature)  # (M, k)
    votes = np.zeros((len(test_embeddings), num_classes))
    np.add.at(votes, (np.arange(len(test_embeddings))[:, None], np.asarray(train_labels)[neighbours]), weights)
    return votes


def top_k_accuracy(class_scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5),
                   prefix: str = "knn") -> dict[str, float]:
    """Top-k accuracy (percent); ties between classes go to the lower class index."""
    labels = np.asarray(labels, dtype=np.int64)
    ranks = _ranks_of_targets(class_scores, class_scores[np.arange(len(labels)), labels], labels)
    return {f"{prefix}_top{k}": float(100.0 * np.mean(ranks <= k)) for k in ks if k <= class_scores.shape[1]}


# ---------------------------------------------------------------------------------------------------- clustering


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each new centre drawn with probability ~ squared distance."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    nearest = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        centres.append(x[rng.choice(len(x), p=nearest / nearest.sum()) if nearest.sum() > 0 else rng.integers(len(x))])
        nearest = np.minimum(nearest, ((x - centres[-1]) ** 2).sum(axis=1))
    return np.stack(centres).astype(np.float32)


def cluster(embeddings: np.ndarray, k: int, pca_dim: int = 64, seed: int = 0, niter: int = 25) -> np.ndarray:
    """PCA -> L2 normalise -> k-means (k-means++ seeding, faiss Lloyd iterations). -> (N,) cluster ids."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if pca_dim and pca_dim < x.shape[1]:
        pca = faiss.PCAMatrix(x.shape[1], pca_dim)
        pca.train(x)
        x = pca.apply(x)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1)
    kmeans.train(x, init_centroids=kmeans_plus_plus(x, k, seed))
    return kmeans.index.search(x, 1)[1][:, 0]


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    _, a_ids = np.unique(a, return_inverse=True)
    _, b_ids = np.unique(b, return_inverse=True)
    table = np.zeros((a_ids.max() + 1, b_ids.max() + 1), dtype=np.int64)
    np.add.at(table, (a_ids, b_ids), 1)
    return table


def normalized_mutual_info(labels: np.ndarray, clusters: np.ndarray) -> float:
    """NMI with the arithmetic-mean normaliser: I(L; C) / ((H(L) + H(C)) / 2)."""
    table = _contingency(labels, clusters).astype(np.float64)
    p = table / table.sum()
    pl, pc = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mutual = float((p[nz] * np.log(p[nz] / np.outer(pl, pc)[nz])).sum())
    entropy = lambda q: float(-(q[q > 0] * np.log(q[q > 0])).sum())  # noqa: E731
    denominator = (entropy(pl) + entropy(pc)) / 2
    return 1.0 if denominator == 0 else mutual / denominator


def adjusted_rand_index(labels: np.ndarray, clusters: np.ndarray) -> float:
    """ARI (Hubert & Arabie): pair-counting agreement, 0 for chance, 1 for identical partitions."""
    table = _contingency(labels, clusters)
    pairs = lambda v: (v * (v - 1) / 2).sum()  # noqa: E731
    index, rows, cols = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    expected = rows * cols / pairs(np.array([table.sum()]))
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


# -------------------------------------------------------------------------------------------- pair verification


def verification_prf(positive_scores: np.ndarray, negative_scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision / recall / F1 (percent) of calling a pair matched when its similarity >= threshold."""
    true_positive = float(np.sum(positive_scores >= threshold))
    false_positive = float(np.sum(negative_scores >= threshold))
    precision = true_positive / (true_positive + false_positive) if true_positive + false_positive else 0.0
    recall = true_positive / len(positive_scores) if len(positive_scores) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1, "threshold": float(threshold)}


def best_f1_threshold(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """The similarity threshold with the highest F1 (choose it on a validation split, report on another)."""
    scores = np.concatenate([positive_scores, negative_scores])
    is_positive = np.concatenate([np.ones(len(positive_scores)), np.zeros(len(negative_scores))])
    order = np.argsort(-scores, kind="stable")
    true_positive = np.cumsum(is_positive[order])  # predicting the first i+1 by score as matched
    predicted = np.arange(1, len(scores) + 1)
    f1 = 2 * true_positive / (predicted + len(positive_scores))
    # only thresholds at the last of a run of equal scores are realisable
    last_of_value = np.append(scores[order][1:] != scores[order][:-1], True)
    best = np.argmax(np.where(last_of_value, f1, -1))
    return float(scores[order][best])
