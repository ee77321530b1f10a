"""Build and update an index directory: embed a collection with a model and write it (vclr.index.format).

    build_index(model_source(run="runs/demo"), "data/shapes/test", "indexes/demo")
    build_index(model_source(model="ViT-B-32", pretrained="vit.pt"), "photos/", "indexes/photos")
    build_index(..., "photos/", "indexes/photos")      # again: embeds only new or changed files, drops deleted ones
    add_to_index("indexes/photos", "more-photos/")     # append another collection with the index's model
    delete_from_index("indexes/photos", image_ids=[3, 7])

An index records its model source (`model_source` in the manifest), so growing, searching and serving it need no
model arguments. Re-indexing a folder compares each file's size and mtime (and its caption sidecar's) with the
index's record, embeds what is new or changed in chunks that are saved as they complete (a killed run loses nothing
saved, and the next run continues), and marks removed files deleted: the index then answers as a fresh build would.

Files are also known by their content (the SHA-256 of their bytes, read only for files whose size or mtime changed
and stored in the metadata): a file that moved or was renamed keeps its id, vector and captions (`moved`); a copy of
an indexed file gets its own id holding the original's vector (`copies`, not embedded again); a file whose mtime
changed but not its bytes is `unchanged`. Indexes from before hashes get them on their next re-index.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vclr.config import Config, ModelConfig, config_hashes
from vclr.errors import VclrError
from vclr.index.format import IndexOptions, RetrievalIndex
from vclr.model.source import ModelSource, as_source, model_identity, source_from_manifest, with_run_from_index
from vclr.rundir import weights_file
from vclr.storage import sha256_file

# the data and embedding code import torchvision and open_clip (seconds): imported where an index is built, so that
# the searcher (which imports this module for `recorded_source`) stays light
if TYPE_CHECKING:
    from vclr.data.dataset import CaptionTable
    from vclr.embed.embedding import Towers
    from vclr.model.dual_encoder import DualEncoder

logger = logging.getLogger(__name__)


TORCH_EMBEDDER = {"backend": "torch", "precision": "fp32"}  # bf16 autocast on CUDA: fp32 vectors all the same
SAVE_EVERY = 20_000  # images embedded between saves of a growing index: what a kill can cost at most
IN_MEMORY_MAX_BYTES = 4 * 2**30  # embeddings beyond this stream to memory-mapped files beside the index


@dataclass
class IndexUpdate:
    """What `build_index` did."""

    index: RetrievalIndex | None  # None in the other processes of a multi-process launch
    added: int = 0  # new files (embedded, or copies of indexed ones)
    changed: int = 0  # files embedded again (their content or captions changed)
    removed: int = 0  # files gone from the collection, deleted from the index
    unchanged: int = 0
    moved: int = 0  # files found at another path by their content: id, vector and captions kept
    copies: int = 0  # of the added: copies of an indexed file, given its vector without embedding
    embedded: int = 0  # images that went through the model
    unreadable: list[str] = field(default_factory=list)
    rebuilt: bool = True  # a fresh build (no index there, another model, or --rebuild)
    facts_recorded: int = 0  # images whose facts (folder, type, date...) were recorded, new ones and older ones
    backend_choice: object | None = None  # what a chooser picked to embed with, and why (vclr.export.backends)
    words_read: int = 0  # images read by OCR in this run


def _collection(cfg: Config, data: str | None) -> tuple[str, CaptionTable]:
    from vclr.data.folder import load_collection

    source = data or cfg.data.test or cfg.data.train
    if not source:
        raise VclrError("no dataset to index: give `data` (a folder of images, or a prepared dataset)")
    return str(source), load_collection(source, cfg.data.image_column, cfg.data.caption_columns)


def file_state(path: str) -> str:
    """What says a file changed: its size and mtime, and those of its caption sidecar."""
    image, sidecar = os.stat(path), Path(path).with_suffix(".txt")
    sidecar_state = f"{sidecar.stat().st_size}:{sidecar.stat().st_mtime_ns}" if sidecar.is_file() else "-"
    return f"{image.st_size}:{image.st_mtime_ns}:{sidecar_state}"


def content_hashes(paths: Iterable[str], threads: int = 8) -> list[str | None]:
    """Each file's SHA-256 (None for a file that cannot be read), several files at a time (hashlib releases the
    GIL, and reads overlap)."""
    def one(path: str) -> str | None:
        try:
            return sha256_file(path)
        except OSError:
            return None

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, paths))


def weights_identity(identity: dict) -> dict:
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
                in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES, *,
                towers: Towers | Callable[[list[str], tuple], object] | None = None, ocr: bool = False
                ) -> IndexUpdate:
    """Index a collection (a folder of images or a prepared dataset) with a model into `out_dir`; when `out_dir`
    already holds an index of the same model and collection, bring it up to date instead of rebuilding it.
    `towers`: embed through this backend of the same model (an ONNX export, fp32 or int8), or a chooser given the
    collection's paths and the loaded (model, config) that returns a choice with `.towers`
    (vclr.export.backends.choose_towers); the index records
    which embedded it (`embedder`), and an index built by another is built afresh. `ocr`: also read the text in
    each image (vclr.data.ocr) into the index's full-text table, so that searches find images by their words; an
    index once read stays read (new images are read on every re-index)."""
    from vclr.embed.embedding import embed_table

    source = as_source(source)
    embed, device, is_main = _embedding_plan(Path(out_dir), in_memory_max_bytes)
    single = embed is embed_table
    model, cfg = source.load(device)
    cfg = _with_loader(cfg, workers, batch_size)
    dataset, table = _collection(cfg, data)
    choice = None
    if callable(towers):  # a chooser (vclr.export.backends.choose_towers): it looks at the collection first
        choice = towers(list(table.image_paths), (model, cfg))
        towers = choice.towers
    if towers is not None:
        if not single:
            raise VclrError("an ONNX backend embeds in one process: run it without a multi-process launcher")
        embed = partial(embed_table, towers=towers)
    identity = weights_identity(model_identity(source, cfg)) | {"dataset": str(Path(dataset).resolve()),
                                                                  "embedder": embedder_of(towers)}
    identity["model_source"] = with_run_from_index(identity["model_source"], out_dir)
    existing = None if rebuild else _existing_index(Path(out_dir), identity, cfg.model)
    if existing is None:
        spill = single and _vector_bytes(table, model.embed_dim) > in_memory_max_bytes
        update = _fresh_build(model, cfg, table, identity, options, Path(out_dir), embed, spill)
    else:
        update = _update(existing, model, cfg, table, Path(out_dir), save_every, embed)
    update.backend_choice = choice
    if not is_main:
        return IndexUpdate(None)  # process 0 built and saved the index
    if ocr or update.index.manifest.get("ocr"):  # after the vectors are saved: OCR is slow, a kill keeps them
        update.words_read = read_words(update.index, Path(out_dir))
    logger.info("indexed %s into %s: %d added, %d changed, %d removed, %d unchanged, %d unreadable", dataset, out_dir,
                update.added, update.changed, update.removed, update.unchanged, len(update.unreadable))
    return update


def embedder_of(towers: Towers | None) -> dict:
    """What embeds an index's vectors, as its manifest records it."""
    if towers is None:
        return dict(TORCH_EMBEDDER)
    return {"backend": "onnx", "precision": towers.precision}


