"""Tables for benchmarks other than caption retrieval: images with class labels, and groups of images with captions.

    paths, labels, skipped = load_labelled_images("data/fashion-mnist/test")          # zero-shot, linear probes
    groups = load_image_groups("data/sugar_crepe/test")                                # compositionality

Same tables as everywhere (an imagefolder split dir or a table file, image paths relative to it, read by HF
`datasets`); rows whose image file is missing are skipped and counted, as load_caption_table does.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from vclr.data.dataset import _read_table, _require_columns
from vclr.errors import DataError

logger = logging.getLogger(__name__)


def load_labelled_images(source: str | os.PathLike, label_column: str = "label",
                         image_column: str = "file_name") -> tuple[list[str], np.ndarray, dict[str, int]]:
    """(absolute image paths, int64 labels (N,), rows skipped by reason), in the table's row order."""
    table_file, table, repaired = _read_table(source)
    _require_columns(table_file, table, (image_column, label_column), "name them with `label_column`")
    paths, labels, skipped = [], [], {"missing image file": 0, "no label": 0, **repaired}
    for row in table.select_columns([image_column, label_column]):
        path = table_file.parent / str(row[image_column] or "")
        if not row[image_column] or not path.is_file():
            skipped["missing image file"] += 1
        elif row[label_column] is None:
            skipped["no label"] += 1
        else:
            paths.append(str(path.resolve()))
            labels.append(int(row[label_column]))
    skipped = {k: v for k, v in skipped.items() if v}
    for reason, count in skipped.items():
        logger.warning("%s: skipped %d rows (%s)", table_file, count, reason)
    if not paths:
        raise DataError(f"dataset {table_file} has no labelled images (skipped: {skipped or 'none'})")
    return paths, np.asarray(labels, dtype=np.int64), skipped


@dataclass
class ImageGroup:
    """One compositionality instance: images and captions where image i goes with caption i (the first
    min(#images, #captions) of each); the other captions are hard negatives (SugarCrepe: one image, its caption and
    a negative; Winoground: two images, two captions)."""

    image_paths: list[str]
    captions: list[str]


def load_image_groups(source: str | os.PathLike) -> list[ImageGroup]:
    """Rows of `file_names` (a list; or one `file_name`) and `captions` (a list) -> ImageGroups. All groups must have
    the same shape (as CLIP_benchmark's batches do); a row with a missing image is skipped and counted."""
    table_file, table, _ = _read_table(source)
    image_column = "file_names" if "file_names" in table.column_names else "file_name"
    _require_columns(table_file, table, (image_column, "captions"),
                     "give each row `file_names` (or `file_name`) and `captions`")
    groups, missing = [], 0
    for row in table.select_columns([image_column, "captions"]):
        names = row[image_column] if isinstance(row[image_column], list) else [row[image_column]]
        paths = [table_file.parent / str(name) for name in names]
        if not all(path.is_file() for path in paths):
            missing += 1
            continue
        groups.append(ImageGroup([str(p.resolve()) for p in paths], [str(c) for c in row["captions"]]))
    if missing:
        logger.warning("%s: skipped %d groups with a missing image", table_file, missing)
    shapes = {(len(g.image_paths), len(g.captions)) for g in groups}
    if not groups or len(shapes) != 1 or min(next(iter(shapes))) < 1:
        raise DataError(f"{table_file}: every row needs the same number of images and of captions (found "
                        f"{sorted(shapes) or 'no usable rows'})")
    return groups
