"""Build an index from a trained run, and answer text->image and image->text queries with it.

    build_index("runs/demo", "data/shapes/test", "indexes/demo")
    hits = search_by_text("indexes/demo", "a large red circle on the left", k=5)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vclr.config import VclrError, config_hash
from vclr.data.dataset import load_caption_table
from vclr.embed import embed_image_files, embed_table, embed_texts, load_trained
from vclr.index import RetrievalIndex

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000


@dataclass
class Hit:
    rank: int
    score: float
    id: int
    value: str  # image path (text->image) or caption (image->text)


def build_index(run_dir: str | Path, data: str | None, out_dir: str | Path) -> RetrievalIndex:
    """Embed a dataset's images and captions with the run's model and save an index to `out_dir`."""
    model, cfg = load_trained(run_dir)
    source = data or cfg.data.test or cfg.data.train
    if not source:
        raise VclrError("no dataset to index: pass --data DIR")
    emb = embed_table(model, cfg, load_caption_table(source, cfg.data.image_column, cfg.data.caption_columns))
    manifest = {"run_dir": str(Path(run_dir).resolve()), "model_name": cfg.model.name,
                "model_config_hash": config_hash(cfg.model), "dataset": str(source)}
    index = RetrievalIndex.build(emb.image_embeddings, emb.text_embeddings, emb.text_to_image, emb.image_paths,
                                 emb.texts, manifest)
    index.save(out_dir)
    logger.info("indexed %d images and %d captions into %s", len(emb.image_paths), len(emb.texts), out_dir)
    return index


def _check_k(k: int) -> None:
    if k <= 0:
        raise VclrError(f"k must be a positive integer, got {k}")


def _model_for(index: RetrievalIndex, run_dir: str | Path | None):
    run_dir = Path(run_dir or index.manifest.get("run_dir", ""))
    model, cfg = load_trained(run_dir)
    if config_hash(cfg.model) != index.manifest.get("model_config_hash"):
        raise VclrError(f"the model in {run_dir} ({cfg.model.name}) is not the one this index was built with "
                        f"({index.manifest.get('model_name')}); pass the right --run or rebuild the index")
    return model, cfg


def search_by_text(index_dir: str | Path, text: str, k: int = 5, run_dir: str | Path | None = None) -> list[Hit]:
    """Images ranked for a text query."""
    text = (text or "").strip()
    if not text:
        raise VclrError("the text query is empty: pass --text 'a red circle'")
    if len(text) > MAX_QUERY_CHARS:
        raise VclrError(f"the text query has {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
    _check_k(k)
    index = RetrievalIndex.load(index_dir)
    model, cfg = _model_for(index, run_dir)
    D, I = index.search_images(embed_texts(model, cfg, [text]), k)
    return [Hit(r + 1, float(s), int(i), index.image_paths[i]) for r, (s, i) in enumerate(zip(D[0], I[0]))]


def search_by_image(index_dir: str | Path, image_path: str | Path, k: int = 5,
                    run_dir: str | Path | None = None) -> list[Hit]:
    """Captions ranked for an image query."""
    _check_k(k)
    index = RetrievalIndex.load(index_dir)
    model, _ = _model_for(index, run_dir)
    D, I = index.search_texts(embed_image_files(model, [str(image_path)]), k)
    return [Hit(r + 1, float(s), int(i), index.texts[i]) for r, (s, i) in enumerate(zip(D[0], I[0]))]
