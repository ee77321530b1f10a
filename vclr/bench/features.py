"""A model's features of a benchmark's images, captions and class prompts, computed once and kept on disk.

    features = Featurizer(model, cfg, cache=OUT / "features" / model_key, batch_size=64)
    images, kept = features.images(paths)                  # (M, D) unit vectors of the readable images, their rows
    texts = features.captions(captions_of_each_image)      # (C, D), embedded image block by image block
    classes = features.classes(classnames, templates)      # (K, D) prompt-ensemble class vectors

Batching follows CLIP_benchmark's loaders on purpose: images in consecutive batches of `batch_size` (its DataLoader's
`--batch_size`, 64 by default), each batch's captions tokenised and embedded together, one batch of prompts per class.
On a CPU a network's output for one image depends (in the last bits) on what else is in its batch, so this is what
makes the figures equal CLIP_benchmark's bit for bit rather than to rounding. Images are decoded whole
(`jpeg_draft=0`), as open_clip's preprocess does.

Each array is a .npy file named by what it holds (a hash of the paths, captions or prompts and the batching), written
by the atomic writer: a killed benchmark keeps every array it finished, and a rerun reads them instead of embedding.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vclr.data.dataset import tokenize_all
from vclr.embed.embedding import class_embeddings, embed_image_paths, embed_tokens
from vclr.model.build import get_tokenizer
from vclr.storage import atomic_write_bytes


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


class Featurizer:
    """Embeddings of one model, cached under `cache` (None: not kept)."""

    def __init__(self, model, cfg, cache: Path | None = None, batch_size: int = 64, num_workers: int = 0):
        self.model, self.cfg, self.cache = model, cfg, cache
        self.batch_size, self.num_workers = batch_size, num_workers

    def _path(self, name: str) -> Path | None:
        return self.cache / f"{name}.npy" if self.cache is not None else None

    def _save(self, name: str, value: np.ndarray) -> None:
        if self.cache is not None:
            buffer = io.BytesIO()
            np.save(buffer, value)
            atomic_write_bytes(self._path(name), buffer.getvalue())

    def _cached(self, name: str, compute) -> np.ndarray:
        path = self._path(name)
        if path is not None and path.is_file():
            return np.load(path)
        value = compute()
        self._save(name, value)
        return value

    def images(self, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(M, D) float32 unit vectors of the readable images and (M,) their positions in `paths`."""
        key = _key("images", list(paths), self.batch_size)
        vectors_path, kept_path = self._path(f"{key}-vectors"), self._path(f"{key}-kept")
        if vectors_path is not None and vectors_path.is_file() and kept_path.is_file():
            return np.load(vectors_path), np.load(kept_path)
        vectors, kept = embed_image_paths(self.model, paths, self.batch_size, self.num_workers, jpeg_draft=0)
        self._save(f"{key}-vectors", vectors)
        self._save(f"{key}-kept", kept)  # written last: both files present means both complete
        return vectors, kept

    def captions(self, captions: Sequence[Sequence[str]], images_per_batch: int | None = None) -> np.ndarray:
        """(C, D): every caption of every image in order, a batch for each block of `images_per_batch` images
        (default: the image batch size) as CLIP_benchmark's retrieval loop embeds them."""
        block = images_per_batch or self.batch_size
        return self._cached(_key("captions", [list(c) for c in captions], block),
                            lambda: self._embed_caption_blocks(captions, block))

    def _embed_caption_blocks(self, captions: Sequence[Sequence[str]], block: int) -> np.ndarray:
        tokenizer, parts = get_tokenizer(self.cfg.model), []
        for start in range(0, len(captions), block):
            texts = [c for caps in captions[start:start + block] for c in caps]
            if texts:
                parts.append(embed_tokens(self.model, tokenize_all(tokenizer, texts), batch_size=len(texts)))
        return np.concatenate(parts) if parts else np.zeros((0, self.model.embed_dim), np.float32)

    def classes(self, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        return self._cached(_key("classes", list(classnames), list(templates)),
                            lambda: class_embeddings(self.model, self.cfg, classnames, templates))
