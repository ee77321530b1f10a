"""Reading one image file safely, and what a search filter asks of it: PIL only (no torch), so that a service
answering through an ONNX export uses the very decoder that the training data and the index went through."""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from typing import BinaryIO

from PIL import Image

logger = logging.getLogger(__name__)

warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)

MAX_IMAGE_PIXELS = 64_000_000  # images above this are refused before decoding (decompression bombs)


def read_image(path: str | BinaryIO, max_pixels: int = MAX_IMAGE_PIXELS, draft_to: int = 0) -> Image.Image | None:
    """RGB image, or None (with a warning) when the file is unreadable or has more than `max_pixels` pixels.

    The pixel count is read from the header, before decoding: a decompression bomb costs nothing. Any mode (CMYK,
    grayscale, 16-bit, palette with transparency) is converted to RGB.

    `draft_to` > 0: a JPEG is decoded at the largest DCT scale (1/2, 1/4 or 1/8: libjpeg's reduced-size decoding)
    that keeps both sides >= `draft_to` pixels, far less work than decoding every pixel of a large photo that is
    resized to a model's input anyway (data.jpeg_draft says how close to full decoding). Other formats decode at
    full size.
    """
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                logger.warning("image %s refused: %dx%d pixels is over the %d-pixel limit", path, image.width,
                               image.height, max_pixels)
                return None
            if draft_to:
                image.draft(None, (draft_to, draft_to))  # a no-op for formats other than JPEG
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit gray: scale to 8 bits, not clip
                image = image.point(lambda v: v / 256).convert("L")
            if image.mode in ("P", "LA", "PA") or (image.mode == "L" and "transparency" in image.info):
                image = image.convert("RGBA")  # palette transparency becomes alpha, then RGB
            if image.mode == "RGB":  # most photos: decode in place, no full-size copy
                image.load()
                return image
            return image.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        logger.warning("unreadable image %s skipped: %s", path, e)
        return None


def image_facts(path: str, root: str | None = None) -> dict:
    """What a filter asks of an image file, from its header and the file system, without decoding it: its folder
    (relative to `root`, the indexed collection), type, size in bytes, pixel size, and the date it was taken (EXIF
    DateTimeOriginal, else the file's modification time) as a POSIX timestamp with where it came from."""
    folder = os.path.dirname(os.path.relpath(path, root) if root else path).replace(os.sep, "/")
    facts = {"folder": "" if folder == "." else folder, "ext": _ext(path), "bytes": None, "width": None,
             "height": None, "taken": None, "taken_from": None}
    try:
        stat = os.stat(path)
    except OSError:  # gone since it was indexed: what its path says is all there is
        return facts
    facts.update(bytes=stat.st_size, taken=stat.st_mtime, taken_from="mtime")
    try:
        with Image.open(path) as image:
            facts["width"], facts["height"] = image.size
            taken = image.getexif().get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL)
    except Exception:  # unreadable or not an image: what the file system says is still true
        return facts
    when = _exif_time(taken)
    if when is not None:
        facts.update(taken=when, taken_from="exif")
    return facts


EXIF_IFD, DATE_TIME_ORIGINAL = 0x8769, 36867  # the EXIF sub-IFD and its DateTimeOriginal tag
EXT_ALIASES = {"jpeg": "jpg", "tif": "tiff", "heif": "heic"}


def _ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return EXT_ALIASES.get(ext, ext)


def _exif_time(value) -> float | None:
    """EXIF's 'YYYY:MM:DD HH:MM:SS' (local time, as cameras write it) -> a POSIX timestamp; None if malformed."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.strptime(value.strip().rstrip("\x00")[:19], "%Y:%m:%d %H:%M:%S").timestamp()
    except ValueError:
        return None
