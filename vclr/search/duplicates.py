"""Near-duplicate images of an index: the same picture saved again resized, re-encoded, cropped or turned.

    groups = find_duplicates(index, threshold=0.97)        # list[DuplicateGroup], largest groups first
    calibration = calibrate_threshold(index, embed)        # the threshold this index and model call "the same"
    hits = collapse_duplicates(hits, vectors, threshold)   # one hit per near-duplicate group (search results)

Pairs come from a FAISS range search of every live image against the image index (the index's own kind: exact,
IVF or HNSW, so a million images take minutes, not an N^2 scan), with the deleted images excluded inside FAISS;
groups are the connected components of those pairs (scipy). Each group's keeper is the copy people keep: the most
pixels, then the oldest (date taken), then the first indexed.

Calibration (when no threshold is given): on a seeded sample of the collection's own images, each image is changed
the ways a copy differs (half size, JPEG quality 60, 5% cropped from each side) and re-embedded; its score against
its indexed vector is what a duplicate scores. Its nearest other image in the index is what a distinct neighbour
scores. The threshold is halfway between the 5th percentile of the copies' scores and the median nearest-neighbour
score (strict: loose thresholds are what users of photo tools complain of), never below that median; when the
copies score no higher than the neighbours the model cannot tell them apart, and the calibration says so.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from vclr.errors import VclrError
from vclr.index.format import RetrievalIndex

logger = logging.getLogger(__name__)

CALIBRATION_SAMPLE = 64  # images re-encoded to calibrate: ~3 variants each
DEFAULT_THRESHOLD = 0.97  # search-time collapsing before an index is calibrated


@dataclass(frozen=True)
class Member:
    id: int
    path: str
    score: float  # cosine to the group's keeper (1.0 for the keeper)
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    taken: float | None = None  # POSIX timestamp (EXIF date taken, else mtime)


@dataclass(frozen=True)
class DuplicateGroup:
    members: tuple[Member, ...]  # the keeper first, then by score to it

    @property
    def keeper(self) -> Member:
        return self.members[0]

    def to_json(self) -> dict:
        return {"keeper": self.keeper.path, "members": [asdict(m) for m in self.members]}


@dataclass(frozen=True)
class Calibration:
    threshold: float
    copies: dict  # figures of the copies' scores against their originals
    neighbours: dict  # figures of each sampled image's nearest other image
    separable: bool  # do copies score above distinct neighbours at all?

    def to_json(self) -> dict:
        return asdict(self)


def near_pairs(index: RetrievalIndex, threshold: float, chunk: int = 16384,
               progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of live images (i < j) scoring >= `threshold`: (i, j, score) arrays, via FAISS range search."""
    live = index.live_ids()
    rows, cols, scores = [], [], []
    for start in range(0, len(live), chunk):
        ids = live[start:start + chunk]
        lims, D, I = index.range_search_images(np.asarray(index.image_embeddings[ids], np.float32), threshold)
        owner = np.repeat(ids, np.diff(lims).astype(np.int64))  # (pairs,) the query id of each result
        keep = I > owner  # each pair once, and not an image with itself
        rows.append(owner[keep])
        cols.append(I[keep])
        scores.append(D[keep])
        if progress:
            progress(len(ids))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(scores)


def find_duplicates(index: RetrievalIndex, threshold: float, chunk: int = 16384,
                    progress: Callable[[int], None] | None = None) -> list[DuplicateGroup]:
    """Groups of near-identical live images (connected components of the pairs scoring >= `threshold`), largest
    first; each with its keeper first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not -1 <= threshold <= 1:
        raise VclrError(f"`threshold` is a cosine: it must be in [-1, 1], got {threshold}")
    i, j, _ = near_pairs(index, threshold, chunk, progress)
    if not len(i):
        return []
    n = index.image_index.ntotal
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    paired = np.unique(np.concatenate([i, j]))
    groups: dict[int, list[int]] = {}
    for image_id, label in zip(paired.tolist(), labels[paired].tolist()):
        groups.setdefault(label, []).append(image_id)
    found = [_group(index, ids) for ids in groups.values()]
    return sorted(found, key=lambda g: (-len(g.members), g.keeper.id))


def _group(index: RetrievalIndex, ids: list[int]) -> DuplicateGroup:
    facts = index.store.facts(ids)
    paths = index.store.image_paths(ids)

    def keeps(k: int):  # most pixels, then oldest, then first indexed
        f = facts[k]
        return (-(f["width"] or 0) * (f["height"] or 0), f["taken"] if f["taken"] is not None else float("inf"),
                ids[k])

    order = sorted(range(len(ids)), key=keeps)
    vectors = np.asarray(index.image_embeddings[[ids[k] for k in order]], np.float32)  # (m, D)
    scores = vectors @ vectors[0]  # (m,) to the keeper
    members = [Member(ids[k], paths[k], float(s), facts[k]["bytes"], facts[k]["width"], facts[k]["height"],
                      facts[k]["taken"]) for k, s in zip(order, scores)]
    return DuplicateGroup((members[0], *sorted(members[1:], key=lambda m: -m.score)))


# ------------------------------------------------------------------------------------------------ calibration


def copy_variants(image: Image.Image) -> list[Image.Image]:
    """How a saved-again copy differs: half size, JPEG quality 60, 5% cropped from each side."""
    w, h = image.size
    half = image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=60)
    buffer.seek(0)
    reencoded = Image.open(buffer).convert("RGB")
    dx, dy = round(w * 0.05), round(h * 0.05)
    cropped = image.crop((dx, dy, w - dx, h - dy))
    return [half, reencoded, cropped]


def calibrate_threshold(index: RetrievalIndex, embed_images: Callable[[Sequence[Image.Image]], np.ndarray],
                        sample: int = CALIBRATION_SAMPLE, seed: int = 0) -> Calibration:
    """The threshold this index's model calls "the same picture" (the rule is the module's docstring).
    `embed_images`: PIL images -> (N, D) unit vectors, as the index's images were embedded."""
    from vclr.data.images import read_image

    live = index.live_ids()
    if len(live) < 2:
        raise VclrError("the index holds fewer than 2 images: there is nothing to compare")
    ids = np.sort(np.random.default_rng(seed).choice(live, min(sample, len(live)), replace=False))
    copies, originals = [], []
    for image_id, path in zip(ids.tolist(), index.store.image_paths(ids)):
        image = read_image(path)
        if image is not None:
            variants = copy_variants(image)
            copies += variants
            originals += [image_id] * len(variants)
    if not copies:
        raise VclrError("none of the sampled images could be read to calibrate: give `threshold`")
    copy_scores = (embed_images(copies) * np.asarray(index.image_embeddings[originals], np.float32)).sum(1)
    D, _ = index.search_images(np.asarray(index.image_embeddings[ids], np.float32), 2)
    neighbour_scores = D[:, 1]  # (S,) the nearest other image (the first is the image itself)
    low_copy, typical_neighbour = float(np.quantile(copy_scores, 0.05)), float(np.median(neighbour_scores))
    separable = low_copy > typical_neighbour
    threshold = (low_copy + typical_neighbour) / 2 if separable else max(low_copy, typical_neighbour)
    if not separable:
        logger.warning("this model scores re-encoded copies (5th percentile %.4f) no higher than distinct neighbours "
                       "(median %.4f): near-duplicates cannot be told apart reliably", low_copy, typical_neighbour)
    return Calibration(round(min(threshold, 1.0), 6), _figures(copy_scores), _figures(neighbour_scores), separable)


