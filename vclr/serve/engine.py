"""What keeps the search service fast under load, and current while its index changes.

    live = LiveIndex(searcher, reopen=lambda old: ...)   # swaps to each new save of the index between batches
    engine = QueryEngine(live, ServiceLimits(max_batch=64))
    answer = await engine.submit(TextQuery("a red circle", k=10), render)   # in a request handler

One worker thread runs every embedding and every FAISS search, one batch at a time. Requests wait for it on the
event loop, so HTTP parsing never competes with compute for more threads than there are cores (torch and faiss each
spin one thread per core: two CPU-heavy jobs on 2 cores were measured 10x slower), and:

- **micro-batching**: the queries that arrive while a batch runs, or within `batch_wait_ms` of a lone one, are
  embedded together and searched in one FAISS call;
- **a bounded queue**: past `max_queue` waiting queries a request is refused at once with `Overloaded` (the service
  answers 503 and Retry-After) instead of waiting ever longer;
- **timeouts**: a query still queued after `timeout_s` is dropped and answered `TimedOut` (503);
- a text query's embedding comes from an LRU cache (`Searcher.text_cache`) when the same text was asked lately.

Every query of a batch is answered from one version of the index (`LiveIndex.current`, read once per batch); a
new save of the index on disk is loaded beside the old one and swapped in between batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vclr.errors import Overloaded, TimedOut, VclrError
from vclr.index.format import MANIFEST
from vclr.search.encoders import read_query_image
from vclr.search.limits import ServiceLimits
from vclr.search.query import Query
from vclr.search.searcher import Hit, QueryCache, Searcher
from vclr.storage import read_manifest

logger = logging.getLogger(__name__)


def bound_threads(threads: int) -> None:
    """Cap the compute threads of faiss (OpenMP) and, when it is loaded, torch: the worker is their only caller."""
    import sys

    import faiss

    faiss.omp_set_num_threads(threads)
    if "torch" in sys.modules:  # never imported here: an ONNX-backed service runs without torch
        sys.modules["torch"].set_num_threads(threads)


def _decoded(job: _Job):
    """The job's image, or None when it cannot be decoded (the job is then answered with the reason)."""
    try:
        return read_query_image(job.query.data)
    except VclrError as e:
        job.finish(e, failed=True)
        return None


# --------------------------------------------------------------------------------------------------- live index


