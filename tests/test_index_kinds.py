"""ANN index types against brute-force numpy search, tuned on cross-modal queries; the automatic choice."""

import numpy as np
import pytest

from vclr.data.synthetic_vectors import structured_pairs
from vclr.index.kinds import candidate_kinds, memory_bytes, spec_for
from vclr.index.tuning import build, choose_index, exact_neighbours, recall_at_k, tune


@pytest.fixture(scope="module")
def pairs():
    return structured_pairs(20_000, 32, seed=0, clusters=200, queries=300)


def _brute_force(xb, xq, k):
    return np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :k]


def test_recall_at_k_matches_set_overlap():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 2, 9], [7, 8, 9]])
    assert recall_at_k(found, exact, 3) == pytest.approx((2 / 3 + 0) / 2)


def test_exact_neighbours_match_brute_force(pairs):
    xb, xq = pairs
    got = exact_neighbours(xb, xq, 10)
    want = _brute_force(xb, xq, 10)
    assert recall_at_k(got, want, 10) > 0.999  # ties in float32 may swap equal scores


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw", pytest.param("ivf_pq", marks=pytest.mark.slow)])
def test_each_index_type_reaches_the_target_against_brute_force(pairs, kind):
    xb, xq = pairs
    spec = spec_for(kind, len(xb), xb.shape[1])
    index = build(spec, xb)
    exact = _brute_force(xb, xq, 10)
    target = 0.9 if kind != "ivf_pq" else 0.6  # 8-byte codes for 32 dims: compressed codes cap the recall
    tuning = tune(index, spec, xq, exact, 10, target)
    assert tuning.met, tuning
    # the chosen value is the smallest that meets the target: the one before it did not
    values = [c[0] for c in tuning.curve]
    assert values[-1] == tuning.value and all(c[1] < target for c in tuning.curve[:-1])
    _, found = index.search(xq, 10)  # the index keeps the tuned value
    assert recall_at_k(found, exact, 10) == pytest.approx(tuning.recall)


def test_cross_modal_queries_are_harder_than_same_modality(pairs):
    """Why the tuner uses the other modality's queries: same-modality ones overstate recall."""
    xb, xq = pairs
    spec = spec_for("ivf_flat", len(xb), xb.shape[1])
    index = build(spec, xb)
    index.nprobe = 1
    same = xb[:300] + 0.01 * np.random.default_rng(1).standard_normal((300, 32)).astype(np.float32)
    same /= np.linalg.norm(same, axis=1, keepdims=True)
    cross_recall = recall_at_k(index.search(xq, 10)[1], _brute_force(xb, xq, 10), 10)
    same_recall = recall_at_k(index.search(same, 10)[1], _brute_force(xb, same, 10), 10)
    assert same_recall > cross_recall + 0.05


@pytest.mark.slow  # trains OPQ + PQ (~25 s on 2 cores)
def test_auto_choice(pairs):
    xb, xq = pairs
    index, tuning = choose_index(xb, xq, k=10, target=0.9)  # 20k <= exact_below: exact
    assert tuning.kind == "flat" and tuning.recall == 1.0 and index.ntotal == len(xb)
    index, tuning = choose_index(xb, xq, k=10, target=0.9, exact_below=1000)
    assert tuning.met and [c[0] for c in tuning.candidates] == ["Flat", "IVF256,Flat", "HNSW32,Flat"]
    assert round(tuning.qps, 1) == max(c[2] for c in tuning.candidates if c[3])  # the fastest meeting the target
    # a budget below the raw vectors' size leaves only compressed codes
    budget = memory_bytes(spec_for("ivf_pq", len(xb), 32), len(xb), 32) * 1.5
    assert candidate_kinds(len(xb), 32, budget, 1000) == ["ivf_pq"]
    index, tuning = choose_index(xb, xq, k=10, target=0.5, memory_budget_bytes=budget, exact_below=1000)
    assert tuning.kind == "ivf_pq"
