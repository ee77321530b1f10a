"""The bounds of a search query, checked before anything heavy is imported or loaded (the CLI answers a bad argument
at once; the service answers 400), and the limits of the search service (vclr.serve.engine applies them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vclr.errors import VclrError

MAX_QUERY_CHARS = 1000
MAX_K = 1000


def check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise VclrError(f"k must be an integer from 1 to {MAX_K}, got {k}")


def check_text_query(text: str | None) -> str:
    text = (text or "").strip()
    if not text:
        raise VclrError("the text query is empty: say what to look for, e.g. 'a red circle'")
    if len(text) > MAX_QUERY_CHARS:
        raise VclrError(f"the text query has {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
    return text


@dataclass(frozen=True)
class ServiceLimits:
    """How the service batches, bounds and times its queries (`vclr serve` flags of the same names)."""

    max_batch: int = 64  # queries embedded and searched together
    batch_wait_ms: float = 1.0  # how long a lone query waits for others to join its batch
    max_queue: int = 64  # queries waiting beyond this are refused (503): latency stays bounded under overload
    timeout_s: float = 10.0  # a query not answered by then gets 503
    cache_size: int = 10_000  # text query embeddings kept (LRU)
    threads: int = 0  # threads for torch, faiss and onnxruntime in the worker (0: one per core)
    reload_every_s: float = 1.0  # how often the index folder is checked for a new save (0: never)

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1 or self.timeout_s <= 0 or self.batch_wait_ms < 0 or \
                self.cache_size < 0 or self.threads < 0 or self.reload_every_s < 0:
            raise VclrError(f"service limits out of range: max_batch={self.max_batch} (>= 1), max_queue="
                            f"{self.max_queue} (>= 1), timeout_s={self.timeout_s} (> 0), batch_wait_ms="
                            f"{self.batch_wait_ms} (>= 0), cache_size={self.cache_size} (>= 0), threads="
                            f"{self.threads} (>= 0), reload_every_s={self.reload_every_s} (>= 0)")

    @property
    def thread_count(self) -> int:
        return self.threads or os.cpu_count() or 1
