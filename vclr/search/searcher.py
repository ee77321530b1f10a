"""Query an index: text -> images, image -> images ("more like this"), image -> captions.

    searcher = Searcher.open("indexes/photos")         # the index, and the encoder its queries go through
    hits = searcher.by_text("a dog on a beach", k=5)   # list[Hit]: rank, score, id, path or caption, weak
    hits = searcher.by_image_file("query.jpg", k=5)    # captions when the index has them, else images
    hits = searcher.like(42, k=5)                      # images like indexed image 42
    hits = search_by_text("indexes/photos", "a dog on a beach", k=5)   # the index knows its model

A searcher holds one `QueryEncoder` (vclr.search.encoders): by default the index's traced text tower, so a cold
text query imports torch alone and the model loads only for an image query. Each hit says whether it is `weak`: no
better than the best an unrelated query reaches by chance in this collection (vclr.search.calibration).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vclr.errors import VclrError
from vclr.index.format import RetrievalIndex
from vclr.model.source import ModelSource, as_source
from vclr.search.calibration import (
    NULL_PHRASES,
    STANDOUT_SAMPLE,
    standout,
    standout_threshold,
    unrelated_pair_scores,
    weak_match_threshold,
)
from vclr.search.duplicates import (
    DEFAULT_THRESHOLD,
    Calibration,
    DuplicateGroup,
    calibrate_threshold,
    collapse_duplicates,
    find_duplicates,
    store_calibration,
    stored_calibration,
)
from vclr.search.encoders import QueryEncoder, default_encoder, read_query_image
from vclr.search.limits import check_k, check_text_query
from vclr.search.query import Query, Term

logger = logging.getLogger(__name__)


@dataclass
class Hit:
    rank: int
    score: float
    id: int
    path: str | None = None  # an image hit
    caption: str | None = None  # a caption hit
    weak: bool = False  # the score is no better than unrelated queries reach by chance (vclr.search.calibration)
    taken: str | None = None  # an image hit's date taken (EXIF, else the file's mtime), ISO 8601 local time
    words: str | None = None  # the query's words as OCR read them in the image, marked [like this]

    @property
    def value(self) -> str:
        return self.path if self.path is not None else self.caption

    def to_json(self) -> dict:
        kind = {"path": self.path, "taken": self.taken} if self.path is not None else {"caption": self.caption}
        words = {"words": self.words} if self.words is not None else {}
        return {"rank": self.rank, "score": self.score, "id": self.id, **kind, "weak": self.weak, **words}


class QueryCache:
    """The embeddings of the latest distinct text queries (least recently used ones go first); thread-safe."""

    def __init__(self, capacity: int):
        self.capacity, self._vectors, self._lock = capacity, OrderedDict(), threading.Lock()
        self.hits = self.misses = 0

    def get(self, text: str) -> np.ndarray | None:
        with self._lock:
            vector = self._vectors.get(text)
            if vector is None:
                self.misses += 1
                return None
            self._vectors.move_to_end(text)
            self.hits += 1
            return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._vectors[text] = vector
            self._vectors.move_to_end(text)
            while len(self._vectors) > self.capacity:
                self._vectors.popitem(last=False)


@dataclass
class Searcher:
    """An index and the one query encoder that embeds its queries (vclr.search.encoders): the model of a source,
    the index's traced text tower (the model loads for image queries only), or an ONNX export."""

    index: RetrievalIndex
    encoder: QueryEncoder
    index_dir: Path | None = None
    text_cache: QueryCache | None = None  # text query -> embedding (the service keeps one)
    _weak_below: dict = field(default_factory=dict, repr=False)  # calibration thresholds and sample, computed once
    _duplicates: Calibration | None = field(default=None, repr=False)  # the index's near-duplicate calibration

    @classmethod
    def open(cls, index_dir: str | Path, source: ModelSource | str | os.PathLike | None = None,
             mmap: bool = False, load_model: bool = True, encoder: QueryEncoder | None = None) -> Searcher:
        """`source`: the model that embeds queries (default: the index's traced text tower, else the model it
        records); `load_model=False`: the model loads only when a query needs it (a cold text query through the
        traced tower never does); `encoder`: every query goes through it (an ONNX export: torch is never
        imported)."""
        index = RetrievalIndex.load(index_dir, mmap=mmap)
        if encoder is None:
            encoder = default_encoder(index, index_dir, as_source(source) if source else None)
            if load_model:
                encoder.load_model()
        encoder.check_index(index)
        return cls(index, encoder, Path(index_dir))

    def reopen(self) -> Searcher:
        """The newest save of this searcher's index with the encoder that fits it (`QueryEncoder.reopen` decides
        what is kept), the query cache when the encoder is the same, and the weak-match calibration of the new save
        done now when this searcher had done its own."""
        index = RetrievalIndex.load(self.index_dir, mmap=isinstance(self.index.image_embeddings, np.memmap))
        encoder = self.encoder.reopen(self.index, index)
        cache = self.text_cache
        if encoder is not self.encoder and cache is not None:
            cache = QueryCache(cache.capacity)
        fresh = Searcher(index, encoder, self.index_dir, text_cache=cache)
        if "standout" in self._weak_below:  # calibrated here (the service's watch thread), not on a query's time
            fresh.weak_standout()
        return fresh

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit vectors: from the cache, else by the encoder."""
        cached = [self.text_cache.get(t) for t in texts] if self.text_cache else [None] * len(texts)
        todo = list(dict.fromkeys(t for t, vector in zip(texts, cached) if vector is None))  # a text asked twice: once
        fresh = dict(zip(todo, self.encoder.embed_texts(todo))) if todo else {}
        vectors = [vector if vector is not None else fresh[text] for text, vector in zip(texts, cached)]
        if self.text_cache:
            for text, vector in zip(texts, vectors):
                self.text_cache.put(text, vector)
        return np.stack(vectors) if vectors else np.zeros((0, self.index.d), np.float32)

    def embed_images(self, images: Sequence) -> np.ndarray:
        """Decoded RGB PIL images (vclr.search.encoders.read_query_image) -> (N, D) unit vectors."""
        return self.encoder.embed_images(images)

    @property
    def has_captions(self) -> bool:
        return self.index.manifest["num_texts"] - self.index.manifest["deleted_texts"] > 0

    def image_hits(self, vectors: np.ndarray, k: int, query: str, among: np.ndarray | None = None,
                   dated: bool = False) -> list[list[Hit]]:
        """Queries (N, D) of kind `query` ("text"/"image") -> their top-k images each, searched in one batch;
        `among`: only these image ids; `dated`: with each hit's date taken."""
        D, I = self.index.search_images(vectors, k, among)
        weak = self._weak_image_hits(vectors, D, query)  # (N, k)
        hits = [[Hit(r + 1, float(s), int(i), path=p, weak=bool(w))
                 for r, (s, i, p, w) in enumerate(zip(scores, ids, self.index.store.image_paths(ids), marks))]
                for scores, ids, marks in zip(D, I, weak)]
        if dated:
            for row in hits:
                for hit, facts in zip(row, self.index.store.facts([h.id for h in row])):
                    hit.taken = _iso(facts["taken"])
        return hits

    # ------------------------------------------------------------------------------------- the one query path

    def search(self, query: Query) -> list[Hit]:
        """The hits of a query (vclr.search.query): images ranked by cosine with its combined vector, filtered,
        sorted and paged; a lone image query gets captions when the index has them (and images were not asked for).
        An image id among the positives is left out of its own results ("more like this")."""
        vector = self.query_vector(query)  # (1, D)
        kind = "text" if all(t.kind == "text" for t in query.positives) else "image"
        if query.single_image and not self.wants_images(query.images):
            hits = self.caption_hits(vector, query.offset + query.k)[0]
            return [replace(h, rank=r + 1) for r, h in enumerate(hits)][query.offset:]
        among = self.index.store.select_images(**query.where.bounds()) if not query.where.empty else None
        own = {int(t.value) for t in query.positives if t.kind == "id"}
        pool = query.offset + query.k + len(own)
        if query.sort == "date":  # every hit above min_score may be the newest: take a wide pool of them
            pool = max(pool, DATE_POOL)
        if query.distinct:  # copies fall out of the pool: take more
            pool = max(pool * DISTINCT_POOL, DISTINCT_POOL * 10)
        hits = [h for h in self.image_hits(vector, pool, kind, among, dated=True)[0] if h.id not in own]
        hits = [h for h in self._with_words(query, hits, vector, among, pool)
                if h.words is not None or query.min_score is None or h.score >= query.min_score]
        if query.distinct:
            vectors = np.asarray(self.index.image_embeddings[[h.id for h in hits]], np.float32)  # (n, D)
            hits = collapse_duplicates(hits, vectors, self.duplicate_threshold())
        if query.sort == "date":
            hits.sort(key=lambda h: h.taken or "", reverse=True)  # ISO dates sort as text; unknown dates last
        return [replace(h, rank=query.offset + r + 1) for r, h in enumerate(hits[query.offset:][:query.k])]

    def _with_words(self, query: Query, hits: list[Hit], vector: np.ndarray, among: np.ndarray | None,
                    pool: int) -> list[Hit]:
        """Images whose OCR text holds every word of the query's texts, fused with the embedding ranking by
        reciprocal-rank fusion: score(image) = sum over the two rankings of 1 / (RRF_K + rank), an image missing from a
        ranking adding nothing; ties go to the word match. Word matches are never weak and pass `min_score` (the
        words are there). An index without OCR text, or a query without texts, keeps the embedding ranking."""
        words = " ".join(str(t.value) for t in query.positives if t.kind == "text")
        if not words or not self.index.manifest.get("ocr"):
            return hits
        matches = self.index.store.match_words(words, pool)
        if among is not None:
            allowed = set(among.tolist())
            matches = [(i, w) for i, w in matches if i in allowed]
        if not matches:
            return hits
        fused = {h.id: 1 / (RRF_K + r + 1) for r, h in enumerate(hits)}
        snippets = dict(matches)
        for r, (image_id, _) in enumerate(matches):
            fused[image_id] = fused.get(image_id, 0.0) + 1 / (RRF_K + r + 1)
        by_id = {h.id: h for h in hits}
        missing = [i for i, _ in matches if i not in by_id]
        if missing:
            scores = np.asarray(self.index.image_embeddings[missing], np.float32) @ vector[0]  # (m,)
            facts = self.index.store.facts(missing)
            for image_id, score, path, fact in zip(missing, scores, self.index.store.image_paths(missing), facts):
                by_id[image_id] = Hit(0, float(score), image_id, path=path, taken=_iso(fact["taken"]))
        for image_id, snippet in snippets.items():
            by_id[image_id] = replace(by_id[image_id], words=snippet, weak=False)
        return [by_id[i] for i in sorted(fused, key=lambda i: (-fused[i], i not in snippets))]  # search() numbers them

    def query_vector(self, query: Query) -> np.ndarray:
        """(1, D): the L2-normalised sum of w_i * e(positive_i) minus the sum of e(negative_j) (rclip's rule)."""
        positives, negatives = self.embed_terms(query.positives), self.embed_terms(query.negatives)  # (P, D), (M, D)
        weights = np.asarray([t.weight for t in query.positives], dtype=np.float32)  # (P,)
        vector = weights @ positives - negatives.sum(axis=0)  # (D,)
        norm = float(np.linalg.norm(vector))
        if norm < 1e-6:
            raise VclrError("the query's terms cancel out (its positives and negatives are the same): change them")
        return (vector / norm).astype(np.float32)[None]

    def embed_terms(self, terms: Sequence[Term]) -> np.ndarray:
        """Each term's unit embedding, (T, D) in the terms' order: texts through the encoder (batched, cached),
        image files and uploads read as the index's images were, image ids from the index."""
        out = np.zeros((len(terms), self.index.d), np.float32)
        texts = [r for r, t in enumerate(terms) if t.kind == "text"]
        images = [r for r, t in enumerate(terms) if t.kind in ("image", "upload")]
        if texts:
            out[texts] = self.embed_texts([terms[r].value for r in texts])
        if images:
            out[images] = self.embed_images([read_query_image(terms[r].value) for r in images])
        for r, term in enumerate(terms):
            if term.kind == "id":
                out[r] = self._indexed_image(int(term.value))
        return out

    def _indexed_image(self, image_id: int) -> np.ndarray:
        if not self.index.store.is_live("images", image_id):
            last = self.index.manifest["num_images"] - 1
            raise VclrError(f"no image with id {image_id} in the index (ids are 0..{last}, deleted ones excluded)")
        return np.asarray(self.index.image_embeddings[image_id], dtype=np.float32)  # (D,)

    def caption_hits(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Image queries (N, D) -> their top-k captions each, searched in one batch."""
        D, I = self.index.search_texts(vectors, k)
        weak_below = self.weak_below("image", "texts")
        return [[Hit(r + 1, float(s), int(i), caption=t, weak=bool(s <= weak_below))
                 for r, (s, i, t) in enumerate(zip(scores, ids, self.index.store.texts(ids)))]
                for scores, ids in zip(D, I)]

    def by_text(self, text: str, k: int = 5) -> list[Hit]:
        """Images ranked for a text query."""
        text = check_text_query(text)
        check_k(k)
        return self.image_hits(self.embed_texts([text]), k, "text")[0]

    def wants_images(self, images: bool | None) -> bool:
        """Does an image query get images (asked for, or no captions to give) rather than captions?"""
        return bool(images) or not self.has_captions

    def by_image_embedding(self, embedding: np.ndarray, k: int, images: bool | None = None) -> list[Hit]:
        """An image embedding (1, d) -> captions when the index has them, else images ("more like this");
        `images=True` asks for images either way. `k` is checked by the caller."""
        if self.wants_images(images):
            return self.image_hits(embedding, k, "image")[0]
        return self.caption_hits(embedding, k)[0]

    def _weak_image_hits(self, vectors: np.ndarray, D: np.ndarray, query: str) -> np.ndarray:
        """(N, k) which image hits are weak matches (vclr.search.calibration): by their standout for text queries,
        by their score for image queries."""
        if query == "text":
            return standout(D, vectors, self._image_sample()) <= self.weak_standout()
        return D <= self.weak_below(query, "images")

    def weak_standout(self) -> float:
        """The standout at or under which a text query's image hit is weak, from the null queries' best hits."""
        if "standout" not in self._weak_below:
            null = self.encoder.embed_texts(list(NULL_PHRASES))  # not through the query cache: not users' queries
            D, _ = self.index.search_images(null, 1)  # (Q, 1) each null query's best live image
            self._weak_below["standout"] = standout_threshold(standout(D, null, self._image_sample()))
        return self._weak_below["standout"]

    def _image_sample(self) -> np.ndarray:
        """Up to STANDOUT_SAMPLE live image vectors (a fixed draw): where a query's upper tail is measured."""
        if "sample" not in self._weak_below:
            live = self.index.live_ids()
            rows = np.sort(np.random.default_rng(0).choice(live, min(STANDOUT_SAMPLE, len(live)), replace=False))
            self._weak_below["sample"] = np.asarray(self.index.image_embeddings[rows], dtype=np.float32)
        return self._weak_below["sample"]

    def weak_below(self, query: str, searched: str) -> float:
        """The score at or under which a hit of a `query` ("text"/"image") among `searched` ("images"/"texts") is a
        weak match: no better than the best an unrelated query reaches by chance (vclr.search.calibration)."""
        if (query, searched) not in self._weak_below:
            live = self.index.manifest[f"num_{searched}"] - self.index.manifest[f"deleted_{searched}"]
            scores = self._image_pair_scores() if (query, searched) == ("image", "images") else \
                self._cross_pair_scores()
            self._weak_below[query, searched] = weak_match_threshold(scores, live)
        return self._weak_below[query, searched]

    def _cross_pair_scores(self) -> np.ndarray:
        """Random unrelated (caption, image) pairs: what an image query's caption hits are weighed against."""
        return unrelated_pair_scores(self.index.text_embeddings, self.index.image_embeddings,
                                     related=self.index.caption_image)

    def _image_pair_scores(self) -> np.ndarray:
        return unrelated_pair_scores(self.index.image_embeddings, self.index.image_embeddings)

    def first_captions(self, hits: Sequence[Hit]) -> list[str | None]:
        """The first caption of each image hit (None for captionless images and for caption hits)."""
        image_ids = [h.id for h in hits if h.path is not None]
        by_id = dict(zip(image_ids, self.index.store.first_captions(image_ids))) if self.has_captions else {}
        return [by_id.get(h.id) if h.path is not None else None for h in hits]

    def by_image_file(self, image_path: str | Path, k: int = 5, images: bool | None = None) -> list[Hit]:
        """A query image file -> captions when the index has them, else images (`images=True`: images)."""
        check_k(k)
        return self.by_image_embedding(self.embed_images([read_query_image(image_path)]), k, images)

    def duplicate_calibration(self, recalibrate: bool = False) -> Calibration:
        """The index's near-duplicate threshold with its figures (vclr.search.duplicates): stored once measured,
        else measured now (decodes and embeds a sample of the collection: the model loads)."""
        found = None if recalibrate else self._stored_duplicates()
        if found is None:
            found = calibrate_threshold(self.index, self.embed_images)
            store_calibration(self.index, found)
            self._duplicates = found
        return found

    def _stored_duplicates(self) -> Calibration | None:
        """The stored calibration, read once it exists (an index save has one at most)."""
        if self._duplicates is None:
            self._duplicates = stored_calibration(self.index)
        return self._duplicates

    def duplicate_threshold(self) -> float:
        """What a query collapses near-duplicates at: the index's calibrated threshold, else DEFAULT_THRESHOLD (a
        query never waits for a calibration)."""
        found = self._stored_duplicates()
        return found.threshold if found is not None else DEFAULT_THRESHOLD

    def duplicates(self, threshold: float | None = None, progress=None) -> tuple[list[DuplicateGroup], float]:
        """Groups of near-duplicate images, and the threshold used (`threshold`, else the calibrated one)."""
        threshold = self.duplicate_calibration().threshold if threshold is None else threshold
        return find_duplicates(self.index, threshold, progress=progress), threshold

    def like(self, image_id: int, k: int = 5) -> list[Hit]:
        """Images most like indexed image `image_id` (itself left out)."""
        check_k(k)
        query = self._indexed_image(image_id)[None]  # (1, d)
        hits = [h for h in self.image_hits(query, k + 1, "image")[0] if h.id != image_id][:k]
        return [replace(h, rank=r + 1) for r, h in enumerate(hits)]


DATE_POOL = 1000  # a query sorted by date orders at most this many of its best hits
RRF_K = 60  # reciprocal-rank fusion's constant (Cormack et al. 2009): how flat the fused ranks are
DISTINCT_POOL = 4  # a query showing one of each near-duplicate set ranks this many times its hits


def _iso(timestamp: float | None) -> str | None:
    return datetime.datetime.fromtimestamp(timestamp).isoformat(timespec="seconds") if timestamp is not None else None


def search_by_text(index_dir: str | Path, text: str, k: int = 5, source: ModelSource | None = None) -> list[Hit]:
    text = check_text_query(text)
    check_k(k)
    return Searcher.open(index_dir, source).by_text(text, k)
