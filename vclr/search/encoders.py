"""What turns a query into a vector: one `QueryEncoder` per backend, and the one way a query image is read.

    encoder = ModelEncoder(model_source(run="runs/demo"))      # the PyTorch model, loaded on first need
    encoder = TracedTextEncoder.load("photos-index")           # the index's traced text tower; images load the model
    encoder = OnnxQueryEncoder.load("demo-onnx")               # vclr.search.onnx: onnxruntime, no torch
    vectors = encoder.embed_texts(["a red circle"])            # (1, D) float32 unit vectors
    vectors = encoder.embed_images([read_query_image("q.jpg")])

A `Searcher` holds exactly one encoder; the CLI, the Python API and the service all embed images by
`read_query_image` then `encoder.embed_images`, so a query image is decoded and preprocessed the same way everywhere.
This module imports numpy and PIL only: each encoder imports its backend (torch, open_clip, onnxruntime) when it
is first used.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from vclr.errors import VclrError

if TYPE_CHECKING:
    from PIL import Image

    from vclr.config import Config
    from vclr.index.format import RetrievalIndex
    from vclr.model.dual_encoder import DualEncoder
    from vclr.model.source import ModelSource

logger = logging.getLogger(__name__)

MAX_UPLOAD_PIXELS = 40_000_000  # an uploaded query image above this is refused from its header, before decoding


class QueryEncoder(Protocol):
    """Texts and images -> unit vectors in an index's space."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...  # (N, D) float32 unit vectors

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...  # decoded RGB images -> (N, D)

    def check_index(self, index: RetrievalIndex) -> None: ...  # a clear error when it is not the index's model

    def reopen(self, old: RetrievalIndex, new: RetrievalIndex) -> QueryEncoder:
        """The encoder for a newer save of the index: itself when it still fits, else a fresh one (checked)."""
        ...


def read_query_image(source: str | Path | bytes) -> Image.Image:
    """A query image (a file, or an upload's bytes) -> RGB, through the decoder the index's images went through
    (pixel limit from the header: the collection's for files, a tighter one for uploads; any mode to RGB); a clear
    error when it cannot be read."""
    from vclr.data.images import read_image

    if isinstance(source, bytes):
        max_pixels = MAX_UPLOAD_PIXELS
        if not source:
            raise VclrError("the upload is empty: send an image file in the 'file' field")
        image = read_image(io.BytesIO(source), max_pixels=max_pixels)
        if image is None:
            raise VclrError(f"the upload is not a readable image (JPEG, PNG, WebP...) of at most {max_pixels} pixels")
        return image
    if not Path(source).is_file():
        raise VclrError(f"query image {source} does not exist")
    image = read_image(str(source))
    if image is None:
        raise VclrError(f"query image {source} is not a readable image")
    return image


def model_identity_of(manifest: dict) -> tuple:
    """What says two saves of an index were embedded by the same model (and weights)."""
    return tuple(str(manifest.get(key)) for key in ("model_source", "model_config_hash", "weights_state", "dim"))


class ModelEncoder:
    """Queries through the PyTorch model of a model source (a run, an open_clip model), loaded on first need and
    checked against the index then."""

    def __init__(self, source: ModelSource, index: RetrievalIndex | None = None):
        self.source, self.index = source, index
        self.model: DualEncoder | None = None
        self.cfg: Config | None = None

    @classmethod
    def of_index(cls, index: RetrievalIndex, index_dir: str | Path) -> ModelEncoder:
        """The model the index records (a clear error when it records none)."""
        from vclr.index.build import recorded_source

        return cls(recorded_source(index, index_dir), index)

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> DualEncoder:
        if self.model is None:
            from vclr.config import config_hashes

            self.model, self.cfg = self.source.load()
            if self.index is not None:
                self.index.check_model(self.model.embed_dim, config_hashes(self.cfg.model))
        return self.model

    def load_model(self) -> None:
        """Load the model now (a service loads it before the first query rather than during it)."""
        self.load()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        from vclr.embed.embedding import embed_texts

        return embed_texts(self.load(), self.cfg, texts)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        from vclr.embed.embedding import embed_pil_images

        return embed_pil_images(self.load(), images)

    def check_index(self, index: RetrievalIndex) -> None:
        """Checked when the model loads (a cold text query by another encoder never loads it)."""
        self.index = index
        if self.model is not None:
            from vclr.config import config_hashes

            index.check_model(self.model.embed_dim, config_hashes(self.cfg.model))

    def reopen(self, old: RetrievalIndex, new: RetrievalIndex) -> ModelEncoder:
        """The same model when the new save was embedded by it; else the model loaded afresh for the new save (now,
        if this one was loaded: queries must not pay for it)."""
        if model_identity_of(old.manifest) == model_identity_of(new.manifest):
            self.check_index(new)
            return self
        fresh = ModelEncoder(self.source, new)
        if self.loaded:
            fresh.load()
        return fresh


