"""Locked towers computed once (LiT on small data): when a tower's frozen part is a prefix that the trainable rest
only reads the output of (`DualEncoder.image_split` / `text_split`) and its input is deterministic (no
augmentation, or train.cache_views seeded augmented views of each image), its outputs for every training image (and
view) and caption are computed once, kept on disk as memory-mapped .npy files, and training runs only the trainable
rest.

    $VCLR_CACHE/locked/<key>/images.npy     (N, ...) float32, row-aligned with the training table
    $VCLR_CACHE/locked/<key>/texts.npy      (C, ...) float32, aligned with the dataset's caption rows

The key hashes the frozen part's weights, the data (paths, captions, file sizes and times, the token ids) and the
preprocessing, so a run reuses another's features exactly when they would come out the same, and any change computes
them afresh. Loss and gradients equal the uncached path (tests/test_train_locked_cache.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vclr.config import Config
from vclr.data.augment import augmentation_key
from vclr.data.cache import cache_dir
from vclr.data.dataset import ImageTextDataset, normalize_images
from vclr.errors import ConfigError, DataError
from vclr.model.build import image_preprocess_cfg
from vclr.model.dual_encoder import DualEncoder
from vclr.model.towers import TowerSplit
from vclr.storage import write_directory

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
BATCH = 256


@dataclass
class LockedFeatures:
    """Cached frozen-part outputs (None for a tower that is not cached)."""

    images: torch.Tensor | None = None  # (N, ...) per training image row
    texts: torch.Tensor | None = None  # (C, ...) per caption row


def _digest_state(state: dict[str, torch.Tensor], digest) -> None:
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        # flattened first: a 0-dim tensor (a BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")


def _data_digest(dataset: ImageTextDataset, digest) -> None:
    digest.update(dataset.table.fingerprint().encode())
    for path in dataset.table.image_paths:  # the files themselves: a replaced image changes the key
        stat = os.stat(path)
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())


def cache_key(kind: str, split: TowerSplit, dataset: ImageTextDataset, preprocessing: dict) -> str:
    """Hashes exactly what the frozen outputs depend on: the frozen part's tensors (not the trainable rest, so
    runs with other seeds or heads share the cache), the data and the preprocessing."""
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "kind": kind, **preprocessing},
                                       sort_keys=True, default=str).encode())
    _digest_state(split.state, digest)
    if kind == "images":
        _data_digest(dataset, digest)
    else:
        digest.update(dataset.tokens.numpy().tobytes())  # the captions as the tokenizer made them
    return digest.hexdigest()[:24]


@torch.no_grad()
def _compute(frozen, batches, total: int, desc: str) -> np.ndarray:
    parts = []
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", leave=False):
        parts.append(frozen(batch).float().cpu().numpy())
    return np.concatenate(parts)


def _cached(kind: str, key: str) -> Path | None:
    folder = cache_dir() / "locked" / key
    return folder if (folder / f"{kind}.npy").is_file() else None


def _save(kind: str, key: str, arrays: dict[str, np.ndarray]) -> Path:
    folder = cache_dir() / "locked" / key
    write_directory(folder, lambda tmp: [np.save(tmp / f"{name}.npy", value) for name, value in arrays.items()])
    return folder


def _mapped(folder: Path, name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c"))  # copy-on-write map, read as needed


def _image_batches(model: DualEncoder, dataset: ImageTextDataset, device: torch.device, view: int | None = None):
    """Normalised (b, 3, S, S) batches of the dataset's images in row order (from its RAM cache when it has one);
    with `view`, that seeded augmented view of each."""
    preprocess = image_preprocess_cfg(model)
    for start in range(0, len(dataset), BATCH):
        rows = range(start, min(start + BATCH, len(dataset)))
        images = [dataset.image(i, view) for i in rows]
        bad = [dataset.table.image_paths[i] for i, image in zip(rows, images) if image is None]
        if bad:
            raise DataError(f"{bad[0]} could not be read while caching the locked image tower; remove or replace it")
        yield normalize_images(torch.stack(images).to(device), preprocess["mean"], preprocess["std"])


def image_cache_key(model: DualEncoder, split: TowerSplit, dataset: ImageTextDataset) -> str:
    """The frozen image part's key: its weights, the data, the model's preprocessing and how far JPEGs are decoded
    (data.jpeg_draft changes the pixels a little); with views, their number, the seed and the augmentation."""
    views = {"views": dataset.views, "seed": dataset.seed, **augmentation_key(dataset.augment_settings)} \
        if dataset.views else {}
    return cache_key("images", split, dataset, {**image_preprocess_cfg(model), "draft_to": dataset.decoder.draft_to,
                                                **views})


def _image_features(model: DualEncoder, dataset: ImageTextDataset, device: torch.device) -> torch.Tensor:
    """Per-row outputs of the frozen image part (with views: every view of every row, view-major: (K * N, ...));
    afterwards the dataset serves row numbers instead of pixels."""
    split = model.image_split()
    key = image_cache_key(model, split, dataset)
    folder = _cached("images", key)
    if folder is None:
        views = dataset.views or 1
        logger.info("computing the locked image tower's outputs once for %d images%s", len(dataset),
                    f" x {views} augmented views" if dataset.views else "")
        original = {path: i for i, path in enumerate(dataset.table.image_paths)}
        dataset.prepare_images()  # decodes with threads (when it fits data.cache_max_gb), drops unreadable rows
        values = np.concatenate([
            _compute(split.frozen, _image_batches(model, dataset, device, view if dataset.views else None),
                     -(-len(dataset) // BATCH), f"locked image tower, view {view + 1} of {views}")
            for view in range(views)])
        kept = np.asarray([original[path] for path in dataset.table.image_paths], dtype=np.int64)
        folder = _save("images", key, {"images": values, "rows": kept})
    else:
        logger.info("reusing the locked image tower's outputs from %s", folder)
        kept = set(np.load(folder / "rows.npy").tolist())
        unreadable = set(range(len(dataset))) - kept
        if unreadable:
            dataset.drop_rows(unreadable)
    dataset.cache = None  # the pixels are no longer needed: its items carry rows (image_input="rows")
    return _mapped(folder, "images")


def _text_features(model: DualEncoder, dataset: ImageTextDataset, device: torch.device) -> torch.Tensor:
    split = model.text_split()
    key = cache_key("texts", split, dataset, {"model": model.cfg.name})
    folder = _cached("texts", key)
    if folder is None:
        # padding trimmed to the longest caption of all, not per batch: a partly unlocked text tower's frozen part
        # outputs (B, L, H + 1) per token, and the rows must stack (its rest trims each batch again)
        tokens = model.trim_padding(dataset.tokens)
        batches = (tokens[i:i + BATCH].to(device) for i in range(0, len(tokens), BATCH))
        values = _compute(split.frozen, batches, -(-len(tokens) // BATCH), "locked text tower")
        folder = _save("texts", key, {"texts": values})
    else:
        logger.info("reusing the locked text tower's outputs from %s", folder)
    return _mapped(folder, "texts")


def locked_features(model: DualEncoder, dataset: ImageTextDataset, device: torch.device, image: bool, text: bool,
                    accelerator=None) -> LockedFeatures:
    """The cached outputs of the towers asked for; the main process computes them first, the others then read
    them. Without a cached image tower the dataset decodes its images as usual."""
    features = LockedFeatures()
    with accelerator.main_process_first() if accelerator is not None else nullcontext():
        if image:
            features.images = _image_features(model, dataset, device)
        else:
            dataset.prepare_images()
        if text:
            features.texts = _text_features(model, dataset, device)
    return features


def caches_image_tower(cfg: Config, model: DualEncoder) -> bool:
    """Are the locked image tower's outputs cached per image (a frozen prefix; unaugmented pixels, or augmented
    ones with train.cache_views)?"""
    cacheable = model.frozen_image_part() is not None and cfg.data.decode_on == "loader"
    if cfg.train.cache_views and not (cacheable and cfg.data.augment):
        raise ConfigError("train.cache_views caches augmented views of a locked image tower: it needs "
                          "model.lock_image=true, data.augment=true and data.decode_on=loader (with "
                          "train.cache_locked_towers=false the same seeded views are drawn every step instead)")
    return cfg.train.cache_locked_towers and cacheable and (not cfg.data.augment or cfg.train.cache_views > 0)


def cache_locked_towers(cfg: Config, model: DualEncoder, source, accelerator) -> LockedFeatures:
    """Cached outputs of the locked towers' frozen parts (train.cache_locked_towers); the model then trains on them."""
    from vclr.data.sources import MapSource

    if not isinstance(source, MapSource):  # streamed shards: no stable rows to cache by
        return LockedFeatures()
    image = source.dataset.image_input == "rows"
    text = cfg.train.cache_locked_towers and model.frozen_text_part() is not None
    locked = locked_features(model.to(accelerator.device), source.dataset, accelerator.device, image, text,
                             accelerator)
    model.use_cached_inputs(image=locked.images is not None, text=locked.texts is not None)
    if image or text:
        logger.info("locked towers cached: image %s, text %s; training runs only the parts that train", image, text)
    return locked