def _embedding_plan(out_dir: Path, in_memory_max_bytes: int):
    """(embed function, device, is this process the one that writes) — one process, or a multi-process launch where
    every process embeds a share on its own device (vclr.embed.processes)."""
    from vclr.embed.embedding import embed_table
    from vclr.embed.processes import collection_embedder, launched_processes, process_state

    if launched_processes() == 1:
        return embed_table, None, True
    state = process_state()
    return collection_embedder(out_dir, in_memory_max_bytes), state.device, state.is_main_process


def _with_loader(cfg: Config, workers: int, batch_size: int) -> Config:
    """The embedding loader's workers and batch (0: the config's)."""
    data = replace(cfg.data, num_workers=workers or cfg.data.num_workers)
    return replace(cfg, data=data, eval=replace(cfg.eval, batch_size=batch_size or cfg.eval.batch_size))


def _existing_index(out_dir: Path, identity: dict, model_cfg: ModelConfig) -> RetrievalIndex | None:
    if not (out_dir / "manifest.json").is_file():
        return None
    index = RetrievalIndex.load(out_dir)
    recorded = {key: index.manifest.get(key) for key in identity}
    recorded["embedder"] = recorded["embedder"] or dict(TORCH_EMBEDDER)  # indexes from before backends existed
    if recorded.get("model_config_hash") in config_hashes(model_cfg):  # recorded by an earlier vclr: the same model
        recorded["model_config_hash"] = identity["model_config_hash"]
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
    from vclr.embed.embedding import embed_table
    from vclr.index.text_tower import text_query_files

    embed = embed or embed_table
    scratch = out_dir.parent / f".{out_dir.name}.embeddings"
    if spill:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        logger.info("embeddings larger than RAM allows: streaming them to %s", scratch)
    try:
        emb = embed(model, cfg, table, spill_dir=scratch) if spill else embed(model, cfg, table)
        if emb is None:  # another process of a multi-process launch: its share is embedded
            return IndexUpdate(None)
        manifest = dict(identity, unreadable_files={p: file_state(p) for p in emb.unreadable})
        index = RetrievalIndex.build(emb.image_embeddings, emb.text_embeddings, emb.caption_image, emb.image_paths,
                                     emb.texts, manifest, options,
                                     image_states=[file_state(p) for p in emb.image_paths])
        index.attachments.update(text_query_files(model, cfg))
        index.store.set_hashes(range(len(emb.image_paths)), content_hashes(emb.image_paths))
        record_facts(index)
        index.save(out_dir)
    finally:
        if spill:
            shutil.rmtree(scratch, ignore_errors=True)  # mapped arrays stay readable until released
    return IndexUpdate(index, added=len(emb.image_paths), embedded=len(emb.image_paths), unreadable=emb.unreadable)