class TracedTextEncoder:
    """Text queries through the index's own traced text tower (vclr.index.text_tower: torch alone, no open_clip);
    image queries through the model the index records, loaded when the first one comes."""

    def __init__(self, index_dir: Path, index: RetrievalIndex, tower):
        self.index_dir, self.index, self.tower = Path(index_dir), index, tower
        self.images: ModelEncoder | None = None  # resolved on the first image query: text queries never need it

    @classmethod
    def load(cls, index_dir: str | Path, index: RetrievalIndex) -> TracedTextEncoder | None:
        """None when the index holds no traced tower (its model's tokenizer is not open_clip's BPE)."""
        from vclr.index.text_tower import TextQueryEncoder

        tower = TextQueryEncoder.load(index_dir)
        return cls(Path(index_dir), index, tower) if tower is not None else None

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.tower(texts)

    def _image_encoder(self) -> ModelEncoder:
        if self.images is None:
            self.images = ModelEncoder.of_index(self.index, self.index_dir)
        return self.images

    def load_model(self) -> None:
        """Load the model for image queries now (a service loads it before the first image query)."""
        self._image_encoder().load()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._image_encoder().embed_images(images)

    def check_index(self, index: RetrievalIndex) -> None:
        """The tower is a snapshot of the index's own model: it always fits the save it was read from."""

    def reopen(self, old: RetrievalIndex, new: RetrievalIndex) -> TracedTextEncoder:
        """Itself when the new save has the same model and tower file; else the new save's tower (and its model
        loaded now when this encoder had loaded one)."""
        from vclr.index.text_tower import TOWER_FILE

        same_model = model_identity_of(old.manifest) == model_identity_of(new.manifest)
        same_tower = old.manifest.get("files", {}).get(TOWER_FILE) == new.manifest.get("files", {}).get(TOWER_FILE)
        if same_model and same_tower:
            self.index = new
            if self.images is not None:
                self.images.check_index(new)
            return self
        fresh = TracedTextEncoder.load(self.index_dir, new)
        if fresh is None:
            return ModelEncoder.of_index(new, self.index_dir).reopen(new, new)
        if self.images is not None and self.images.loaded:
            fresh.images = ModelEncoder.of_index(new, self.index_dir)
            fresh.images.load()
        return fresh


def default_encoder(index: RetrievalIndex, index_dir: str | Path,
                    source: ModelSource | None = None) -> QueryEncoder:
    """The encoder a searcher uses unless told: the index's traced text tower when `source` is none or the very
    model the index records (its model then loads for image queries only); else the model of `source`; else the
    recorded model (an index without a traced tower)."""
    if source is not None and not records(index, source):
        return ModelEncoder(source, index)
    traced = TracedTextEncoder.load(index_dir, index)
    if traced is None:
        return ModelEncoder(source, index) if source is not None else ModelEncoder.of_index(index, index_dir)
    if source is not None:
        traced.images = ModelEncoder(source, index)
    return traced


def records(index: RetrievalIndex, source: ModelSource) -> bool:
    """Is `source` the model the index records (the same run and checkpoint, or open_clip model and weights)?"""
    recorded = dict(index.manifest.get("model_source") or {})
    recorded.pop("run_dir_from_index", None)
    return bool(recorded) and recorded == source.describe()
