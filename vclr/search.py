"""Build, grow and query indexes: text -> images, image -> images ("more like this"), image -> captions.

    build_index(model_source(run="runs/demo"), "data/shapes/test", "indexes/demo")
    build_index(model_source(model="ViT-B-32", pretrained="vit.pt"), "photos/", "indexes/photos")
    build_index(..., "photos/", "indexes/photos")      # again: embeds only new or changed files, drops deleted ones
    hits = search_by_text("indexes/photos", "a dog on a beach", k=5)   # the index knows its model
    searcher = Searcher.open("indexes/photos")         # index + model loaded once (the web service)

An index records its model source (`model_source` in the manifest), so searching, serving and growing it need no
model flags. Re-indexing a folder compares each file's size and mtime (and its caption sidecar's) with the index's
record, embeds what is new or changed in chunks that are saved as they complete (a killed run loses nothing saved, and
the next run continues), and marks removed files deleted: the index then answers as a fresh build would.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from vclr.calibration import PHRASES, unrelated_pair_scores, weak_match_threshold
from vclr.config import Config, VclrError, config_hash
from vclr.index import IndexOptions, RetrievalIndex
from vclr.model_source import ModelSource, as_source, model_identity, source_from_manifest, with_run_from_index
from vclr.query_limits import check_k, check_text_query
from vclr.rundir import weights_file

# building an index needs the data and embedding code, which import torchvision and open_clip (seconds); a query by
# text needs neither (vclr.query_tower: torch alone), and a query through an ONNX export (vclr.onnx_query) not even
# torch, so they are imported where an index is built or a model is loaded
if TYPE_CHECKING:
    from vclr.data.dataset import CaptionTable
    from vclr.model import DualEncoder
    from vclr.query_tower import TextQueryEncoder

logger = logging.getLogger(__name__)

SAVE_EVERY = 20_000  # images embedded between saves of a growing index: what a kill can cost at most
IN_MEMORY_MAX_BYTES = 4 * 2**30  # embeddings beyond this stream to memory-mapped files beside the index


@dataclass
class Hit:
    rank: int
    score: float
    id: int
    path: str | None = None  # an image hit
    caption: str | None = None  # a caption hit
    weak: bool = False  # the score is no better than unrelated pairs reach by chance (vclr.calibration)

    @property
    def value(self) -> str:
        return self.path if self.path is not None else self.caption

    def to_json(self) -> dict:
        kind = {"path": self.path} if self.path is not None else {"caption": self.caption}
        return {"rank": self.rank, "score": self.score, "id": self.id, **kind, "weak": self.weak}


@dataclass
class IndexUpdate:
    """What `build_index` did."""

    index: RetrievalIndex | None  # None in the other processes of a multi-process launch
    added: int = 0  # new files embedded
    changed: int = 0  # files embedded again (their size, mtime or captions changed)
    removed: int = 0  # files gone from the collection, deleted from the index
    unchanged: int = 0
    unreadable: list[str] = field(default_factory=list)
    rebuilt: bool = True  # a fresh build (no index there, another model, or --rebuild)


def _collection(cfg: Config, data: str | None) -> tuple[str, CaptionTable]:
    from vclr.data.folder import load_collection

    source = data or cfg.data.test or cfg.data.train
    if not source:
        raise VclrError("no dataset to index: pass --data DIR (a folder of images, or a prepared dataset)")
    return str(source), load_collection(source, cfg.data.image_column, cfg.data.caption_columns)


def file_state(path: str) -> str:
    """What says a file changed: its size and mtime, and those of its caption sidecar."""
    image, sidecar = os.stat(path), Path(path).with_suffix(".txt")
    sidecar_state = f"{sidecar.stat().st_size}:{sidecar.stat().st_mtime_ns}" if sidecar.is_file() else "-"
    return f"{image.st_size}:{image.st_mtime_ns}:{sidecar_state}"


def _weights_identity(identity: dict) -> dict:
    """The model identity plus the state of its weights file (a retrained run keeps its config but not its weights)."""
    described = identity["model_source"]
    weights = described.get("pretrained") if described["kind"] == "open_clip" else None
    if described["kind"] == "run":
        weights = str(weights_file(described["run_dir"]))
    if weights and Path(weights).is_file():
        return dict(identity, weights_state=file_state(weights))
    return identity


def build_index(source: ModelSource | str | os.PathLike, data: str | None, out_dir: str | os.PathLike,
                options: IndexOptions = IndexOptions(), rebuild: bool = False, workers: int = 0,
                save_every: int = SAVE_EVERY, batch_size: int = 0,
                in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES) -> IndexUpdate:
    """Index a collection (a folder of images or a prepared dataset) with a model into `out_dir`; when `out_dir`
    already holds an index of the same model and collection, bring it up to date instead of rebuilding it."""
    from vclr.embed import embed_table

    source = as_source(source)
    embed, device, is_main = _embedding_plan(Path(out_dir), in_memory_max_bytes)
    model, cfg = source.load(device)
    cfg = _with_loader(cfg, workers, batch_size)
    dataset, table = _collection(cfg, data)
    identity = _weights_identity(model_identity(source, cfg)) | {"dataset": str(Path(dataset).resolve())}
    identity["model_source"] = with_run_from_index(identity["model_source"], out_dir)
    existing = None if rebuild else _existing_index(Path(out_dir), identity)
    if existing is None:
        spill = embed is embed_table and _vector_bytes(table, model.embed_dim) > in_memory_max_bytes
        update = _fresh_build(model, cfg, table, identity, options, Path(out_dir), embed, spill)
    else:
        update = _update(existing, model, cfg, table, Path(out_dir), save_every, embed)
    if not is_main:
        return IndexUpdate(None)  # process 0 built and saved the index
    logger.info("indexed %s into %s: %d added, %d changed, %d removed, %d unchanged, %d unreadable", dataset, out_dir,
                update.added, update.changed, update.removed, update.unchanged, len(update.unreadable))
    return update


def _embedding_plan(out_dir: Path, in_memory_max_bytes: int):
    """(embed function, device, is this process the one that writes) — one process, or a multi-process launch where
    every process embeds a share on its own device (vclr.embed_shards)."""
    from vclr.embed import embed_table
    from vclr.embed_shards import collection_embedder, launched_processes, process_state

    if launched_processes() == 1:
        return embed_table, None, True
    state = process_state()
    return collection_embedder(out_dir, in_memory_max_bytes), state.device, state.is_main_process


def _with_loader(cfg: Config, workers: int, batch_size: int) -> Config:
    """The embedding loader's workers and batch (0: the config's)."""
    data = replace(cfg.data, num_workers=workers or cfg.data.num_workers)
    return replace(cfg, data=data, eval=replace(cfg.eval, batch_size=batch_size or cfg.eval.batch_size))


def _existing_index(out_dir: Path, identity: dict) -> RetrievalIndex | None:
    if not (out_dir / "manifest.json").is_file():
        return None
    index = RetrievalIndex.load(out_dir)
    recorded = {key: index.manifest.get(key) for key in identity}
    if recorded != identity:
        logger.info("%s was built with another model or collection: building it afresh", out_dir)
        return None
    return index


def _vector_bytes(table: CaptionTable, dim: int) -> int:
    return 4 * dim * (len(table) + sum(len(c) for c in table.captions))


def _fresh_build(model: DualEncoder, cfg: Config, table: CaptionTable, identity: dict, options: IndexOptions,
                 out_dir: Path, embed=None, spill: bool = False) -> IndexUpdate:
    """Embed and index everything. `spill`: the vectors stream to memory-mapped files in a scratch folder beside the
    index, and the index is trained on a sample and filled `options.chunk` vectors at a time."""
    from vclr.embed import embed_table
    from vclr.query_tower import text_query_files

    embed = embed or embed_table
    scratch = out_dir.parent / f".{out_dir.name}.embeddings"
    if spill:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        logger.info("embeddings larger than RAM allows: streaming them to %s", scratch)
    try:
        emb = embed_table(model, cfg, table, spill_dir=scratch) if spill else embed(model, cfg, table)
        if emb is None:  # another process of a multi-process launch: its share is embedded
            return IndexUpdate(None)
        manifest = dict(identity, unreadable_files={p: file_state(p) for p in emb.unreadable})
        index = RetrievalIndex.build(emb.image_embeddings, emb.text_embeddings, emb.caption_image, emb.image_paths,
                                     emb.texts, manifest, options, image_states=[file_state(p) for p in emb.image_paths])
        index.attachments.update(text_query_files(model, cfg))
        index.save(out_dir)
    finally:
        if spill:
            shutil.rmtree(scratch, ignore_errors=True)  # mapped arrays stay readable until released
    return IndexUpdate(index, added=len(emb.image_paths), unreadable=emb.unreadable)


def _update(index: RetrievalIndex, model: DualEncoder, cfg: Config, table: CaptionTable, out_dir: Path,
            save_every: int, embed=None) -> IndexUpdate:
    """Delete what is gone or changed, then embed what is new or changed, saving after every `save_every` images."""
    from vclr.data.dataset import CaptionTable
    from vclr.embed import embed_table

    embed = embed or embed_table
    live = index.store.live_image_states()  # path -> (id, state)
    current = {path: file_state(path) for path in table.image_paths}
    # files that could not be decoded last time are tried again only when they changed
    unreadable = {path: state for path, state in index.manifest.get("unreadable_files", {}).items()
                  if current.get(path) == state}
    gone = [path for path in live if path not in current]
    changed = {path for path, (_, state) in live.items() if path in current and current[path] != state}
    todo = [row for row, path in enumerate(table.image_paths)
            if (path not in live or path in changed) and path not in unreadable]
    update = IndexUpdate(index, rebuilt=False, removed=len(gone), unreadable=sorted(unreadable),
                         unchanged=len(table) - len(todo) - len(unreadable))
    if not gone and not todo:
        return update
    if gone or changed:
        index.delete(image_ids=[live[path][0] for path in [*gone, *changed]])
    for start in range(0, max(len(todo), 1), save_every):
        rows = todo[start:start + save_every]
        if rows:
            chunk = CaptionTable(table.source, [table.image_paths[r] for r in rows], [table.captions[r] for r in rows])
            emb = embed(model, cfg, chunk)
            if emb is None:  # another process of a multi-process launch: its share of the chunk is embedded
                continue
            index.add(emb.image_embeddings, emb.image_paths, emb.text_embeddings, emb.texts, emb.caption_image,
                      image_states=[current[p] for p in emb.image_paths])
            update.changed += sum(1 for p in emb.image_paths if p in changed)
            update.added += sum(1 for p in emb.image_paths if p not in changed)
            unreadable.update({path: current[path] for path in emb.unreadable})
        index.manifest["unreadable_files"] = unreadable
        if embed is embed_table or _is_main():
            index.save(out_dir)  # each chunk is kept: a killed run continues from here
    update.unreadable = sorted(unreadable)
    return update


def _is_main() -> bool:
    from vclr.embed_shards import process_state

    return process_state().is_main_process


def add_to_index(index_dir: str | Path, data: str, source: ModelSource | str | os.PathLike | None = None
                 ) -> tuple[int, int]:
    """Embed another dataset with the index's model and append it, without rebuilding. -> (images, captions)."""
    from vclr.embed import embed_table

    index = RetrievalIndex.load(index_dir)
    source = as_source(source) if source else _recorded_source(index, index_dir)
    model, cfg = source.load()
    index.check_model(model.embed_dim, config_hash(cfg.model))  # before spending time on embedding
    _, table = _collection(cfg, data)
    emb = embed_table(model, cfg, table)
    image_ids, text_ids = index.add(emb.image_embeddings, emb.image_paths, emb.text_embeddings, emb.texts,
                                    emb.caption_image, image_states=[file_state(p) for p in emb.image_paths])
    index.save(index_dir)
    return len(image_ids), len(text_ids)