@dataclass
class _Reuse:
    """What a re-index takes from the index instead of embedding, found by content hash."""

    moved: dict[str, int] = field(default_factory=dict)  # new path -> id of a gone file with the same bytes
    copies: dict[str, int] = field(default_factory=dict)  # new path -> id of a present file with the same bytes
    same_bytes: dict[str, int] = field(default_factory=dict)  # changed path (mtime only) -> its id
    hashes: dict[str, str | None] = field(default_factory=dict)  # hashed path -> its hash


def _update(index: RetrievalIndex, model: DualEncoder, cfg: Config, table: CaptionTable, out_dir: Path,
            save_every: int, embed=None) -> IndexUpdate:
    """Reuse what moved, was copied or only touched; delete what is gone or changed; then embed what is new or
    changed, saving after every `save_every` images."""
    from vclr.data.dataset import CaptionTable
    from vclr.embed.embedding import embed_table

    embed = embed or embed_table
    saves = embed is embed_table or _is_main()
    live = index.store.live_image_states()  # path -> (id, state)
    current = {path: file_state(path) for path in table.image_paths}
    # files that could not be decoded last time are tried again only when they changed
    unreadable = {path: state for path, state in index.manifest.get("unreadable_files", {}).items()
                  if current.get(path) == state}
    hashed_now = _backfill_hashes(index, current)
    gone = [path for path in live if path not in current]
    changed = {path for path, (_, state) in live.items() if path in current and current[path] != state}
    reuse = _reuse_by_content(index, table, live, gone=gone, changed=changed, unreadable=unreadable)
    _apply_reuse(index, reuse, current)
    gone = [path for path in gone if live[path][0] not in reuse.moved.values()]
    changed -= set(reuse.same_bytes)
    todo = [row for row, path in enumerate(table.image_paths)
            if (path not in live or path in changed) and path not in unreadable and path not in reuse.moved
            and path not in reuse.copies]
    update = IndexUpdate(index, rebuilt=False, removed=len(gone), unreadable=sorted(unreadable),
                         unchanged=len(table) - len(todo) - len(unreadable) - len(reuse.moved) - len(reuse.copies),
                         moved=len(reuse.moved), copies=len(reuse.copies), added=len(reuse.copies))
    if not gone and not todo:
        update.facts_recorded = record_facts(index)  # an index built before facts were recorded: no embedding
        if (update.facts_recorded or hashed_now or reuse.moved or reuse.copies or reuse.same_bytes) and saves:
            index.save(out_dir)
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
            image_ids, _ = index.add(emb.image_embeddings, emb.image_paths, emb.text_embeddings, emb.texts,
                                     emb.caption_image, image_states=[current[p] for p in emb.image_paths])
            index.store.set_hashes(image_ids, [reuse.hashes.get(p) for p in emb.image_paths])
            update.facts_recorded += record_facts(index)
            update.changed += sum(1 for p in emb.image_paths if p in changed)
            update.added += sum(1 for p in emb.image_paths if p not in changed)
            update.embedded += len(emb.image_paths)
            unreadable.update({path: current[path] for path in emb.unreadable})
        index.manifest["unreadable_files"] = unreadable
        if saves:
            index.save(out_dir)  # each chunk is kept: a killed run continues from here
    update.unreadable = sorted(unreadable)
    return update