def _figures(scores: np.ndarray) -> dict:
    return {"n": int(len(scores)), "min": round(float(scores.min()), 6),
            "p05": round(float(np.quantile(scores, 0.05)), 6), "median": round(float(np.median(scores)), 6),
            "p95": round(float(np.quantile(scores, 0.95)), 6), "max": round(float(scores.max()), 6)}


def calibration_file(index: RetrievalIndex):
    """Where an index's calibration is kept: the cache, by the index's save (a re-indexed index calibrates anew)."""
    from vclr.data.cache import cache_dir

    return cache_dir() / "duplicates" / f"{index.version}.json"


def stored_calibration(index: RetrievalIndex) -> Calibration | None:
    import json

    file = calibration_file(index)
    try:
        return Calibration(**json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def store_calibration(index: RetrievalIndex, calibration: Calibration) -> None:
    import json

    from vclr.storage import atomic_write_text

    file = calibration_file(index)
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, json.dumps(calibration.to_json()))


# ------------------------------------------------------------------------------------------ search results


def collapse_duplicates(hits: list, vectors: np.ndarray, threshold: float) -> list:
    """Keep the best-ranked hit of each near-duplicate set: a hit scoring >= `threshold` against a hit kept before
    it is dropped (clip-retrieval's result deduplication). `vectors`: (len(hits), D), the hits' image vectors."""
    kept: list[int] = []
    for row in range(len(hits)):
        if not kept or float((vectors[kept] @ vectors[row]).max()) < threshold:
            kept.append(row)
    return [hits[row] for row in kept]


def write_review_page(path, groups: Sequence[DuplicateGroup], threshold: float, max_groups: int = 500) -> None:
    """A self-contained HTML page (thumbnails inline) to review the groups, the suggested keeper first."""
    import base64
    import html

    from vclr.data.images import read_image
    from vclr.storage import atomic_write_text

    def thumbnail(file: str) -> str:
        image = read_image(file)
        if image is None:
            return "<div class=missing>unreadable</div>"
        image.thumbnail((200, 200))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        return f"<img src='data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}' alt=''>"

    parts = [f"<!doctype html><meta charset=utf-8><title>Near-duplicates</title><style>body{{font-family:sans-serif}}"
             f"figure{{display:inline-block;margin:6px;width:210px;vertical-align:top;font-size:12px;"
             f"word-break:break-all}}.keep{{outline:3px solid #2a2}}</style>"
             f"<h1>{len(groups)} groups of near-duplicates</h1><p>threshold {threshold:.4f}; the suggested keeper "
             f"(most pixels, then oldest) is outlined.</p>"]
    for number, group in enumerate(groups[:max_groups], 1):
        parts.append(f"<section><h2>group {number}</h2>")
        for member in group.members:
            keep = " class=keep" if member is group.keeper else ""
            size = f"{member.width}x{member.height}" if member.width else "?"
            parts.append(f"<figure{keep}>{thumbnail(member.path)}<figcaption>{html.escape(member.path)}<br>{size}, "
                         f"{(member.bytes or 0) / 1e6:.2f} MB, score {member.score:.4f}</figcaption></figure>")
        parts.append("</section>")
    if len(groups) > max_groups:
        parts.append(f"<p>{len(groups) - max_groups} more groups: see `vclr duplicates --json`.</p>")
    atomic_write_text(path, "".join(parts))
