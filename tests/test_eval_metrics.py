"""Recall@k and ranks against a brute-force reference: several captions per image, and ties."""

import numpy as np
import pytest

from vclr.eval.metrics import image_to_text_ranks, retrieval_metrics, text_to_image_ranks


def brute_force(img, txt, t2i, ks):
    """Sort every candidate list with a stable sort on -score (ties: lower index first)."""
    n, c = len(img), len(txt)
    t2i_ranks = []
    for q in range(c):
        scores = [float(np.dot(txt[q], img[i])) for i in range(n)]
        order = sorted(range(n), key=lambda i: (-scores[i], i))
        t2i_ranks.append(order.index(t2i[q]) + 1)
    i2t_ranks = []
    for i in range(n):
        scores = [float(np.dot(img[i], txt[j])) for j in range(c)]
        order = sorted(range(c), key=lambda j: (-scores[j], j))
        i2t_ranks.append(min(order.index(j) + 1 for j in range(c) if t2i[j] == i))
    out = {}
    for name, ranks in (("image_to_text", i2t_ranks), ("text_to_image", t2i_ranks)):
        ranks = np.array(ranks)
        out.update({f"{name}_R@{k}": 100.0 * np.mean(ranks <= k) for k in ks})
        out[f"{name}_mean_rank"] = ranks.mean()
        out[f"{name}_median_rank"] = np.median(ranks)
    return out


def _captions_per_image(kind, n, rng):
    if kind == "one":
        counts = np.ones(n, dtype=int)
    elif kind == "five":
        counts = np.full(n, 5)
    else:
        counts = rng.integers(1, 7, size=n)
    return np.repeat(np.arange(n), counts)


@pytest.mark.parametrize("kind", ["one", "five", "variable"])
@pytest.mark.parametrize("seed", [0, 1])
def test_recall_matches_brute_force(kind, seed):
    rng = np.random.default_rng(seed)
    n, d = 40, 8
    t2i = _captions_per_image(kind, n, rng)
    rng.shuffle(t2i)  # captions need not be grouped by image
    t2i[:n] = np.arange(n)  # ... but every image keeps at least one
    img = rng.normal(size=(n, d)).astype(np.float32)
    txt = (img[t2i] + rng.normal(scale=1.2, size=(len(t2i), d))).astype(np.float32)
    ks = (1, 5, 10)
    got = retrieval_metrics(img, txt, t2i, ks)
    want = brute_force(img, txt, t2i, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got["rsum"] == pytest.approx(sum(v for k, v in want.items() if "_R@" in k))
    assert 0 < got["text_to_image_R@1"] < 100  # the data is neither trivial nor hopeless: the test can fail


def test_ties_broken_by_lower_index():
    # small integers: every dot product is exact, so equal vectors tie exactly
    img = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], dtype=np.float32)  # images 0, 1, 3 identical
    txt = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    t2i = np.array([0, 1, 2, 3, 2])
    got_t2i = text_to_image_ranks(img, txt, t2i)
    assert got_t2i.tolist() == [1, 2, 1, 3, 1]  # tied images 0 < 1 < 3 in index order
    got_i2t = image_to_text_ranks(img, txt, t2i)
    assert got_i2t.tolist() == [1, 2, 1, 3]  # image 1's caption (index 1) ties with caption 0 ahead of it
    want = brute_force(img, txt, t2i, (1, 2))
    got = retrieval_metrics(img, txt, t2i, (1, 2))
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


@pytest.mark.parametrize("block", [1, 3, 7, 1000])
def test_blocked_equals_single_block(block):
    rng = np.random.default_rng(5)
    img = rng.integers(-2, 3, size=(23, 4)).astype(np.float32)  # integer vectors: many exact ties
    t2i = np.concatenate([np.arange(23), rng.integers(0, 23, size=30)])
    txt = rng.integers(-2, 3, size=(len(t2i), 4)).astype(np.float32)
    assert np.array_equal(text_to_image_ranks(img, txt, t2i, block=block), text_to_image_ranks(img, txt, t2i, 10**6))
    assert np.array_equal(image_to_text_ranks(img, txt, t2i, block=block), image_to_text_ranks(img, txt, t2i, 10**6))


def test_rejects_image_without_caption():
    img = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(img, img[:2], np.array([0, 1]))


def test_zero_shot_matches_argmax_reference():
    from vclr.eval.metrics import zero_shot_metrics

    rng = np.random.default_rng(3)
    classes = rng.normal(size=(6, 8)).astype(np.float32)
    labels = rng.integers(0, 6, size=200)
    images = (classes[labels] + rng.normal(scale=1.5, size=(200, 8))).astype(np.float32)
    got = zero_shot_metrics(images, classes, labels, [f"c{i}" for i in range(6)], ks=(1, 3))
    scores = images @ classes.T
    order = np.argsort(-scores, axis=1, kind="stable")
    assert got["zero_shot_top1"] == pytest.approx(100 * np.mean(order[:, 0] == labels))
    assert got["zero_shot_top3"] == pytest.approx(100 * np.mean([l in o[:3] for l, o in zip(labels, order)]))
    assert got["zero_shot_top1/c2"] == pytest.approx(100 * np.mean(order[labels == 2, 0] == 2))
    assert 20 < got["zero_shot_top1"] < 100
    # ties go to the lower class index
    tied = zero_shot_metrics(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), np.array([0, 1]), ["a", "b"])
    assert tied["zero_shot_top1"] == 50.0


