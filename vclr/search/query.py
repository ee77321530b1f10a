"""The one query model: what a search asks for, parsed once from the Python API, the CLI or the service.

    query = Query.of("golden retriever", Path("pool.jpg"), negatives=["fruit"], weights=[2, 1], k=10,
                     where={"folder": "2024/**", "after": "2024-06-01", "ext": ["jpg", "heic"]}, sort="date")
    parse_weighted("2:golden retriever")   # -> (2.0, "golden retriever"): the CLI's and the page's weight syntax

A query is a list of positive terms (a text, an image file or upload, an indexed image id), each with a weight, and
negative terms. Its vector is rclip's rule: the L2-normalised sum of w_i * e(positive_i) minus the sum of
e(negative_j), where e() is the unit embedding of a term; hits are ranked by cosine with it. `where` keeps the images
whose metadata match (vclr.index.metadata: folder, file type, date taken); `sort="date"` orders the hits that score
at least `min_score` by the date they were taken, newest first; `offset` pages past the first `k`.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vclr.data.images import EXT_ALIASES
from vclr.errors import VclrError
from vclr.search.limits import MAX_K, check_k, check_text_query

TermValue = str | Path | bytes | int  # a text, an image file, an upload, an indexed image id
SORTS = ("relevance", "date")
WHERE_KEYS = ("folder", "after", "before", "ext")
MAX_TERMS = 16  # terms of one query, positives and negatives together
MAX_OFFSET = 10_000
_WEIGHT = re.compile(r"^(\d+(?:\.\d+)?):(?!\d)\s*(.+)$", re.S)  # "2:dog"; "12:30 meeting" has no weight


@dataclass(frozen=True)
class Term:
    """One part of a query: a text (str), an image file (Path), an uploaded image (bytes) or an indexed image id
    (int), with its weight."""

    value: TermValue
    weight: float = 1.0

    @property
    def kind(self) -> Literal["text", "image", "upload", "id"]:
        if isinstance(self.value, bool):
            raise VclrError(f"a query term must be a text, an image path or an image id, got {self.value!r}")
        if isinstance(self.value, int):
            return "id"
        if isinstance(self.value, bytes):
            return "upload"
        return "image" if isinstance(self.value, Path) else "text"


@dataclass(frozen=True)
class Where:
    """Which images a query may return (vclr.index.metadata has the columns): `folder`, a glob of the image's folder
    relative to the indexed collection (`2024/**`: 2024 and everything under it); `after` / `before`, dates taken
    (EXIF DateTimeOriginal, else the file's modification time), `after` inclusive and `before` exclusive; `ext`, file
    types (`jpg` also takes `jpeg`)."""

    folder: str | None = None
    after: dt.datetime | None = None
    before: dt.datetime | None = None
    ext: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self == Where()

    @classmethod
    def of(cls, where: dict | Where | None) -> Where:
        if where is None:
            return cls()
        if isinstance(where, Where):
            return where
        if not isinstance(where, dict):
            raise VclrError(f"`where` must be a mapping of {', '.join(WHERE_KEYS)}, got {type(where).__name__}")
        unknown = sorted(set(where) - set(WHERE_KEYS))
        if unknown:
            raise VclrError(f"`where` has no field {unknown[0]!r}: use {', '.join(WHERE_KEYS)}")
        folder = where.get("folder")
        if folder is not None and (not isinstance(folder, str) or not folder.strip()):
            raise VclrError(f"`where` field folder must be a folder glob such as 2024/**, got {folder!r}")
        ext = where.get("ext") or ()
        ext = (ext,) if isinstance(ext, str) else tuple(ext)
        ext = tuple(e.strip().lower().lstrip(".") for part in ext for e in str(part).split(",") if e.strip())
        after, before = parse_date(where.get("after"), "after"), parse_date(where.get("before"), "before")
        if after and before and after >= before:
            raise VclrError(f"`where` selects nothing: after {after.date()} is not before {before.date()}")
        return cls(folder.strip().strip("/") if folder else None, after, before, ext)

    def bounds(self) -> dict:
        """The filter as vclr.index.metadata.select_images takes it: dates as POSIX timestamps, types as stored."""
        return {"folder": self.folder, "after": self.after.timestamp() if self.after else None,
                "before": self.before.timestamp() if self.before else None,
                "ext": tuple(EXT_ALIASES.get(e, e) for e in self.ext)}

    def to_json(self) -> dict:
        return {key: value for key, value in (("folder", self.folder),
                                              ("after", self.after.isoformat() if self.after else None),
                                              ("before", self.before.isoformat() if self.before else None),
                                              ("ext", list(self.ext) or None)) if value}


def parse_date(value, name: str) -> dt.datetime | None:
    """A date or date-time: ISO text (2024-06-01, 2024-06-01T12:00), a date or datetime. Naive times are local."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    try:
        return dt.datetime.fromisoformat(str(value).strip())
    except ValueError:
        raise VclrError(f"`where` field {name} must be a date such as 2024-06-01, got {value!r}") from None


def parse_weighted(text: str) -> tuple[float, str]:
    """'2:golden retriever' -> (2.0, 'golden retriever'); text without a leading 'NUMBER:' -> (1.0, text)."""
    match = _WEIGHT.match(text.strip())
    return (float(match.group(1)), match.group(2)) if match else (1.0, text)


@dataclass(frozen=True)
class Query:
    positives: tuple[Term, ...]
    negatives: tuple[Term, ...] = ()
    where: Where = field(default_factory=Where)
    sort: Literal["relevance", "date"] = "relevance"
    min_score: float | None = None
    k: int = 10
    offset: int = 0
    images: bool | None = None  # a lone image query: images (True) or captions (None/False, when there are any)
    distinct: bool = False  # one hit per set of near-duplicate images (vclr.search.duplicates)

    def __post_init__(self):
        if not self.positives:
            raise VclrError("the query is empty: give at least one text, image or image id to look for")
        if len(self.positives) + len(self.negatives) > MAX_TERMS:
            raise VclrError(f"the query has {len(self.positives) + len(self.negatives)} terms; the limit is "
                            f"{MAX_TERMS}")
        for term in (*self.positives, *self.negatives):
            if term.kind == "text":
                check_text_query(term.value)
            if not 0 < term.weight <= 100:
                raise VclrError(f"a term's weight must be in (0, 100], got {term.weight:g}")
        check_k(self.k)
        if self.sort not in SORTS:
            raise VclrError(f"`sort` must be one of {', '.join(SORTS)}, got {self.sort!r}")
        if not 0 <= self.offset <= MAX_OFFSET or self.offset + self.k > MAX_OFFSET + MAX_K:
            raise VclrError(f"`offset` must be from 0 to {MAX_OFFSET}, got {self.offset}")
        if self.min_score is not None and not -1 <= self.min_score <= 1:
            raise VclrError(f"`min_score` is a cosine: it must be in [-1, 1], got {self.min_score}")

    @classmethod
    def of(cls, *positives: TermValue, negatives=(), weights=None, where=None, sort: str = "relevance",
           min_score: float | None = None, k: int = 10, offset: int = 0, images: bool | None = None,
           distinct: bool = False) -> Query:
        """The Python API's call shape: positives as values (str: a text, Path: an image file, int: an image id),
        `weights` one per positive (default 1)."""
        weights = list(weights) if weights is not None else [1.0] * len(positives)
        if len(weights) != len(positives):
            raise VclrError(f"`weights` has {len(weights)} values for {len(positives)} positive terms")
        negatives = [negatives] if isinstance(negatives, (str, Path, int, bytes)) else list(negatives)
        return cls(tuple(Term(_term_value(v), float(w)) for v, w in zip(positives, weights)),
                   tuple(Term(_term_value(v)) for v in negatives), Where.of(where), sort, min_score, k, offset, images,
                   distinct)

    @property
    def single_image(self) -> bool:
        """One image (file or upload) and nothing else: answered with captions when the index has them."""
        return len(self.positives) == 1 and not self.negatives and self.positives[0].kind in ("image", "upload") \
            and self.where.empty and self.sort == "relevance" and not self.distinct

    def describe(self) -> dict:
        """The query as JSON (what an answer echoes): terms as texts, file names, ids; uploads as 'upload'."""
        def term(t: Term):
            value = {"text": t.value, "image": Path(str(t.value)).name, "upload": "upload", "id": t.value}[t.kind]
            return {"kind": t.kind, "value": value, **({"weight": t.weight} if t.weight != 1 else {})}

        return {"positives": [term(t) for t in self.positives], "negatives": [term(t) for t in self.negatives],
                "where": self.where.to_json(), "sort": self.sort, "min_score": self.min_score, "k": self.k,
                "offset": self.offset, "distinct": self.distinct}


def parse_query(*, text=(), image=(), upload: bytes | None = None, like=(), not_text=(), not_image=(),
                where: dict | None = None, sort: str = "relevance", min_score: float | None = None, k: int = 10,
                offset: int = 0, images: bool | None = None, distinct: bool = False) -> Query:
    """The query of the CLI's flags and the service's parameters, parsed one way: texts and image files may carry a
    weight ('2:golden retriever'), `like` are indexed image ids, `upload` an uploaded image's bytes; empty `where`
    values are left out."""
    positives = [Term(value, weight) for weight, value in map(parse_weighted, text)]
    positives += [Term(Path(value), weight) for weight, value in map(parse_weighted, image)]
    positives += [Term(upload)] if upload is not None else []
    positives += [Term(int(image_id)) for image_id in like]
    negatives = [Term(value) for value in not_text] + [Term(Path(value)) for value in not_image]
    where = {key: value for key, value in (where or {}).items() if value not in (None, "", [], ())}
    return Query(tuple(positives), tuple(negatives), Where.of(where), sort, min_score, k, offset, images, distinct)


def _term_value(value) -> TermValue:
    if isinstance(value, bool) or not isinstance(value, (str, Path, bytes, int)):
        raise VclrError(f"a query term must be a text (str), an image file (Path) or an image id (int), got "
                        f"{type(value).__name__}")
    return value