def _backfill_hashes(index: RetrievalIndex, current: dict[str, str]) -> int:
    """Hash the live, unchanged files of an index built before hashes were kept (once). -> how many."""
    missing = [(image_id, path) for image_id, path, state in index.store.without_hash() if current.get(path) == state]
    if missing:
        logger.info("recording the content hash of %d indexed files (once: it finds them when they move)",
                    len(missing))
        index.store.set_hashes([i for i, _ in missing], content_hashes(p for _, p in missing))
    return len(missing)


def _reuse_by_content(index: RetrievalIndex, table: CaptionTable, live: dict, *, gone: list[str], changed: set[str],
                      unreadable: dict) -> _Reuse:
    """Hash the new and changed files and match them with the index's: a new file with a gone file's bytes (and
    the same captions) moved there; one with a present file's bytes (and no captions of its own) is a copy; a
    changed file with the same bytes and captions as before was only touched."""
    reuse = _Reuse()
    new = [path for path in table.image_paths if path not in live and path not in unreadable]
    candidates = [*new, *sorted(changed)]
    if not candidates:
        return reuse
    reuse.hashes = dict(zip(candidates, content_hashes(candidates)))
    known = index.store.ids_by_hash(h for h in reuse.hashes.values() if h)
    if not known:
        return reuse
    captions = dict(zip(table.image_paths, table.captions))
    stored = index.store.captions_of([i for ids in known.values() for i in ids])
    ids_of_gone = {live[path][0] for path in gone}
    for path in sorted(changed):
        image_id = live[path][0]
        if image_id in known.get(reuse.hashes[path], []) and stored[image_id] == list(captions[path]):
            reuse.same_bytes[path] = image_id
    taken: set[int] = set()
    for path in new:
        ids = known.get(reuse.hashes[path] or "", [])
        moved = next((i for i in ids if i in ids_of_gone and i not in taken and stored[i] == list(captions[path])),
                     None)
        if moved is not None:
            reuse.moved[path] = moved
            taken.add(moved)
        elif ids and not captions[path]:
            reuse.copies[path] = ids[0]
    return reuse


