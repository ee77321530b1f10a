"""FAISS retrieval index over both modalities, saved as a directory. numpy + faiss (+ the SQLite metadata store).

    idx = RetrievalIndex.build(image_embeddings, text_embeddings, caption_image, image_paths, texts, manifest)
    idx.save("indexes/demo")
    D, I = RetrievalIndex.load("indexes/demo").search_images(xq, k=5)   # text queries -> images

Each modality gets its own index, exact or approximate (`vclr.index.kinds`, `vclr.index.tuning`: chosen from the
collection size, a memory budget and a recall target measured with queries of the other modality). Items can be
added without rebuilding (trained indexes take new vectors as they are) and deleted by id (marked in the store and
filtered out of every search with a faiss ID selector; ids never shift).

Directory: images.faiss, texts.faiss, image_embeddings.npy, text_embeddings.npy (kept for exact evaluation and
rebuilds), metadata.sqlite (ids -> paths, captions, deletions), manifest.json (format, dimension, counts, model run and
config hash, the `embedder` that made the vectors (backend and precision; absent before backends: PyTorch fp32), index
choice with its measured recall and speed, and the size and SHA-256 of every file). A save writes a temp directory and
renames it into place; a crash at any moment leaves the previous index whole, and a load that finds a file whose
checksum disagrees with the manifest refuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from vclr.errors import IndexDirError
from vclr.index.kinds import INDEX_CHOICES
from vclr.index.metadata import MetadataStore
from vclr.index.tuning import Tuning, choose_index
from vclr.storage import directory_problem, recover_set_aside, remove_stale_temp_dirs, write_directory

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CORE_FILES = {"images.faiss", "texts.faiss", "image_embeddings.npy", "text_embeddings.npy", "metadata.sqlite", MANIFEST}


@dataclass(frozen=True)
class IndexOptions:
    """How `build` picks each modality's index (see vclr.index.kinds). Field names are `vclr index`'s flags."""

    # "auto": exact up to `exact_below` items, else the fastest kind meeting the target; or a row of INDEX_KINDS
    kind: str = "auto"
    recall_target: float = 0.95  # recall@k against exact search, cross-modal queries
    k: int = 10
    memory_budget_gb: float = 0.0  # 0 = no limit
    exact_below: int = 50_000  # collections up to this size stay exact
    tuning_queries: int = 1000
    chunk: int = 200_000  # vectors read at a time to fill an index or find exact neighbours (memory-mapped input)

    def __post_init__(self):
        if self.kind not in INDEX_CHOICES:
            raise IndexDirError(f"`kind` {self.kind!r} is not a kind of index: choose one of "
                                f"{', '.join(INDEX_CHOICES)}")
        if not 0 < self.recall_target <= 1:
            raise IndexDirError(f"`recall_target` must be in (0, 1], got {self.recall_target}")
        if self.memory_budget_gb < 0:
            raise IndexDirError(f"`memory_budget_gb` must be >= 0 (0 = no limit), got {self.memory_budget_gb}")
        if self.k < 1 or self.exact_below < 0 or self.tuning_queries < 1 or self.chunk < 1:
            raise IndexDirError(f"index options out of range: k={self.k} (>= 1), exact_below={self.exact_below} "
                                f"(>= 0), tuning_queries={self.tuning_queries} (>= 1), chunk={self.chunk} (>= 1)")


def _as_queries(xq: np.ndarray, d: int) -> np.ndarray:
    xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
    if xq.shape[1] != d:
        raise IndexDirError(f"query dimension {xq.shape[1]} does not match the index dimension {d}")
    return xq


def _build_modality(xb: np.ndarray, other: np.ndarray, options: IndexOptions, seed: int) -> tuple[faiss.Index, dict]:
    if not len(xb):  # an image-only collection has no captions: an empty exact index, ready for captions added later
        return faiss.IndexFlatIP(xb.shape[1]), Tuning("flat", "Flat", None, None, 1.0, 0.0, options.k,
                                                       options.recall_target, True).to_dict()
    if not len(other):  # no queries of the other modality: tune with the collection's own vectors
        other = xb
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(other), min(options.tuning_queries, len(other)), replace=False)
    budget = options.memory_budget_gb * 1e9 or None
    index, tuning = choose_index(xb, other[np.sort(sample)], options.k, options.recall_target, budget,
                                 options.exact_below, options.kind, seed, options.chunk)
    return index, tuning.to_dict()


@dataclass
class RetrievalIndex:
    image_embeddings: np.ndarray  # (N, d) float32
    text_embeddings: np.ndarray  # (C, d) float32
    store: MetadataStore
    manifest: dict = field(default_factory=dict)
    image_index: faiss.Index | None = None
    text_index: faiss.Index | None = None
    # files that travel with the index (its text query tower, vclr.index.text_tower): bytes to write, or the path of a
    # loaded index's copy, linked (or copied) into each new save
    attachments: dict[str, bytes | Path] = field(default_factory=dict)

    @classmethod
    def build(cls, image_embeddings, text_embeddings, caption_image, image_paths, texts,
              manifest: dict | None = None, options: IndexOptions = IndexOptions(), seed: int = 0,
              image_states: Sequence[str | None] | None = None) -> RetrievalIndex:
        image_embeddings = np.ascontiguousarray(image_embeddings, dtype=np.float32)
        text_embeddings = np.ascontiguousarray(text_embeddings, dtype=np.float32)
        if image_embeddings.shape[1] != text_embeddings.shape[1]:
            raise IndexDirError(f"image and text embeddings differ in dimension: {image_embeddings.shape[1]} vs "
                                f"{text_embeddings.shape[1]}")
        if len(image_paths) != len(image_embeddings) or len(texts) != len(text_embeddings):
            raise IndexDirError("metadata and embeddings differ in length")
        store = MetadataStore()
        store.add_images(image_paths, image_states)
        store.add_texts(texts, caption_image)
        # captions search the image index and images the caption index: each is tuned with the other's queries
        image_index, image_tuning = _build_modality(image_embeddings, text_embeddings, options, seed)
        text_index, text_tuning = _build_modality(text_embeddings, image_embeddings, options, seed + 1)
        manifest = dict(manifest or {})
        manifest.update(format_version=FORMAT_VERSION, dim=int(image_embeddings.shape[1]),
                        index={"images": image_tuning, "texts": text_tuning})
        index = cls(image_embeddings, text_embeddings, store, manifest, image_index, text_index)
        index._update_counts()
        return index

    # --------------------------------------------------------------------------------------------------- reading

    @property
    def d(self) -> int:
        return self.image_embeddings.shape[1]

    @property
    def version(self) -> str:
        """Which save of the index this is: a digest of the checksums of its files ("unsaved" before its first)."""
        files = self.manifest.get("files")
        if not files:
            return "unsaved"
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def image_paths(self) -> list[str]:
        return self.store.image_paths()

    @property
    def texts(self) -> list[str]:
        return self.store.texts()

    @property
    def caption_image(self) -> np.ndarray:
        return self.store.caption_image()

    def _search(self, index: faiss.Index, table: str, xq: np.ndarray, k: int):
        deleted = self.store.deleted_ids(table)
        k = min(k, index.ntotal - len(deleted))
        if k <= 0:
            return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
        if not len(deleted):
            return index.search(_as_queries(xq, self.d), k)
        # skip deleted ids inside faiss: k live results without over-fetching (the selectors must outlive the call)
        batch = faiss.IDSelectorBatch(deleted)
        live = faiss.IDSelectorNot(batch)
        return index.search(_as_queries(xq, self.d), k, params=_search_params(index, live))

    def search_images(self, xq: np.ndarray, k: int, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Queries (nq, d) against the images: D, I of shape (nq, min(k, live images)). `among`: only these live
        image ids (a filter's, vclr.index.metadata.select_images): searched exactly when they are few, else through
        the ANN index with an ID selector and a search parameter widened by how few they are, so that a filtered
        query keeps the index's recall."""
        if among is None:
            return self._search(self.image_index, "images", xq, k)
        return self._search_among(xq, k, np.asarray(among, dtype=np.int64))

    def _search_among(self, xq: np.ndarray, k: int, among: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xq, k = _as_queries(xq, self.d), min(k, len(among))
        if k <= 0:
            return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
        if len(among) <= EXACT_AMONG or self.manifest["index"]["images"].get("param") is None:
            return exact_search(xq, self.image_embeddings, k, among)
        selector = faiss.IDSelectorBatch(among)  # kept alive until the search returns
        params = _search_params(self.image_index, selector, widen=self.image_index.ntotal / len(among))
        return self.image_index.search(xq, k, params=params)

    def live_ids(self, table: str = "images") -> np.ndarray:
        """(n,) sorted ids of the live (not deleted) images or captions."""
        return np.setdiff1d(np.arange(self.store.count(table)), self.store.deleted_ids(table))

    def range_search_images(self, xq: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every live image scoring >= `radius` with each query (nq, d), through the image index: faiss's
        (lims, D, I), the results of query q at lims[q]:lims[q+1]."""
        xq = _as_queries(xq, self.d)
        deleted = self.store.deleted_ids("images")
        params = None
        if len(deleted):
            batch = faiss.IDSelectorBatch(deleted)  # kept alive until the search returns
            live = faiss.IDSelectorNot(batch)
            params = _search_params(self.image_index, live)
        block = _range_block(self.image_index)
        if len(xq) <= block:
            return self.image_index.range_search(xq, radius, params=params)
        parts = [self.image_index.range_search(xq[start:start + block], radius, params=params)
                 for start in range(0, len(xq), block)]
        counts = np.concatenate([np.diff(lims) for lims, _, _ in parts])
        lims = np.concatenate([[0], np.cumsum(counts)]).astype(parts[0][0].dtype)
        return lims, np.concatenate([D for _, D, _ in parts]), np.concatenate([I for _, _, I in parts])

    def search_texts(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Queries (nq, d) against the captions: D, I of shape (nq, min(k, live captions))."""
        return self._search(self.text_index, "texts", xq, k)

    def check_model(self, dim: int, config_hash: str | Sequence[str] | None, remedy: str | None = None) -> None:
        """A clear error when a model of another dimension or config would query this index; `config_hash`: the
        model's hash, or every hash it may have been recorded under (vclr.config.config_hashes); `remedy`: what to
        do about it, when not the usual advice."""
        if dim != self.d:
            raise IndexDirError(f"the model embeds into {dim} dimensions but the index holds {self.d}-dimensional "
                                f"vectors; {remedy or 'use the model the index was built with, or rebuild the index'}")
        accepted = (config_hash,) if isinstance(config_hash, str) else tuple(config_hash or ())
        if accepted and self.manifest.get("model_config_hash") not in accepted:
            config_hash = accepted[0]
            raise IndexDirError(f"the model's config (hash {config_hash}) is not the one this index was built with "
                                f"({self.manifest.get('model_name')}, hash {self.manifest.get('model_config_hash')})"
                                f"; {remedy or 'give the right `run` or rebuild the index'}")

    # ----------------------------------------------------------------------------------------- adding, deleting

    def add(self, image_embeddings: np.ndarray, image_paths: Sequence[str], text_embeddings: np.ndarray,
            texts: Sequence[str], caption_image: Sequence[int],
            image_states: Sequence[str | None] | None = None):
        """Append images and captions (`caption_image` indexes the NEW images) without rebuilding; -> their ids."""
        image_embeddings = _as_queries(image_embeddings, self.d) if len(image_embeddings) else np.zeros((0, self.d),
                                                                                                         np.float32)
        text_embeddings = _as_queries(text_embeddings, self.d) if len(text_embeddings) else np.zeros((0, self.d),
                                                                                                      np.float32)
        if len(image_paths) != len(image_embeddings) or len(texts) != len(text_embeddings) or \
                len(caption_image) != len(texts):
            raise IndexDirError("add: metadata and embeddings differ in length")
        if len(caption_image) and not (0 <= min(caption_image) and max(caption_image) < len(image_paths)):
            raise IndexDirError("add: caption_image must index the images being added")
        image_ids = self.store.add_images(image_paths, image_states)
        first_new = int(image_ids[0]) if len(image_ids) else self.store.count("images")
        text_ids = self.store.add_texts(texts, [first_new + int(i) for i in caption_image])
        self.image_index.add(image_embeddings)
        self.text_index.add(text_embeddings)
        self.image_embeddings = np.concatenate([self.image_embeddings, image_embeddings])
        self.text_embeddings = np.concatenate([self.text_embeddings, text_embeddings])
        self._update_counts()
        return image_ids, text_ids

    def delete(self, image_ids: Sequence[int] = (), text_ids: Sequence[int] = ()) -> None:
        """Remove items from every later search. Ids stay reserved; deleting an image deletes its captions too."""
        for table, ids, total in (("images", image_ids, self.store.count("images")),
                                  ("texts", text_ids, self.store.count("texts"))):
            bad = [i for i in ids if not 0 <= int(i) < total]
            if bad:
                raise IndexDirError(f"delete: no {table[:-1]} with id {bad[0]} (ids are 0..{total - 1})")
        if len(image_ids):
            owned = np.flatnonzero(np.isin(self.store.caption_image(), np.asarray(image_ids, dtype=np.int64)))
            text_ids = np.union1d(np.asarray(text_ids, dtype=np.int64), owned)
        self.store.mark_deleted("images", image_ids)
        self.store.mark_deleted("texts", text_ids)
        self._update_counts()

    def _update_counts(self) -> None:
        self.manifest.update(num_images=self.image_index.ntotal, num_texts=self.text_index.ntotal,
                             deleted_images=len(self.store.deleted_ids("images")),
                             deleted_texts=len(self.store.deleted_ids("texts")))

    # ---------------------------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write to a sibling temp dir, then swap it in: readers see the old index or the new one, never half."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._check_disk_space(path.parent)

        def write_files(tmp: Path) -> None:
            faiss.write_index(self.image_index, str(tmp / "images.faiss"))
            faiss.write_index(self.text_index, str(tmp / "texts.faiss"))
            np.save(tmp / "image_embeddings.npy", self.image_embeddings)
            np.save(tmp / "text_embeddings.npy", self.text_embeddings)
            self.store.save_to(tmp / "metadata.sqlite")
            for name, content in self.attachments.items():
                _write_attachment(tmp / name, content)

        self.manifest = write_directory(path, write_files, MANIFEST, self.manifest,  # the manifest last: marks whole
                                        expected_bytes=self._expected_bytes())
        return path

    def _expected_bytes(self) -> int:
        vectors = self.image_embeddings.nbytes + self.text_embeddings.nbytes
        return 2 * vectors + 64 * 2**20  # the .npy copies, FAISS files of about the same size, the metadata

    def _check_disk_space(self, folder: Path) -> None:
        """Refuse before writing anything when the new index cannot fit next to the old one."""
        needed = self._expected_bytes()
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise IndexDirError(f"not enough disk space in {folder} to write the index: it needs about "
                                f"{needed / 1e9:.2f} GB and {free / 1e9:.2f} GB are free; free some space or pass "
                                "another output folder")

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = False, verify: bool = True) -> RetrievalIndex:
        """Open a saved index. `mmap`: map the vectors and (IVF) lists from disk instead of reading them into RAM.
        `verify`: check every file's SHA-256 against the manifest (sizes are always checked)."""
        path = Path(path)
        recover_set_aside(path)  # a save killed between its two renames (where no atomic exchange exists)
        if not path.is_dir():
            raise IndexDirError(f"index dir {path} does not exist; build one with `vclr index`")
        if not (path / MANIFEST).is_file():
            raise IndexDirError(f"{path} is not a vclr index (no {MANIFEST})")
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IndexDirError(f"{path}: index format {manifest.get('format_version')} is not supported "
                                f"(this vclr reads {FORMAT_VERSION}); rebuild it with `vclr index`")
        problem = directory_problem(path, MANIFEST, checksums=verify, manifest=manifest)
        if problem:
            raise IndexDirError(f"{path}: {problem}; the index is damaged, rebuild it")
        remove_stale_temp_dirs(path.parent, path.name)  # of saves that were killed
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = cls(np.load(path / "image_embeddings.npy", mmap_mode="r" if mmap else None),
                    np.load(path / "text_embeddings.npy", mmap_mode="r" if mmap else None),
                    _open_store_copy(path / "metadata.sqlite"), manifest,
                    _read_index(path / "images.faiss", flags), _read_index(path / "texts.faiss", flags))
        index.attachments = {name: path / name for name in manifest.get("files", {}) if name not in CORE_FILES}
        if index.image_index.ntotal != manifest["num_images"] or index.text_index.ntotal != manifest["num_texts"]:
            raise IndexDirError(f"{path}: index files disagree with the manifest's counts; rebuild it")
        for modality, faiss_index in (("images", index.image_index), ("texts", index.text_index)):
            tuning = manifest["index"][modality]
            if tuning.get("param"):
                faiss.ParameterSpace().set_index_parameter(faiss_index, tuning["param"], int(tuning["value"]))
        return index


def _write_attachment(target: Path, content: bytes | Path) -> None:
    if isinstance(content, bytes):
        target.write_bytes(content)
        return
    try:
        os.link(content, target)  # the previous save's file, unchanged: no copy
    except OSError:
        shutil.copy2(content, target)


EXACT_AMONG = 20_000  # a filter that keeps at most this many images is searched exactly: ~10 ms at d=512
MAX_WIDEN = 8  # a filtered ANN search probes at most this many times the lists (or graph nodes) of an unfiltered one


def _search_params(index: faiss.Index, selector: faiss.IDSelector, widen: float = 1.0) -> faiss.SearchParameters:
    """Per-call parameters with an ID selector; they replace the index's own nprobe/efSearch, so carry those over.
    `widen`: how many items the index holds per selected one. A selector drops the unselected candidates of the
    lists (or graph nodes) the search visits, so a search among 1 in 4 items visits up to 4x as many (at most
    MAX_WIDEN x) to find as many good ones as an unfiltered search."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    factor = min(max(widen, 1.0), MAX_WIDEN)
    if hasattr(inner, "nprobe"):
        return faiss.SearchParametersIVF(sel=selector, nprobe=min(inner.nlist, math.ceil(inner.nprobe * factor)))
    if hasattr(inner, "hnsw"):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=math.ceil(inner.hnsw.efSearch * factor))
    return faiss.SearchParameters(sel=selector)


def _range_block(index: faiss.Index) -> int:
    """The most queries one range search may take. faiss's HNSW range search runs its queries in blocks of its
    interrupt-check period, 1e8 / (levels * d * efSearch) queries (about 600 at 1M x 512), and aborts the process
    when a call spans two blocks (its result is allocated once per block): stay within one."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    if not hasattr(inner, "hnsw"):
        return 1 << 30
    flops = max(1, inner.hnsw.max_level) * inner.d * inner.hnsw.efSearch
    return max(1, 10**8 // (flops + 1) // 2)  # half the period: the level count can grow as items are added


def exact_search(xq: np.ndarray, xb: np.ndarray, k: int, among: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k of queries (nq, d) over xb (N, d), or over the rows `among` of it: D, I
    (nq, k) with I in xb's numbering, ties broken by the lower id as faiss' flat index does."""
    rows = np.arange(len(xb)) if among is None else among
    scores = xq @ np.asarray(xb[rows], dtype=np.float32).T  # (nq, n)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # rows are sorted ids: stable keeps the lower id first
    return np.take_along_axis(scores, top, 1), rows[top]


def _read_index(path: Path, flags: int) -> faiss.Index:
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError:
        if flags:  # index types without mmap support (HNSW): read normally
            return faiss.read_index(str(path))
        raise


def _open_store_copy(path: Path) -> MetadataStore:
    """The store in memory: adds and deletes before the next save must not touch the saved index."""
    on_disk = MetadataStore(path, read_only=True)
    store = MetadataStore()
    on_disk.db.backup(store.db)
    on_disk.close()
    store.upgrade()  # the backup brought the saved schema along
    return store
