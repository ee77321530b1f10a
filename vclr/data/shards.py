"""Training pairs streamed from shards, for datasets larger than memory: webdataset .tar or parquet files.

`data.train` names a directory of shards (and no metadata table). HF `datasets` streams them; each process reads its
own shards (`split_dataset_by_node`: whole shards when their count divides by the number of processes), and the
DataLoader's workers split a process's shards again. Order is a function of (seed, epoch): a shard shuffle plus a
buffer shuffle, so a resumed run replays the same stream. Images stay encoded bytes until decoded: in the workers
(PIL) or on the training device (`data.decode_on=device`).

Webdataset samples: key.jpg|jpeg|png|webp + key.txt (one caption a line) and/or key.json ({"captions": [...]},
{"caption": ...} or {"text": ...}), parsed by `sample_captions` here and in `vclr prepare webdataset` alike.
Parquet rows: an `image` column (HF Image: {"bytes", "path"}; without bytes the path is read) and the
data.caption_columns.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vclr.config import DataConfig
from vclr.data.batch import TrainBatch, collate_pairs
from vclr.data.dataset import METADATA_NAMES, ImageDecoder, decode_transform, draft_size, read_bytes, stable_id
from vclr.errors import DataError

logger = logging.getLogger(__name__)

SHARD_BUILDERS = {".tar": "webdataset", ".parquet": "parquet"}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image")
SHUFFLE_BUFFER = 2000


def find_shards(source: str | os.PathLike) -> list[Path]:
    """The shard files of a shard directory; [] for anything else (a table file, an imagefolder split)."""
    folder = Path(source)
    if not folder.is_dir() or any((folder / name).is_file() for name in METADATA_NAMES):
        return []
    shards = sorted(p for p in folder.iterdir() if p.suffix in SHARD_BUILDERS)
    if len({p.suffix for p in shards}) > 1:
        raise DataError(f"{folder} mixes .tar and .parquet shards; keep one kind per directory")
    return shards


def sample_captions(sample: dict, caption_columns: Sequence[str] = ()) -> list[str]:
    """The captions of one webdataset sample or parquet row, streamed or prepared alike: `.txt` (one caption per
    line), `.json`'s "captions" / "caption" / "text", and the `caption_columns`; stripped, deduplicated, in order.
    Values may be raw member bytes (a tar read by `vclr prepare`) or already decoded (HF `datasets` streaming)."""
    captions: list = []
    text = sample.get("txt")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if isinstance(text, str):
        captions += text.splitlines()
    meta = sample.get("json")
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
    for key in ("captions", "caption", "text"):
        value = meta.get(key) if isinstance(meta, dict) else None
        captions += value if isinstance(value, (list, tuple)) else [value]
    for column in caption_columns:
        value = sample.get(column) if column not in ("txt", "json") else None
        captions += value if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(c.strip() for c in captions if isinstance(c, str) and c.strip()))


def sample_image_key(sample: dict) -> str | None:
    """The key of a sample's image (`jpg`, `png`... or a parquet `image` column), or None."""
    return next((key for key in IMAGE_KEYS if sample.get(key) is not None), None)


class ShardPairs:
    """Row -> {"image": bytes or uint8 (3, S, S), "tokens": (L,), "image_id": stable_id of the image's bytes};
    None-image rows are dropped by the collate."""

    def __init__(self, tokenizer, image_size: int, seed: int, caption_columns: Sequence[str], encoded: bool,
                 augment: bool, jpeg_draft: float = DataConfig.jpeg_draft, augment_settings=None):
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0
        self.caption_columns = tuple(caption_columns)
        self.encoded = encoded
        self.image_input = "encoded" if encoded else "pixels"  # what its rows carry (vclr.data.batch)
        self.decoder = ImageDecoder(decode_transform(image_size, augment, settings=augment_settings),
                                    draft_size(image_size, jpeg_draft))

    def __call__(self, row: dict) -> dict:
        image_key = sample_image_key(row)
        image = row[image_key] if image_key else None
        data = image.get("bytes") if isinstance(image, dict) else image  # HF Image(decode=False) or raw binary
        if not data and isinstance(image, dict) and image.get("path"):  # parquet written without embedded bytes
            data = read_bytes(image["path"])
        captions = sample_captions(row, self.caption_columns)
        if not data or not captions:
            return {"image": None, "tokens": None, "image_id": None}
        # caption choice: a pure function of (seed, epoch, key), as for in-memory datasets
        key = str(row.get("__key__", "")) + str(row.get("__url__", ""))
        draw = np.random.default_rng((self.seed, self.epoch, zlib.crc32(key.encode()))).integers(len(captions))
        tokens = self.tokenizer([captions[draw]])[0]  # (L,)
        # decoded as files are (same limits and mode handling): (3, S, S) uint8, or None when unreadable
        image = data if self.encoded else self.decoder(io.BytesIO(data))
        return {"image": image, "tokens": tokens, "image_id": stable_id(data)}


def stream_shards(shards: list[Path], pairs: ShardPairs, rank: int, world: int, epoch: int):
    """An HF IterableDataset of this process's pairs for `epoch`, shuffled by (seed, epoch)."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    builder = SHARD_BUILDERS[shards[0].suffix]
    try:
        stream = datasets.load_dataset(builder, data_files=[str(s) for s in shards], split="train", streaming=True)
    except Exception as e:
        raise DataError(f"could not read shards in {shards[0].parent}: {type(e).__name__}: {e}") from None
    for column, feature in (stream.features or {}).items():
        if isinstance(feature, datasets.Image):
            stream = stream.cast_column(column, datasets.Image(decode=False))  # bytes: decoded later, in batches
    if world > 1 and len(shards) % world:
        logger.warning("%d shards for %d processes: each process reads every shard and keeps 1/%d of the rows; "
                       "use a multiple of %d shards", len(shards), world, world, world)
    stream = split_dataset_by_node(stream, rank=rank, world_size=world)
    stream = stream.shuffle(seed=pairs.seed, buffer_size=SHUFFLE_BUFFER)
    stream.set_epoch(epoch)
    pairs.epoch = epoch
    return stream.map(pairs, remove_columns=list(stream.column_names or []))


def collate_stream(rows: list[dict], image_input: str = "pixels") -> TrainBatch:
    """Stream rows -> the same TrainBatch as `collate_pairs`."""
    return collate_pairs([(r["image"], r["tokens"], r["image_id"]) if r["image"] is not None else None
                          for r in rows], image_input)
