"""Build, grow and query an index of a trained run: text->image and image->text.

    build_index("runs/demo", "data/shapes/test", "indexes/demo")
    hits = search_by_text("indexes/demo", "a large red circle on the left", k=5)
    searcher = Searcher.open("indexes/demo")       # index + model loaded once (the web service)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vclr.config import Config, VclrError, config_hash
from vclr.data.dataset import load_caption_table
from vclr.embed import embed_image_files, embed_table, embed_texts, load_trained
from vclr.index import IndexOptions, RetrievalIndex
from vclr.model import DualEncoder

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000
MAX_K = 1000


@dataclass
class Hit:
    rank: int
    score: float
    id: int
    value: str  # image path (text->image) or caption (image->text)


def _embed_source(model: DualEncoder, cfg: Config, data: str | None):
    source = data or cfg.data.test or cfg.data.train
    if not source:
        raise VclrError("no dataset to index: pass --data DIR")
    table = load_caption_table(source, cfg.data.image_column, cfg.data.caption_columns)
    return source, embed_table(model, cfg, table)


def build_index(run_dir: str | Path, data: str | None, out_dir: str | Path,
                options: IndexOptions = IndexOptions()) -> RetrievalIndex:
    """Embed a dataset's images and captions with the run's model; choose, tune and save an index in `out_dir`."""
    model, cfg = load_trained(run_dir)
    source, emb = _embed_source(model, cfg, data)
    manifest = {"run_dir": str(Path(run_dir).resolve()), "model_name": cfg.model.name,
                "model_config_hash": config_hash(cfg.model), "dataset": str(source)}
    index = RetrievalIndex.build(emb.image_embeddings, emb.text_embeddings, emb.caption_image, emb.image_paths,
                                 emb.texts, manifest, options)
    index.save(out_dir)
    logger.info("indexed %d images and %d captions into %s", len(emb.image_paths), len(emb.texts), out_dir)
    return index


def add_to_index(index_dir: str | Path, data: str, run_dir: str | Path | None = None) -> tuple[int, int]:
    """Embed another dataset with the index's model and append it, without rebuilding. -> (images, captions)."""
    index = RetrievalIndex.load(index_dir)
    model, cfg = load_trained(run_dir or index.manifest.get("run_dir", ""))
    index.check_model(model.embed_dim, config_hash(cfg.model))  # before spending time on embedding
    _, emb = _embed_source(model, cfg, data)
    image_ids, text_ids = index.add(emb.image_embeddings, emb.image_paths, emb.text_embeddings, emb.texts,
                                    emb.caption_image)
    index.save(index_dir)
    return len(image_ids), len(text_ids)


def delete_from_index(index_dir: str | Path, image_ids: Sequence[int] = (), text_ids: Sequence[int] = ()) -> dict:
    index = RetrievalIndex.load(index_dir)
    index.delete(image_ids, text_ids)
    index.save(index_dir)
    return {k: index.manifest[k] for k in ("num_images", "num_texts", "deleted_images", "deleted_texts")}


def check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise VclrError(f"k must be an integer from 1 to {MAX_K}, got {k}")


def check_text_query(text: str | None) -> str:
    text = (text or "").strip()
    if not text:
        raise VclrError("the text query is empty: pass --text 'a red circle'")
    if len(text) > MAX_QUERY_CHARS:
        raise VclrError(f"the text query has {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
    return text


@dataclass
class Searcher:
    """An index and the model that embeds its queries, loaded once."""

    index: RetrievalIndex
    model: DualEncoder
    cfg: Config

    @classmethod
    def open(cls, index_dir: str | Path, run_dir: str | Path | None = None, mmap: bool = False) -> "Searcher":
        index = RetrievalIndex.load(index_dir, mmap=mmap)
        model, cfg = load_trained(Path(run_dir or index.manifest.get("run_dir", "")))
        index.check_model(model.embed_dim, config_hash(cfg.model))
        return cls(index, model, cfg)

    def by_text(self, text: str, k: int = 5) -> list[Hit]:
        """Images ranked for a text query."""
        text = check_text_query(text)
        check_k(k)
        D, I = self.index.search_images(embed_texts(self.model, self.cfg, [text]), k)
        paths = self.index.store.image_paths(I[0])
        return [Hit(r + 1, float(s), int(i), p) for r, (s, i, p) in enumerate(zip(D[0], I[0], paths))]

    def by_image_embedding(self, embedding, k: int) -> list[Hit]:
        """Captions ranked for an image embedding (1, d); `k` already checked by the caller."""
        D, I = self.index.search_texts(embedding, k)
        texts = self.index.store.texts(I[0])
        return [Hit(r + 1, float(s), int(i), t) for r, (s, i, t) in enumerate(zip(D[0], I[0], texts))]

    def by_image_file(self, image_path: str | Path, k: int = 5) -> list[Hit]:
        """Captions ranked for an image query."""
        check_k(k)
        return self.by_image_embedding(embed_image_files(self.model, [str(image_path)]), k)


def search_by_text(index_dir: str | Path, text: str, k: int = 5, run_dir: str | Path | None = None) -> list[Hit]:
    text = check_text_query(text)
    check_k(k)
    return Searcher.open(index_dir, run_dir).by_text(text, k)


def search_by_image(index_dir: str | Path, image_path: str | Path, k: int = 5,
                    run_dir: str | Path | None = None) -> list[Hit]:
    check_k(k)
    return Searcher.open(index_dir, run_dir).by_image_file(image_path, k)