# ---------------------------------------------------------------- classification, clustering, verification


def test_knn_classify_matches_naive_weighted_votes():
    from vclr.eval.metrics import knn_classify, top_k_accuracy

    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 8)).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    labels = rng.integers(0, 4, 60)
    test = rng.normal(size=(9, 8)).astype(np.float32)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    got = knn_classify(train, labels, test, num_classes=4, k=7, temperature=0.1)
    for i, query in enumerate(test):
        sims = train @ query
        top = np.argsort(-sims, kind="stable")[:7]
        want = np.zeros(4)
        for j in top:
            want[labels[j]] += np.exp(sims[j] / 0.1)
        np.testing.assert_allclose(got[i], want, rtol=1e-4)
    acc = top_k_accuracy(got, np.argmax(got, axis=1), ks=(1,))
    assert acc == {"knn_top1": 100.0}


def _naive_ari(a, b):
    from itertools import combinations
    from math import comb

    n = len(a)
    same_a = [a[i] == a[j] for i, j in combinations(range(n), 2)]
    same_b = [b[i] == b[j] for i, j in combinations(range(n), 2)]
    index = sum(x and y for x, y in zip(same_a, same_b))
    rows, cols = sum(same_a), sum(same_b)
    expected = rows * cols / comb(n, 2)
    return (index - expected) / ((rows + cols) / 2 - expected)


def _naive_nmi(a, b):
    n = len(a)
    mutual = 0.0
    for x in set(a):
        for y in set(b):
            joint = sum(1 for i in range(n) if a[i] == x and b[i] == y) / n
            if joint:
                mutual += joint * np.log(joint / ((list(a).count(x) / n) * (list(b).count(y) / n)))
    h = lambda v: -sum((list(v).count(x) / n) * np.log(list(v).count(x) / n) for x in set(v))  # noqa: E731
    return mutual / ((h(a) + h(b)) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_and_ari_match_naive_definitions(seed):
    from vclr.eval.metrics import adjusted_rand_index, normalized_mutual_info

    rng = np.random.default_rng(seed)
    labels, clusters = rng.integers(0, 4, 40), rng.integers(0, 5, 40)
    assert adjusted_rand_index(labels, clusters) == pytest.approx(_naive_ari(labels, clusters))
    assert normalized_mutual_info(labels, clusters) == pytest.approx(_naive_nmi(labels, clusters))
    relabelled = (labels + 7) * 3  # names do not matter, only the partition
    assert adjusted_rand_index(labels, relabelled) == pytest.approx(1.0)
    assert normalized_mutual_info(labels, relabelled) == pytest.approx(1.0)


def test_clustering_recovers_separated_groups():
    from vclr.eval.metrics import adjusted_rand_index, cluster, normalized_mutual_info

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32)) * 4
    labels = np.repeat(np.arange(6), 50)
    x = centres[labels] + rng.normal(size=(300, 32))
    found = cluster(x, 6, pca_dim=8, seed=0)
    assert normalized_mutual_info(labels, found) > 0.95 and adjusted_rand_index(labels, found) > 0.9
    shuffled = rng.permutation(labels)  # clusters vs unrelated labels: near 0
    assert abs(adjusted_rand_index(shuffled, found)) < 0.05


def test_best_f1_threshold_is_the_brute_force_best():
    from vclr.eval.metrics import best_f1_threshold, verification_prf

    rng = np.random.default_rng(3)
    positive = np.round(rng.normal(0.6, 0.15, 80), 2)  # rounding makes ties
    negative = np.round(rng.normal(0.3, 0.15, 300), 2)
    threshold = best_f1_threshold(positive, negative)
    best = max(verification_prf(positive, negative, t)["f1"] for t in np.unique(np.concatenate([positive, negative])))
    assert verification_prf(positive, negative, threshold)["f1"] == pytest.approx(best)
    prf = verification_prf(np.array([0.9, 0.8, 0.2]), np.array([0.85, 0.1]), 0.5)
    assert prf["precision"] == pytest.approx(200 / 3) and prf["recall"] == pytest.approx(200 / 3)


def test_blocks_are_sized_to_the_memory_budget():
    from vclr.eval.metrics import block_rows

    assert block_rows(1_000_000) * 1_000_000 * 6 <= (1 << 30)
    assert block_rows(10) == 8192 and block_rows(10**12) == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("block", [2, None])
def test_torch_ranks_equal_numpy_ranks(device, block):
    """The device evaluator against the numpy one, on integer vectors (exact dot products, many exact ties) with a
    variable number of captions per image."""
    import torch

    from vclr.eval.metrics_torch import retrieval_ranks

    rng = np.random.default_rng(5)
    img = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    t2i = np.concatenate([np.arange(40), rng.integers(0, 40, 50)])
    txt = (img[t2i] + rng.integers(-1, 2, size=(90, 6))).astype(np.float32)
    i2t, t2i_ranks = retrieval_ranks(img, txt, t2i, torch.device(device), block)
    assert np.array_equal(i2t, image_to_text_ranks(img, txt, t2i, block=block))
    assert np.array_equal(t2i_ranks, text_to_image_ranks(img, txt, t2i, block=block))
