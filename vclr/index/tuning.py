"""Building and tuning FAISS indexes of the kinds in vclr.index.kinds, chosen on cross-modal recall.

For a collection of N vectors, `choose_index` picks an index type from N and a memory budget, builds it, and tunes
its search parameter (IVF `nprobe`, HNSW `efSearch`) to the smallest value whose recall@k against exact search
meets the target, measured with queries of the OTHER modality (caption embeddings searching images and vice versa):
they sit further from their neighbours than same-modality queries do (CLIP's modality gap), so same-modality queries
would overstate an ANN index's recall.

Candidates:
- N <= `exact_below` (50k): exact `IndexFlatIP` only; it answers in milliseconds anyway.
- raw vectors fit the memory budget: exact, IVF-Flat (scans nprobe of ~2*sqrt(N) lists) and HNSW32; each is built
  and tuned, and the fastest one meeting the target wins. Exact search competes too: on hard data a batched BLAS
  scan can beat an IVF index that must probe many lists.
- otherwise: OPQ + IVF-PQ (d/4 bytes a vector).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np

from vclr.index.kinds import IndexSpec, candidate_kinds, spec_for

logger = logging.getLogger(__name__)

PLATEAU = 0.002  # recall gained over two search-parameter steps below which the tuner stops climbing


@dataclass
class Tuning:
    """What the tuner measured: the chosen search-parameter value, its recall@k and speed, and the whole curve."""

    kind: str
    factory: str
    param: str | None
    value: int | None
    recall: float  # recall@k against exact search, cross-modal queries
    qps: float
    k: int
    target: float
    met: bool
    build_s: float = 0.0
    curve: list = field(default_factory=list)  # [(value, recall, qps)]
    candidates: list = field(default_factory=list)  # auto choice: [(factory, recall, qps, met)] of every type tried

    def to_dict(self) -> dict:
        return asdict(self)


def build(spec: IndexSpec, xb: np.ndarray, seed: int = 0, batch: int = 200_000) -> faiss.Index:
    """Train (on a sample of 64 points per list: k-means needs no more) and fill an inner-product index."""
    n, d = xb.shape
    index = faiss.index_factory(d, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        index.hnsw.efConstruction = 80  # faiss' default 40 caps the reachable recall at high efSearch
    if not index.is_trained:
        sample = min(n, max(64 * spec.nlist, 10_000))
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)) if sample < n else slice(None)
        index.train(np.ascontiguousarray(xb[rows], dtype=np.float32))
    for start in range(0, n, batch):
        index.add(np.ascontiguousarray(xb[start:start + batch], dtype=np.float32))
    return index


def set_search_param(index: faiss.Index, name: str | None, value: int | None) -> None:
    if name is not None and value is not None:
        faiss.ParameterSpace().set_index_parameter(index, name, int(value))


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k."""
    hits = [len(np.intersect1d(f[:k], e[:k])) for f, e in zip(found, exact)]
    return float(np.mean(hits)) / k


def timed_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, found = index.search(queries, k)
    return found, len(queries) / max(time.perf_counter() - start, 1e-9)


def _param_values(spec: IndexSpec) -> list[int]:
    if spec.search_param == "nprobe":
        return [v for v in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if v <= spec.nlist]
    return [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]


def tune(index: faiss.Index, spec: IndexSpec, queries: np.ndarray, exact: np.ndarray, k: int,
         target: float) -> Tuning:
    """The smallest search-parameter value whose recall@k meets `target` (or the best one, with met=False)."""
    if spec.search_param is None:
        found, qps = timed_search(index, queries, k)
        recall = recall_at_k(found, exact, k)
        return Tuning(spec.kind, spec.factory, None, None, recall, qps, k, target, recall >= target)
    curve = []
    for value in _param_values(spec):
        set_search_param(index, spec.search_param, value)
        found, qps = timed_search(index, queries, k)
        curve.append((value, recall_at_k(found, exact, k), qps))
        if curve[-1][1] >= target:
            break
        if len(curve) >= 3 and curve[-1][1] - curve[-3][1] < PLATEAU:
            break  # compressed codes cap the recall below the target: more probes only cost time
    # the smallest value that meets the target, else the smallest within PLATEAU of the best recall reached
    meeting = [c for c in curve if c[1] >= target]
    best_recall = max(c[1] for c in curve)
    value, recall, qps = meeting[0] if meeting else next(c for c in curve if c[1] >= best_recall - PLATEAU)
    set_search_param(index, spec.search_param, value)
    return Tuning(spec.kind, spec.factory, spec.search_param, value, recall, qps, k, target, recall >= target,
                  curve=curve)