def _apply_reuse(index: RetrievalIndex, reuse: _Reuse, current: dict[str, str]) -> None:
    """Point moved ids at their new paths, record touched files' new states, add copies with their originals'
    vectors."""
    for path, image_id in [*reuse.moved.items(), *reuse.same_bytes.items()]:
        index.store.move_image(image_id, path, current[path])
    if reuse.moved:
        record_facts(index, ids=list(reuse.moved.values()))  # their folders changed
    if reuse.copies:
        paths = list(reuse.copies)
        vectors = np.asarray(index.image_embeddings[[reuse.copies[p] for p in paths]])  # (n, D)
        image_ids, _ = index.add(vectors, paths, np.zeros((0, index.d), np.float32), [], [],
                                 image_states=[current[p] for p in paths])
        index.store.set_hashes(image_ids, [reuse.hashes[p] for p in paths])
        record_facts(index)


def record_facts(index: RetrievalIndex, root: str | None = None, ids: Sequence[int] | None = None) -> int:
    """Record what filters ask (vclr.data.images.image_facts: folder, type, size, date taken) for every live image
    that has none yet: new images, and every image of an index built before facts were recorded, whose vectors are
    kept as they are; or for the images `ids` (moved ones). Folders are relative to `root` (default: the collection
    the index records). -> how many."""
    from vclr.data.images import image_facts

    root = root or index.manifest.get("dataset")
    if root and Path(root).is_file():  # a caption table: paths are relative to its folder
        root = str(Path(root).parent)
    missing = index.store.without_facts() if ids is None else list(zip(ids, index.store.image_paths(ids)))
    if missing:
        index.store.set_facts([image_id for image_id, _ in missing], [image_facts(path, root) for _, path in missing])
    return len(missing)


def read_words(index: RetrievalIndex, out_dir: Path) -> int:
    """OCR the live images not read yet (all of them the first time; then new and changed ones), save. -> how many."""
    from tqdm import tqdm

    from vclr.data.ocr import check_ocr, read_texts

    todo = index.store.without_words()
    if todo or not index.manifest.get("ocr"):
        check_ocr()
        with tqdm(total=len(todo), unit="img", desc="reading text (OCR)", disable=None) as bar:
            texts = read_texts([path for _, path in todo], progress=bar.update)
        index.store.set_words([i for i, _ in todo], [t or "" for t in texts])
        index.manifest["ocr"] = True
        index.save(out_dir)
    return len(todo)


def _is_main() -> bool:
    from vclr.embed.processes import launched_processes, process_state

    return launched_processes() == 1 or process_state().is_main_process


def add_to_index(index_dir: str | Path, data: str, source: ModelSource | str | os.PathLike | None = None
                 ) -> tuple[int, int]:
    """Embed another dataset with the index's model and append it, without rebuilding. -> (images, captions)."""
    from vclr.embed.embedding import embed_table

    index = RetrievalIndex.load(index_dir)
    source = as_source(source) if source else recorded_source(index, index_dir)
    model, cfg = source.load()
    index.check_model(model.embed_dim, config_hashes(cfg.model))  # before spending time on embedding
    _, table = _collection(cfg, data)
    emb = embed_table(model, cfg, table)
    image_ids, text_ids = index.add(emb.image_embeddings, emb.image_paths, emb.text_embeddings, emb.texts,
                                    emb.caption_image, image_states=[file_state(p) for p in emb.image_paths])
    record_facts(index, str(Path(data).resolve()))
    index.save(index_dir)
    return len(image_ids), len(text_ids)


def delete_from_index(index_dir: str | Path, image_ids: Sequence[int] = (), text_ids: Sequence[int] = ()) -> dict:
    index = RetrievalIndex.load(index_dir)
    index.delete(image_ids, text_ids)
    index.save(index_dir)
    return {k: index.manifest[k] for k in ("num_images", "num_texts", "deleted_images", "deleted_texts")}


def recorded_source(index: RetrievalIndex, index_dir: str | Path) -> ModelSource:
    source = source_from_manifest(index.manifest, index_dir)
    if source is None:
        raise VclrError("the index records no model: give `run` or `model` (with `pretrained`)")
    return source
