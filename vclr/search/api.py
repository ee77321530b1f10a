"""The Python API of a search index: what `vclr.open_index` returns.

    import vclr
    index = vclr.open_index("photos-index")        # the model loads only when a query needs it
    hits = index.search("a dog on the beach", k=10) # list[vclr.Hit]: rank, score, id, path, caption, weak, taken
    hits = index.search(Path("query.jpg"))          # an image file; an int is an indexed image id ("more like this")
    hits = index.search("golden retriever", Path("pool.jpg"), negatives=["fruit"], weights=[2, 1])
    hits = index.search("sunset", where={"folder": "2024/**", "after": "2024-06-01", "before": "2024-09-01",
                                         "ext": ["jpg", "heic"]}, sort="date", min_score=0.2)
    vec = index.embed("a dog")                      # (D,) float32, L2-normalised; also Path(...) and image ids
    groups = index.duplicates()                     # near-duplicate groups, keeper first (calibrated threshold)
    hits = index.search("a beach", distinct=True)   # one hit per near-duplicate set

Every search goes through one query model (vclr.search.query.Query) and one path (Searcher.search): the CLI and the
service build the same Query from their flags and parameters, so the same query gets the same hits everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vclr.model.source import ModelSource
from vclr.search.duplicates import Calibration, DuplicateGroup
from vclr.search.query import Query, TermValue
from vclr.search.searcher import Hit, Searcher


class Index:
    """An index opened for searching. `searcher` is the engine underneath (the service shares it)."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher

    @property
    def path(self) -> Path | None:
        return self.searcher.index_dir

    @property
    def manifest(self) -> dict:
        """Counts, dimension, model, index kinds and their measured recall."""
        return self.searcher.index.manifest

    def __len__(self) -> int:
        """Live images."""
        return self.manifest["num_images"] - self.manifest["deleted_images"]

    def search(self, *terms: TermValue, negatives=(), weights=None, where: dict | None = None, sort: str = "relevance",
               min_score: float | None = None, k: int = 10, offset: int = 0, images: bool | None = None,
               distinct: bool = False) -> list[Hit]:
        """Images for a combined query: the L2-normalised `sum(weights[i] * e(terms[i])) - sum(e(negatives[j]))`,
        ranked by cosine. A term is a text (str), an image file (Path) or an indexed image id (int). `where` keeps
        images by `folder` (a glob such as "2024/**"), `after` / `before` (dates taken) and `ext` (file types);
        `sort="date"`: the hits scoring at least `min_score`, newest first; `offset`: skip that many hits (paging).
        A lone image file gets the captions that match it when the index has captions, unless `images=True`.
        `distinct`: one hit per set of near-duplicate images (at the threshold `duplicates` calibrated)."""
        return self.searcher.search(Query.of(*terms, negatives=negatives, weights=weights, where=where, sort=sort,
                                             min_score=min_score, k=k, offset=offset, images=images,
                                             distinct=distinct))

    def duplicates(self, threshold: float | None = None) -> list[DuplicateGroup]:
        """Groups of near-duplicate images (vclr.search.duplicates), largest first, each with its keeper first
        (most pixels, then oldest). `threshold`: a cosine; default: calibrated on this index (once; the model loads
        to embed re-encoded copies of a sample) and kept for later calls and for `search(..., distinct=True)`."""
        return self.searcher.duplicates(threshold)[0]

    def duplicate_calibration(self, recalibrate: bool = False) -> Calibration:
        """The calibrated threshold and the scores it came from (copies of sampled images, their nearest
        neighbours)."""
        return self.searcher.duplicate_calibration(recalibrate)

    def embed(self, term: TermValue) -> np.ndarray:
        """(D,) float32, L2-normalised: a text, an image file (Path) or an indexed image id, as a query sees it."""
        return self.searcher.embed_terms([Query.of(term).positives[0]])[0]  # the term checked as a query checks it


def open_index(path: str | os.PathLike, *, model: ModelSource | str | os.PathLike | None = None,
               onnx: str | os.PathLike | None = None, mmap: bool = False) -> Index:
    """Open the index at `path` for searching. Queries go through the index's own traced text tower (the model it
    records loads on the first image query), or the model of `model` (a run directory or a ModelSource), or the
    ONNX export in `onnx` (no torch)."""
    encoder = None
    if onnx is not None:
        from vclr.search.onnx import OnnxQueryEncoder

        encoder = OnnxQueryEncoder.load(onnx)
    return Index(Searcher.open(path, model, mmap=mmap, load_model=False, encoder=encoder))
