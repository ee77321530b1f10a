"""Plain photo collections: any tree of images, captions optional (what people bring to search their photos).

    table = load_collection("photos/")          # a folder of images, or any prepared dataset (a captions table)
    table.image_paths, table.captions           # captions: from `name.txt` beside `name.jpg`, else none

Recursive; symbolic links are followed only when they point inside the folder (a link out of it is skipped, so an
index never exposes files the folder's owner did not put there). Unreadable files are found when decoded
(vclr.embed.embedding) and listed in the index report.
"""

from __future__ import annotations

import os
from pathlib import Path

from vclr.data.dataset import METADATA_NAMES, CaptionTable, load_caption_table
from vclr.data.images import IMAGE_SUFFIXES
from vclr.errors import DataError


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def scan_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under `folder`, in a stable (sorted) order."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    found = []
    for directory, subdirectories, names in os.walk(root, followlinks=False):
        subdirectories.sort()
        for name in sorted(names):
            path = Path(directory) / name
            if path.suffix.lower() in IMAGE_SUFFIXES and (not path.is_symlink() or _inside(path.resolve(), root)):
                found.append(path)
    return found


def sidecar_captions(image: Path) -> list[str]:
    """Captions from `name.txt` beside `name.jpg`, one per line; [] when there is none."""
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return []
    lines = sidecar.read_text(encoding="utf-8", errors="replace").splitlines()
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def is_plain_folder(source: str | os.PathLike) -> bool:
    folder = Path(source)
    return folder.is_dir() and not any((folder / name).is_file() for name in METADATA_NAMES)


def load_image_folder(folder: str | os.PathLike) -> CaptionTable:
    images = scan_images(folder)
    if not images:
        raise DataError(f"{folder} holds no images (JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF, HEIC, camera RAW) and no "
                        "captions table")
    return CaptionTable(str(Path(folder).resolve()), [str(p) for p in images], [sidecar_captions(p) for p in images])


def load_collection(source: str | os.PathLike, image_column: str = "file_name",
                    caption_columns: tuple[str, ...] = ("captions",)) -> CaptionTable:
    """What to index: a plain folder of images (captions optional), or a prepared dataset with its captions."""
    if is_plain_folder(source):
        return load_image_folder(source)
    return load_caption_table(source, image_column, caption_columns)
