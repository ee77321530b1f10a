"""Training data sources: one small class per kind of data, behind one protocol the trainer uses.

    source = open_training_source(cfg, accelerator, tokenizer, image_size)
    for batch in source.loader(epoch): ...        # {"images" | "encoded", "tokens"}
    source.uneven_epochs                          # True: processes may run out of batches at different steps
    source.report()                               # what the data held and what was skipped, for data_report.json

A new kind of data is one class here with these three members, and one branch in `open_training_source`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from vclr.config import Config
from vclr.data.batch import collate_pairs
from vclr.data.dataset import CaptionTable, ImageTextDataset, load_caption_table, split_held_out
from vclr.data.shards import ShardPairs, collate_stream, find_shards, stream_shards
from vclr.errors import VclrError

logger = logging.getLogger(__name__)


class TrainingSource(Protocol):
    uneven_epochs: bool  # shard streams of different processes can end at different batches

    def loader(self, epoch: int) -> Iterable[dict]: ...

    def report(self) -> dict: ...


def loader_options(cfg: Config, device: torch.device) -> dict:
    workers = cfg.data.num_workers
    return {"num_workers": workers, "persistent_workers": workers > 0, "prefetch_factor": 4 if workers else None,
            "pin_memory": device.type == "cuda"}


class MapSource:
    """A prepared table of image paths and captions (in RAM when it fits): Accelerate shards its batches evenly."""

    uneven_epochs = False

    def __init__(self, cfg: Config, accelerator, tokenizer, image_size: int, cached_image_rows: bool = False):
        table = load_caption_table(cfg.data.train, cfg.data.image_column, cfg.data.caption_columns)
        self.held_out: CaptionTable | None = None
        if cfg.data.val_fraction and not cfg.data.val:  # validation images never train
            table, self.held_out = split_held_out(table, cfg.data.val_fraction)
        self.dataset = ImageTextDataset(table, tokenizer, image_size, seed=cfg.train.seed, augment=cfg.data.augment,
                                        cache_images=cfg.data.cache_images, cache_max_gb=cfg.data.cache_max_gb,
                                        image_input="rows" if cached_image_rows else
                                        "encoded" if cfg.data.decode_on == "device" else "pixels",
                                        jpeg_draft=cfg.data.jpeg_draft, augment_settings=cfg.data,
                                        views=cfg.train.cache_views,
                                        # images are decoded in setup, unless a locked image tower's cache makes
                                        # pixels unnecessary (vclr.train.locked_cache)
                                        decode_now=False)
        if len(self.dataset) < cfg.data.batch_size:
            raise VclrError(f"data.train has {len(self.dataset)} usable images, fewer than data.batch_size="
                            f"{cfg.data.batch_size}; lower the batch size or add data")
        loader = DataLoader(self.dataset, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(cfg.train.seed),
                            collate_fn=partial(collate_pairs, image_input=self.dataset.image_input),
                            **loader_options(cfg, accelerator.device))
        self._loader = accelerator.prepare(loader)

    def loader(self, epoch: int):
        """The same loader, reshuffled by (seed, epoch); captions drawn by (seed, epoch, item)."""
        self._loader.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        return self._loader

    def report(self) -> dict:
        skipped = dict(self.dataset.table.skipped)
        if self.dataset.unreadable_on_the_fly:  # the main process's items (num_workers=0)
            skipped["unreadable image"] = len(self.dataset.unreadable_on_the_fly)
        return {"skipped_or_repaired": skipped, "usable_pairs": len(self.dataset)}


class ShardSource:
    """webdataset/parquet shards streamed through HF `datasets`: each process reads its own shards."""

    uneven_epochs = True

    def __init__(self, cfg: Config, accelerator, tokenizer, image_size: int, shards: list[Path]):
        self.cfg, self.shards = cfg, shards
        self.rank, self.world, self.device = accelerator.process_index, accelerator.num_processes, accelerator.device
        self.pairs = ShardPairs(tokenizer, image_size, cfg.train.seed, cfg.data.caption_columns,
                                cfg.data.decode_on == "device", cfg.data.augment, cfg.data.jpeg_draft, cfg.data)
        logger.info("streaming %d shards from %s", len(shards), cfg.data.train)

    def loader(self, epoch: int):
        """A new stream for `epoch`, shuffled by (seed, epoch)."""
        stream = stream_shards(self.shards, self.pairs, self.rank, self.world, epoch)
        collate = partial(collate_stream, image_input=self.pairs.image_input)
        return DataLoader(stream, batch_size=self.cfg.data.batch_size, drop_last=True, collate_fn=collate,
                          **loader_options(self.cfg, self.device))

    def report(self) -> dict:
        return {"skipped_or_repaired": {}, "usable_pairs": None, "shards": len(self.shards)}


def open_training_source(cfg: Config, accelerator, tokenizer, image_size: int, *,
                         cached_image_rows: bool = False) -> TrainingSource:
    """Shards when data.train is a folder of them, else a prepared table (vclr.train.loop.check_inputs ran first).
    `cached_image_rows`: a table's items carry their image's row (a locked image tower cached per row); streamed
    shards have no stable rows and carry their images."""
    shards = find_shards(cfg.data.train)
    if shards:
        return ShardSource(cfg, accelerator, tokenizer, image_size, shards)
    return MapSource(cfg, accelerator, tokenizer, image_size, cached_image_rows=cached_image_rows)


def validation_table(cfg: Config, source: TrainingSource) -> CaptionTable | None:
    """The table `train.eval_every` scores: data.val, else the share of train held out by data.val_fraction, else
    data.test; None when there is none."""
    if cfg.data.val:
        return load_caption_table(cfg.data.val, cfg.data.image_column, cfg.data.caption_columns)
    if cfg.data.val_fraction:
        if getattr(source, "held_out", None) is None:
            raise VclrError("data.val_fraction holds out part of a table; for shards pass data.val=TABLE instead")
        return source.held_out
    if cfg.data.test:
        return load_caption_table(cfg.data.test, cfg.data.image_column, cfg.data.caption_columns)
    return None
