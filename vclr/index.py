"""FAISS retrieval index over both modalities, saved as a directory. numpy + faiss only.

    idx = RetrievalIndex.build(image_embeddings, text_embeddings, text_to_image, image_paths, texts, manifest)
    idx.save("indexes/demo")
    D, I = RetrievalIndex.load("indexes/demo").search_images(xq, k=5)   # text queries -> images

Directory: images.faiss, texts.faiss (exact inner product: cosine on unit vectors), image_embeddings.npy,
text_embeddings.npy, metadata.json (image paths, captions, caption -> image), manifest.json (dimension, counts,
model run and config hash). A save writes a temp directory and renames it into place, so a crash leaves the previous
index whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from vclr.config import VclrError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class IndexDirError(VclrError):
    """A missing, foreign or inconsistent index directory, or a query that does not fit the index."""


def _as_queries(xq: np.ndarray, d: int) -> np.ndarray:
    xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
    if xq.shape[1] != d:
        raise IndexDirError(f"query dimension {xq.shape[1]} does not match the index dimension {d}")
    return xq


def exact_index(xb: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(xb.shape[1])  # inner product = cosine for L2-normalised vectors
    index.add(np.ascontiguousarray(xb, dtype=np.float32))
    return index


@dataclass
class RetrievalIndex:
    image_embeddings: np.ndarray  # (N, d) float32
    text_embeddings: np.ndarray  # (C, d) float32
    text_to_image: np.ndarray  # (C,) int64
    image_paths: list[str]
    texts: list[str]
    manifest: dict = field(default_factory=dict)
    image_index: faiss.Index | None = None
    text_index: faiss.Index | None = None

    @classmethod
    def build(cls, image_embeddings, text_embeddings, text_to_image, image_paths, texts,
              manifest: dict | None = None) -> "RetrievalIndex":
        image_embeddings = np.ascontiguousarray(image_embeddings, dtype=np.float32)
        text_embeddings = np.ascontiguousarray(text_embeddings, dtype=np.float32)
        if image_embeddings.shape[1] != text_embeddings.shape[1]:
            raise IndexDirError(f"image and text embeddings differ in dimension: {image_embeddings.shape[1]} vs "
                                f"{text_embeddings.shape[1]}")
        if len(image_paths) != len(image_embeddings) or len(texts) != len(text_embeddings):
            raise IndexDirError("metadata and embeddings differ in length")
        manifest = dict(manifest or {})
        manifest.update(format_version=FORMAT_VERSION, dim=int(image_embeddings.shape[1]),
                        num_images=len(image_embeddings), num_texts=len(text_embeddings), index_type="IndexFlatIP")
        return cls(image_embeddings, text_embeddings, np.asarray(text_to_image, dtype=np.int64), list(image_paths),
                   list(texts), manifest, exact_index(image_embeddings), exact_index(text_embeddings))

    @property
    def d(self) -> int:
        return self.image_embeddings.shape[1]

    def search_images(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Queries (nq, d) against the images: D, I of shape (nq, min(k, N))."""
        return self.image_index.search(_as_queries(xq, self.d), min(k, self.image_index.ntotal))

    def search_texts(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Queries (nq, d) against the captions: D, I of shape (nq, min(k, C))."""
        return self.text_index.search(_as_queries(xq, self.d), min(k, self.text_index.ntotal))

    # ---------------------------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write to a sibling temp dir, then swap it in: readers see the old index or the new one, never half."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            faiss.write_index(self.image_index, str(tmp / "images.faiss"))
            faiss.write_index(self.text_index, str(tmp / "texts.faiss"))
            np.save(tmp / "image_embeddings.npy", self.image_embeddings)
            np.save(tmp / "text_embeddings.npy", self.text_embeddings)
            metadata = {"image_paths": self.image_paths, "texts": self.texts,
                        "text_to_image": self.text_to_image.tolist()}
            (tmp / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2), encoding="utf-8")  # last: marks whole
            _swap_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RetrievalIndex":
        path = Path(path)
        if not path.is_dir():
            raise IndexDirError(f"index dir {path} does not exist; build one with `vclr index`")
        if not (path / MANIFEST).is_file():
            raise IndexDirError(f"{path} is not a vclr index (no {MANIFEST})")
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IndexDirError(f"{path}: index format {manifest.get('format_version')} is not supported "
                                f"(this vclr reads {FORMAT_VERSION}); rebuild it with `vclr index`")
        metadata = json.loads((path / "metadata.json").read_text(encoding="utf-8"))
        index = cls(np.load(path / "image_embeddings.npy"), np.load(path / "text_embeddings.npy"),
                    np.asarray(metadata["text_to_image"], dtype=np.int64), metadata["image_paths"],
                    metadata["texts"], manifest,
                    faiss.read_index(str(path / "images.faiss")), faiss.read_index(str(path / "texts.faiss")))
        if index.image_index.ntotal != manifest["num_images"] or index.text_index.ntotal != manifest["num_texts"]:
            raise IndexDirError(f"{path}: index files disagree with the manifest's counts; rebuild it")
        return index


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.replace(path, old / "index")  # two renames: the old index survives until the new one is in place
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