def delete_from_index(index_dir: str | Path, image_ids: Sequence[int] = (), text_ids: Sequence[int] = ()) -> dict:
    index = RetrievalIndex.load(index_dir)
    index.delete(image_ids, text_ids)
    index.save(index_dir)
    return {k: index.manifest[k] for k in ("num_images", "num_texts", "deleted_images", "deleted_texts")}


def _recorded_source(index: RetrievalIndex, index_dir: str | Path) -> ModelSource:
    source = source_from_manifest(index.manifest, index_dir)
    if source is None:
        raise VclrError("the index records no model: pass --run DIR or --model NAME [--pretrained TAG|FILE]")
    return source


def _model_identity(manifest: dict) -> tuple:
    """What says two saves of an index were embedded by the same model (and weights)."""
    return tuple(str(manifest.get(key)) for key in ("model_source", "model_config_hash", "weights_state", "dim"))


class QueryEncoder(Protocol):
    """What embeds queries without the model's code: an ONNX export (vclr.onnx_query.OnnxQueryEncoder)."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...  # (N, D) unit vectors

    def embed_images(self, images: Sequence) -> np.ndarray: ...  # decoded RGB PIL images -> (N, D) unit vectors

    def check_index(self, index: RetrievalIndex) -> None: ...  # a clear error when it is not the index's model


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
    """An index and the model that embeds its queries, loaded once. Text queries go through the index's own text
    tower when it has one (vclr.query_tower) and no other model was asked for: the model itself is then loaded only
    when a query needs it (an image). With an `encoder` (an ONNX export), every query goes through it instead."""

    index: RetrievalIndex
    model: DualEncoder | None = None
    cfg: Config | None = None
    # the model loaded on first need: this source, else the one the index at `index_dir` records (resolved only
    # then: a text query by the index's own tower never needs it)
    source: ModelSource | None = None
    index_dir: Path | None = None
    text_encoder: TextQueryEncoder | None = None
    encoder: QueryEncoder | None = None
    text_cache: QueryCache | None = None  # text query -> embedding (the service keeps one)
    _weak_below: dict = field(default_factory=dict, repr=False)  # (query, searched) -> threshold, computed once

    @classmethod
    def open(cls, index_dir: str | Path, source: ModelSource | str | os.PathLike | None = None,
             mmap: bool = False, load_model: bool = True, encoder: QueryEncoder | None = None) -> "Searcher":
        """`load_model=False`: only when a query needs it (a cold `vclr search --text` never does). `encoder`: every
        query goes through it (the model is never loaded, and torch never imported)."""
        index = RetrievalIndex.load(index_dir, mmap=mmap)
        if encoder is not None:
            encoder.check_index(index)
            return cls(index, index_dir=Path(index_dir), encoder=encoder)
        from vclr.query_tower import TextQueryEncoder

        text_encoder = None if source else TextQueryEncoder.load(index_dir)
        searcher = cls(index, source=as_source(source) if source else None, index_dir=Path(index_dir),
                       text_encoder=text_encoder)
        if load_model or text_encoder is None:
            searcher.require_model()
        return searcher

    def reopen(self) -> "Searcher":
        """The newest save of this searcher's index, keeping what still fits it: the ONNX encoder; the model and the
        query cache when the save was made with the same model; the traced text tower when its file is unchanged
        (it is loaded only otherwise). A model this searcher had loaded is loaded for the new save before this
        returns: image queries must not pay for it."""
        index = RetrievalIndex.load(self.index_dir, mmap=isinstance(self.index.image_embeddings, np.memmap))
        if self.encoder is not None:
            self.encoder.check_index(index)
            return Searcher(index, index_dir=self.index_dir, encoder=self.encoder, text_cache=self.text_cache)
        same_model = _model_identity(self.index.manifest) == _model_identity(index.manifest)
        cache = self.text_cache if same_model or self.text_cache is None else QueryCache(self.text_cache.capacity)
        fresh = Searcher(index, self.model if same_model else None, self.cfg if same_model else None, self.source,
                         self.index_dir, text_cache=cache)
        if self.source is None:  # text queries go through the index's own tower
            from vclr.query_tower import TOWER_FILE, TextQueryEncoder

            same_tower = same_model and self.index.manifest.get("files", {}).get(TOWER_FILE) == \
                index.manifest.get("files", {}).get(TOWER_FILE)
            fresh.text_encoder = self.text_encoder if same_tower and self.text_encoder is not None else \
                TextQueryEncoder.load(self.index_dir)
        if self.model is not None:
            fresh.require_model()
        return fresh

    def require_model(self) -> DualEncoder:
        if self.model is None:
            source = self.source or _recorded_source(self.index, self.index_dir)
            self.model, self.cfg = source.load()
            self.index.check_model(self.model.embed_dim, config_hash(self.cfg.model))
        return self.model

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit vectors: from the cache, else by the ONNX encoder, the index's own text tower or the model."""
        cached = [self.text_cache.get(t) for t in texts] if self.text_cache else [None] * len(texts)
        todo = list(dict.fromkeys(t for t, vector in zip(texts, cached) if vector is None))  # a text asked twice: once
        fresh = dict(zip(todo, self._embed_texts(todo))) if todo else {}
        vectors = [vector if vector is not None else fresh[text] for text, vector in zip(texts, cached)]
        if self.text_cache:
            for text, vector in zip(texts, vectors):
                self.text_cache.put(text, vector)
        return np.stack(vectors) if vectors else np.zeros((0, self.index.d), np.float32)

    def _embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.encoder is not None:
            return self.encoder.embed_texts(texts)
        if self.text_encoder is not None:
            return self.text_encoder(texts)
        from vclr.embed import embed_texts

        return embed_texts(self.require_model(), self.cfg, texts)

    def embed_images(self, images: Sequence) -> np.ndarray:
        """Decoded RGB PIL images -> (N, D) unit vectors."""
        if self.encoder is not None:
            return self.encoder.embed_images(images)
        from vclr.embed import embed_pil_images

        return embed_pil_images(self.require_model(), images)

    @property
    def has_captions(self) -> bool:
        return self.index.manifest["num_texts"] - self.index.manifest["deleted_texts"] > 0

    def image_hits(self, vectors: np.ndarray, k: int, query: str) -> list[list[Hit]]:
        """Queries (N, D) of kind `query` ("text"/"image") -> their top-k images each, searched in one batch."""
        D, I = self.index.search_images(vectors, k)
        weak_below = self.weak_below(query, "images")
        return [[Hit(r + 1, float(s), int(i), path=p, weak=bool(s <= weak_below))
                 for r, (s, i, p) in enumerate(zip(scores, ids, self.index.store.image_paths(ids)))]
                for scores, ids in zip(D, I)]

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

    def weak_below(self, query: str, searched: str) -> float:
        """The score at or under which a hit of a `query` ("text"/"image") among `searched` ("images"/"texts") is a
        weak match: no better than the best an unrelated query reaches by chance (vclr.calibration)."""
        if (query, searched) not in self._weak_below:
            live = self.index.manifest[f"num_{searched}"] - self.index.manifest[f"deleted_{searched}"]
            scores = self._image_pair_scores() if (query, searched) == ("image", "images") else \
                self._cross_pair_scores()
            self._weak_below[query, searched] = weak_match_threshold(scores, live)
        return self._weak_below[query, searched]

    def _cross_pair_scores(self) -> np.ndarray:
        """Random unrelated (caption, image) pairs; without captions, everyday phrases against the images."""
        images = self.index.image_embeddings
        if self.has_captions:
            return unrelated_pair_scores(self.index.text_embeddings, images, related=self.index.caption_image)
        phrases = self.embed_texts(PHRASES)
        return unrelated_pair_scores(phrases, images, related=np.full(len(phrases), -1))

    def _image_pair_scores(self) -> np.ndarray:
        return unrelated_pair_scores(self.index.image_embeddings, self.index.image_embeddings)

    def first_captions(self, hits: Sequence[Hit]) -> list[str | None]:
        """The first caption of each image hit (None for captionless images and for caption hits)."""
        image_ids = [h.id for h in hits if h.path is not None]
        by_id = dict(zip(image_ids, self.index.store.first_captions(image_ids))) if self.has_captions else {}
        return [by_id.get(h.id) if h.path is not None else None for h in hits]

    def by_image_file(self, image_path: str | Path, k: int = 5, images: bool | None = None) -> list[Hit]:
        check_k(k)
        from vclr.embed import embed_image_files

        return self.by_image_embedding(embed_image_files(self.require_model(), [str(image_path)]), k, images)

    def like(self, image_id: int, k: int = 5) -> list[Hit]:
        """Images most like indexed image `image_id` (itself left out)."""
        check_k(k)
        if not self.index.store.is_live("images", image_id):
            last = self.index.manifest["num_images"] - 1
            raise VclrError(f"no image with id {image_id} in the index (ids are 0..{last}, deleted ones excluded)")
        query = np.asarray(self.index.image_embeddings[image_id:image_id + 1], dtype=np.float32)  # (1, d)
        hits = [h for h in self.image_hits(query, k + 1, "image")[0] if h.id != image_id][:k]
        return [replace(h, rank=r + 1) for r, h in enumerate(hits)]


def search_by_text(index_dir: str | Path, text: str, k: int = 5, source: ModelSource | None = None) -> list[Hit]:
    text = check_text_query(text)
    check_k(k)
    return Searcher.open(index_dir, source).by_text(text, k)
