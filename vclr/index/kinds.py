"""The kinds of FAISS index an index directory may hold: one table, one row per kind. Pure Python (no faiss), so
that the CLI's choices and the config checks come from it without importing faiss.

Each row says how to describe the index for `faiss.index_factory` over n vectors of dimension d, which search
parameter the tuner (vclr.index.tuning) climbs, its resident memory estimate, and when `auto` tries it:
- `exact`: the only candidate for collections up to `exact_below` items (exact search answers in milliseconds);
- `fits`: tried, with the other `fits` kinds, when its memory estimate fits the budget; the fastest one meeting the
  recall target wins (exact search competes too: on hard data a BLAS scan can beat an IVF index probing many lists);
- `fallback`: the choice when no `fits` kind fits the budget.

Adding a kind is one row here (and its factory string must be one faiss builds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

HNSW_M = 32  # links per HNSW node


@dataclass(frozen=True)
class IndexSpec:
    kind: str
    factory: str  # faiss.index_factory description, derived from the fields below
    nlist: int = 0  # IVF inverted lists
    pq_bytes: int = 0  # PQ code bytes per vector (sub-quantisers of 8 bits)

    @property
    def search_param(self) -> str | None:
        return INDEX_KINDS[self.kind].search_param


@dataclass(frozen=True)
class IndexKind:
    spec: Callable[[int, int], IndexSpec]  # (n, d) -> the index's factory description
    search_param: str | None  # the parameter the tuner climbs (None: nothing to tune)
    memory: Callable[[IndexSpec, int, int], int]  # (spec, n, d) -> resident bytes, estimated
    candidate: Literal["exact", "fits", "fallback"]  # when `auto` tries it (see the module's docstring)


def ivf_lists(n: int) -> int:
    """~2*sqrt(N) inverted lists (a power of two; 2048 at 1M), with >= 39 training points per list as faiss asks.

    Fewer, longer lists than faiss' 4-16*sqrt(N) rule of thumb: k-means on 2 CPU cores stays at about a minute for
    1M x 512, and the tuner raises nprobe to the recall target anyway."""
    nlist = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))
    return int(max(1, min(nlist, n // 39)))


def _ivf_flat(n: int, d: int) -> IndexSpec:
    nlist = ivf_lists(n)
    return IndexSpec("ivf_flat", f"IVF{nlist},Flat", nlist=nlist)


def _ivf_pq(n: int, d: int) -> IndexSpec:
    m, nlist = max(1, d // 4), ivf_lists(n)  # d/4 bytes a vector: 128 B at d=512, 16x smaller than float32
    while d % m:  # PQ sub-quantisers must divide the dimension
        m -= 1
    return IndexSpec("ivf_pq", f"OPQ{m},IVF{nlist},PQ{m}", nlist=nlist, pq_bytes=m)


INDEX_KINDS: dict[str, IndexKind] = {
    "flat": IndexKind(lambda n, d: IndexSpec("flat", "Flat"), None,
                      lambda spec, n, d: 4 * n * d, "exact"),
    "ivf_flat": IndexKind(_ivf_flat, "nprobe",
                          lambda spec, n, d: 4 * n * d + 8 * n + 4 * spec.nlist * d, "fits"),  # vectors, ids, lists
    "hnsw": IndexKind(lambda n, d: IndexSpec("hnsw", f"HNSW{HNSW_M},Flat"), "efSearch",
                      # vectors + ~2M links per level-0 node + level info
                      lambda spec, n, d: 4 * n * d + n * HNSW_M * 2 * 4 + 8 * n, "fits"),
    "ivf_pq": IndexKind(_ivf_pq, "nprobe",  # codes + ids + lists + OPQ rotation
                        lambda spec, n, d: n * spec.pq_bytes + 8 * n + 4 * spec.nlist * d + 4 * d * d, "fallback"),
}
INDEX_CHOICES: tuple[str, ...] = ("auto", *INDEX_KINDS)  # "auto": the measured choice (vclr.index.tuning)


def spec_for(kind: str, n: int, d: int) -> IndexSpec:
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    return INDEX_KINDS[kind].spec(n, d)


def memory_bytes(spec: IndexSpec, n: int, d: int) -> int:
    """Resident size estimate of an index over n vectors."""
    return INDEX_KINDS[spec.kind].memory(spec, n, d)


def candidate_kinds(n: int, d: int, memory_budget_bytes: float | None, exact_below: int) -> list[str]:
    """Index types worth trying for n vectors within the budget; exact search is always a candidate when it fits."""
    if n <= exact_below:
        return [name for name, kind in INDEX_KINDS.items() if kind.candidate == "exact"]
    budget = memory_budget_bytes or float("inf")
    fits = [name for name, kind in INDEX_KINDS.items() if kind.candidate in ("exact", "fits")
            and memory_bytes(spec_for(name, n, d), n, d) <= budget]
    return fits or [name for name, kind in INDEX_KINDS.items() if kind.candidate == "fallback"]