def exact_neighbours(xb: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000) -> np.ndarray:
    """Exact top-k ids; xb (possibly a memory-mapped file) is read `chunk` rows at a time when it is larger."""
    if len(xb) <= chunk:
        flat = faiss.IndexFlatIP(xb.shape[1])
        flat.add(np.ascontiguousarray(xb, dtype=np.float32))
        return flat.search(queries, k)[1]
    from faiss.contrib.exhaustive_search import knn_ground_truth

    blocks = (np.ascontiguousarray(xb[i:i + chunk], dtype=np.float32) for i in range(0, len(xb), chunk))
    return knn_ground_truth(queries, blocks, k, metric_type=faiss.METRIC_INNER_PRODUCT)[1]


def choose_index(xb: np.ndarray, queries: np.ndarray, k: int = 10, target: float = 0.95,
                 memory_budget_bytes: float | None = None, exact_below: int = 50_000,
                 kind: str = "auto", seed: int = 0, chunk: int = 200_000) -> tuple[faiss.Index, Tuning]:
    """Build and tune every candidate type; keep the fastest whose cross-modal recall@k meets `target`.

    Exact search is a candidate too (recall 1 by definition): an ANN index that is not faster than it at the
    target recall is not chosen. `queries` (nq, d) are embeddings of the other modality; `kind` forces a type.
    `xb` may be a memory-mapped file: it is trained on a sample and read `chunk` rows at a time.
    """
    n, d = xb.shape
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    kinds = candidate_kinds(n, d, memory_budget_bytes, exact_below) if kind == "auto" else [kind]
    k = min(k, n)
    exact = exact_neighbours(xb, queries, k, chunk) if kinds != ["flat"] else None
    tried: list[tuple[faiss.Index, Tuning]] = []
    for candidate in kinds:
        spec = spec_for(candidate, n, d)
        start = time.perf_counter()
        index = build(spec, xb, seed, chunk)
        build_s = time.perf_counter() - start
        if spec.kind == "flat":
            _, qps = timed_search(index, queries, k)
            tuning = Tuning("flat", "Flat", None, None, 1.0, qps, k, target, True, build_s)
        else:
            tuning = tune(index, spec, queries, exact, k, target)
            tuning.build_s = build_s
        if tuning.param is None:  # exact search: nothing was tuned
            logger.info("%s: exact, %.0f queries/s", spec.factory, tuning.qps)
        else:
            logger.info("%s: recall@%d %.3f at %s=%s, %.0f queries/s", spec.factory, k, tuning.recall,
                        tuning.param, tuning.value, tuning.qps)
        tried.append((index, tuning))
    return pick(tried, k, target)


def pick(tried: list[tuple[faiss.Index, Tuning]], k: int, target: float) -> tuple[faiss.Index, Tuning]:
    """The rule of the automatic choice: the fastest index meeting the target, else the one with the best recall."""
    summary = [(t.factory, round(t.recall, 4), round(t.qps, 1), t.met) for _, t in tried]
    meeting = [t for t in tried if t[1].met]
    best = max(meeting, key=lambda t: t[1].qps) if meeting else max(tried, key=lambda t: t[1].recall)
    best[1].candidates = summary
    if meeting:
        return best
    logger.warning("no index type met recall@%d >= %.2f; using %s at recall %.3f", k, target, best[1].factory,
                   best[1].recall)
    return best