def manifest_signature(index_dir: Path) -> tuple | None:
    """What changes when a new save of the index is published (the directory is renamed into place: a new inode)."""
    try:
        st = os.stat(index_dir / MANIFEST)
    except OSError:  # between the two renames of a save, or removed
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class LiveIndex:
    """The searcher of the newest complete save of an index. `current` is replaced as one reference, so a reader
    that takes it once sees one whole version; `check()` loads a new save (from a background thread with `watch`)."""

    def __init__(self, searcher: Searcher, reopen: Callable[[Searcher], Searcher] | None = None,
                 index_dir: str | Path | None = None):
        self.current = searcher
        self.index_dir = Path(index_dir) if index_dir else searcher.index_dir
        self._reopen = reopen or Searcher.reopen
        self._signature = manifest_signature(self.index_dir) if self.index_dir else None
        self._refused: tuple | None = None  # the save that failed to load
        self._stop = threading.Event()
        self.swaps = 0

    def check(self) -> bool:
        """Load and swap in a newer save if there is one. -> whether it swapped."""
        signature = manifest_signature(self.index_dir) if self.index_dir else None
        if signature is None or signature in (self._signature, self._refused):
            return False
        try:
            fresh = self._reopen(self.current)
        except (VclrError, OSError, ValueError) as e:  # damaged, or of a model this service cannot query
            logger.warning("the index at %s changed but cannot be served (%s); still serving version %s",
                           self.index_dir, e, self.current.index.version)
            self._refused = signature  # not loaded (and checksummed) again until the next save
            return False
        try:
            unchanged = fresh.index.manifest == read_manifest(self.index_dir, MANIFEST)
        except (OSError, ValueError):
            unchanged = False
        if not unchanged:
            return False  # saved again while it loaded: the next check loads the newer one
        self._signature = signature
        old, self.current = self.current, fresh
        self.swaps += 1
        logger.info("index %s: now serving version %s (%d images) instead of %s", self.index_dir, fresh.index.version,
                    fresh.index.manifest["num_images"], old.index.version)
        return True

    def watch(self, every_s: float) -> None:
        """Check for new saves every `every_s` seconds on a daemon thread, until `stop()`."""
        def loop():
            while not self._stop.wait(every_s):
                try:
                    self.check()
                except Exception:  # a reload must never take the service down
                    logger.exception("reloading the index failed; still serving version %s",
                                     self.current.index.version)

        if self.index_dir and every_s > 0:
            threading.Thread(target=loop, name="vclr-index-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


# ------------------------------------------------------------------------------------------------------ queries


@dataclass
class TextQuery:
    text: str  # checked (vclr.search.limits)
    k: int


@dataclass
class ImageQuery:
    data: bytes  # an uploaded image file, decoded in the worker (decoding a large JPEG takes ~0.1 s)
    k: int
    images: bool | None = None  # images rather than captions


@dataclass
class LikeQuery:
    image_id: int
    k: int


@dataclass
class SearchQuery:
    """Any other query (vclr.search.query.Query: several terms, negatives, filters, date order, paging): answered
    alone through Searcher.search, the path the CLI and the Python API take."""

    query: Query

    @property
    def k(self) -> int:
        return self.query.k


@dataclass
class _Job:
    query: TextQuery | ImageQuery | LikeQuery | SearchQuery
    render: Callable[[Searcher, list[Hit]], dict]  # the answer, made in the worker from the version it searched
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deadline: float
    queued_at: float = field(default_factory=time.monotonic)

    def finish(self, outcome: Any, failed: bool = False) -> None:
        def settle():
            if not self.future.done():  # the request may have timed out and gone
                (self.future.set_exception if failed else self.future.set_result)(outcome)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop has closed (a client gone with its event loop): nobody to answer
            pass


class QueryEngine:
    """The one worker that embeds and searches for every request (see the module's docstring)."""

    def __init__(self, live: LiveIndex, limits: ServiceLimits = ServiceLimits()):
        self.live, self.limits = live, limits
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._started = threading.Lock()
        self._worker: threading.Thread | None = None
        self.batches = self.queries = 0  # counters for /api/stats and tests
        self.largest_batch = 0
        self.batch_observer: Callable[[int], None] | None = None  # told each batch's size (the /metrics histogram)
        if live.current.text_cache is None and limits.cache_size:
            live.current.text_cache = QueryCache(limits.cache_size)

    async def submit(self, query, render: Callable[[Searcher, list[Hit]], dict]) -> dict:
        """Queue a query and wait for its answer; `Overloaded` at once when the queue is full, `TimedOut` after
        `timeout_s`."""
        self._start()
        if self._queue.qsize() >= self.limits.max_queue:
            raise Overloaded(f"the service is busy ({self._queue.qsize()} queries waiting); try again in a moment")
        loop = asyncio.get_running_loop()
        job = _Job(query, render, loop, loop.create_future(), time.monotonic() + self.limits.timeout_s)
        self._queue.put(job)
        try:
            return await asyncio.wait_for(job.future, self.limits.timeout_s)
        except asyncio.TimeoutError:
            raise TimedOut(f"the query was not answered within {self.limits.timeout_s:g} s; try again") from None

    def _start(self) -> None:
        with self._started:
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="vclr-query-worker", daemon=True)
                self._worker.start()

    def _run(self) -> None:
        bound_threads(self.limits.thread_count)
        while True:
            batch = self._next_batch()
            try:
                self._answer(batch)
            except Exception as e:  # a bug must fail these requests, never the worker
                logger.exception("search batch failed")
                for job in batch:
                    job.finish(e, failed=True)

    def _next_batch(self) -> list[_Job]:
        """The first waiting job, and whatever arrives within `batch_wait_ms` (or is waiting already), up to
        `max_batch`."""
        batch = [self._queue.get()]
        window_ends = time.monotonic() + self.limits.batch_wait_ms / 1000
        while len(batch) < self.limits.max_batch:
            try:
                batch.append(self._queue.get(timeout=max(window_ends - time.monotonic(), 0)) if
                             window_ends > time.monotonic() else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _answer(self, batch: list[_Job]) -> None:
        searcher = self.live.current  # one version of the index for the whole batch
        now = time.monotonic()
        for job in [j for j in batch if j.deadline <= now]:
            job.finish(TimedOut(f"the query waited {now - job.queued_at:.1f} s, longer than the service's "
                                f"timeout of {self.limits.timeout_s:g} s; try again"), failed=True)
        batch = [j for j in batch if j.deadline > now]
        self.batches, self.queries = self.batches + 1, self.queries + len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        if self.batch_observer is not None and batch:
            self.batch_observer(len(batch))
        texts = [j for j in batch if isinstance(j.query, TextQuery)]
        images = [j for j in batch if isinstance(j.query, ImageQuery)]
        if texts:
            vectors = searcher.embed_texts([j.query.text for j in texts])  # (T, D), cached ones not embedded again
            self._finish(texts, searcher, searcher.image_hits(vectors, max(j.query.k for j in texts), "text"))
        decoded = {id(j): _decoded(j) for j in images}
        images = [j for j in images if decoded[id(j)] is not None]
        if images:
            vectors = searcher.embed_images([decoded[id(j)] for j in images])  # (I, D)
            for wants_images in (True, False):
                group = [row for row, j in enumerate(images) if searcher.wants_images(j.query.images) == wants_images]
                if group:
                    k = max(images[row].query.k for row in group)
                    hits = searcher.image_hits(vectors[group], k, "image") if wants_images else \
                        searcher.caption_hits(vectors[group], k)
                    self._finish([images[row] for row in group], searcher, hits)
        for job in batch:
            if isinstance(job.query, (LikeQuery, SearchQuery)):
                try:
                    hits = searcher.like(job.query.image_id, job.query.k) if isinstance(job.query, LikeQuery) \
                        else searcher.search(job.query.query)
                    self._finish([job], searcher, [hits])
                except VclrError as e:
                    job.finish(e, failed=True)

    @staticmethod
    def _finish(jobs: list[_Job], searcher: Searcher, hits: list[list[Hit]]) -> None:
        """Each job's hits, cut to its own k (the batch was searched with the largest), rendered by the job."""
        for job, job_hits in zip(jobs, hits):
            try:
                job.finish(job.render(searcher, job_hits[:job.query.k]))
            except Exception as e:
                job.finish(e, failed=True)

    @property
    def waiting(self) -> int:
        """Queries queued for the worker."""
        return self._queue.qsize()

    def stats(self) -> dict:
        cache = self.live.current.text_cache
        return {"waiting": self._queue.qsize(), "batches": self.batches, "queries": self.queries,
                "largest_batch": self.largest_batch, "index_version": self.live.current.index.version,
                "index_swaps": self.live.swaps,
                "cache": {"hits": cache.hits, "misses": cache.misses} if cache else None}
