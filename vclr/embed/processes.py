"""Embedding a collection across processes (GPUs, nodes): `accelerate launch --num_processes N -m vclr.cli index ...`.

    embed = collection_embedder(out_dir, max_bytes)  # embed_table in one process; sharded under a launch
    emb = embed(model, cfg, table)            # the whole Embeddings on process 0, None on the others

Each process embeds a contiguous share of the rows (Accelerate's `split_between_processes`) and writes its own shard
(vectors as .npy, paths and captions as JSON, a `.done` marker last) into a scratch folder beside the index; after a
barrier, process 0 reads the shards in rank order, so the rows, ids and vectors are those of one process. Only
imported under a multi-process launch: searching and serving never load Accelerate.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vclr.config import Config
from vclr.data.dataset import CaptionTable
from vclr.embed.embedding import Embeddings, embed_table
from vclr.model.dual_encoder import DualEncoder

Embedder = Callable[[DualEncoder, Config, CaptionTable], "Embeddings | None"]


def launched_processes() -> int:
    """How many processes a launcher (accelerate launch, torchrun) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_state():
    """Accelerate's view of the launch. `accelerate launch --cpu` (ACCELERATE_USE_CPU) asks for CPU processes; the
    Accelerator reads that flag itself, PartialState only when told."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def collection_embedder(out_dir: Path, in_memory_max_bytes: int) -> Embedder:
    if launched_processes() == 1:
        return embed_table
    return lambda model, cfg, table: embed_table_sharded(model, cfg, table, scratch_dir(out_dir), in_memory_max_bytes)


def scratch_dir(out_dir: Path) -> Path:
    return Path(out_dir).parent / f".{Path(out_dir).name}.embed-shards"


def _write_shard(folder: Path, rank: int, emb: Embeddings, first_row: int) -> None:
    stem = folder / f"rank-{rank:05d}"
    np.save(f"{stem}-images.npy", emb.image_embeddings)
    np.save(f"{stem}-texts.npy", emb.text_embeddings)
    meta = {"image_paths": emb.image_paths, "texts": emb.texts, "caption_image": emb.caption_image.tolist(),
            "unreadable": emb.unreadable, "rows": (emb.rows + first_row).tolist()}
    Path(f"{stem}.json").write_text(json.dumps(meta), encoding="utf-8")
    Path(f"{stem}.done").touch()  # last: the shard is whole


def _concatenate(parts: list[np.ndarray], spill_to: Path | None) -> np.ndarray:
    """Shards (memory-mapped) one after the other: in RAM, or streamed into one memory-mapped file."""
    if spill_to is None:
        return np.concatenate(parts)
    out = np.lib.format.open_memmap(spill_to, mode="w+", dtype=np.float32,
                                    shape=(max(1, sum(len(p) for p in parts)), parts[0].shape[1]))
    start = 0
    for part in parts:
        out[start:start + len(part)] = part
        start += len(part)
    out.flush()
    return out[:start]


def _load_mapped(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # an empty array cannot be mapped (a share with no captions)
        return np.load(path)


def _read_shards(folder: Path, world: int, in_memory_max_bytes: int) -> Embeddings:
    images, texts, caption_image, paths, captions, unreadable, rows = [], [], [], [], [], [], []
    for rank in range(world):
        stem = folder / f"rank-{rank:05d}"
        if not Path(f"{stem}.done").is_file():
            raise RuntimeError(f"embedding shard {stem} is missing: process {rank} did not finish")
        meta = json.loads(Path(f"{stem}.json").read_text(encoding="utf-8"))
        images.append(_load_mapped(f"{stem}-images.npy"))
        texts.append(_load_mapped(f"{stem}-texts.npy"))
        caption_image.append(np.asarray(meta["caption_image"], dtype=np.int64) + len(paths))  # shard -> global rows
        paths += meta["image_paths"]
        captions += meta["texts"]
        unreadable += meta["unreadable"]
        rows += meta["rows"]
    spill = sum(a.nbytes for a in images + texts) > in_memory_max_bytes  # then the index reads them a chunk at a time
    return Embeddings(_concatenate(images, folder / "images.npy" if spill else None),
                      _concatenate(texts, folder / "texts.npy" if spill else None), np.concatenate(caption_image),
                      paths, captions, unreadable, np.asarray(rows, dtype=np.int64))


def embed_table_sharded(model: DualEncoder, cfg: Config, table: CaptionTable, folder: Path,
                        in_memory_max_bytes: int) -> Embeddings | None:
    """This process's share of `table`, embedded and written as a shard; process 0 returns all shards assembled (in
    one memory-mapped file when they exceed `in_memory_max_bytes`: removing the folder keeps the mapping readable)."""
    state = process_state()
    if state.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    state.wait_for_everyone()
    rows = list(range(len(table)))
    with state.split_between_processes(rows) as mine:  # contiguous, in rank order
        share = CaptionTable(table.source, [table.image_paths[r] for r in mine], [table.captions[r] for r in mine])
        _write_shard(folder, state.process_index, embed_table(model, cfg, share), mine[0] if mine else 0)
    state.wait_for_everyone()
    result = _read_shards(folder, state.num_processes, in_memory_max_bytes) if state.is_main_process else None
    state.wait_for_everyone()  # everyone is past reading before the scratch folder goes
    if state.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
    return result
