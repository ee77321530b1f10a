"""Reading one image file safely, and what a search filter asks of it: PIL only (no torch), so that a service
answering through an ONNX export uses the very decoder that the training data and the index went through.

Formats: whatever Pillow reads (JPEG, PNG, WebP, GIF, BMP, TIFF; AVIF from Pillow 11.3), and through the optional
`photos` extra (`pip install 'vclr[photos]'`) HEIC/HEIF from phones (pillow-heif) and camera RAW files (rawpy: the
embedded preview when it is large enough, else a half-size demosaic). One table, `OPTIONAL_FORMATS`, says which file
types need which package; a file that needs a missing one is skipped with one line that says what to install.
EXIF orientation is applied to every format; an animated image is read by its first frame.
"""

from __future__ import annotations

import datetime
import functools
import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)

MAX_IMAGE_PIXELS = 64_000_000  # images above this are refused before decoding (decompression bombs)
RAW_PREVIEW_MIN_SIDE = 512  # a RAW file's embedded preview stands for it when its longer side has this many pixels


@dataclass(frozen=True)
class OptionalFormat:
    package: str  # the module to import
    pip_name: str  # what to install (all are in the `photos` extra)
    suffixes: tuple[str, ...]


OPTIONAL_FORMATS: dict[str, OptionalFormat] = {
    "heif": OptionalFormat("pillow_heif", "pillow-heif", (".heic", ".heif", ".hif")),
    "raw": OptionalFormat("rawpy", "rawpy", (".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2",
                                             ".orf", ".rw2", ".raf", ".pef", ".srw", ".x3f", ".3fr", ".erf", ".kdc",
                                             ".mrw", ".rwl", ".iiq")),
}
PILLOW_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")
IMAGE_SUFFIXES = PILLOW_SUFFIXES + tuple(s for f in OPTIONAL_FORMATS.values() for s in f.suffixes)


class MissingDecoder(Exception):
    """A file type whose decoder is an optional package that is not installed."""


@functools.cache
def _optional_module(kind: str):
    """The optional decoder's module (HEIF's opener registered with Pillow once), or None when not installed."""
    try:
        module = __import__(OPTIONAL_FORMATS[kind].package)
    except ImportError:
        return None
    if kind == "heif":
        module.register_heif_opener()
    return module


def _needed_format(path: str | BinaryIO) -> str | None:
    suffix = os.path.splitext(path)[1].lower() if isinstance(path, str) else ""
    return next((kind for kind, f in OPTIONAL_FORMATS.items() if suffix in f.suffixes), None)


def require_decoder(kind: str):
    """The module that decodes this optional format, or MissingDecoder saying what to install."""
    module = _optional_module(kind)
    if module is None:
        raise MissingDecoder(f"needs {OPTIONAL_FORMATS[kind].pip_name}: pip install 'vclr[photos]'")
    return module


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
        kind = _needed_format(path)
        if kind == "raw":
            return _read_raw(path, max_pixels)
        if kind is not None:
            require_decoder(kind)  # HEIF's opener registered with Pillow
        elif not isinstance(path, str):  # an upload: HEIC opens by its content when pillow-heif is there
            _optional_module("heif")
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                logger.warning("image %s refused: %dx%d pixels is over the %d-pixel limit", path, image.width,
                               image.height, max_pixels)
                return None
            if draft_to:
                image.draft(None, (draft_to, draft_to))  # a no-op for formats other than JPEG
            return _upright_rgb(image)
    except MissingDecoder as e:
        _warn_missing(str(e), path)
        return None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        logger.warning("unreadable image %s skipped: %s", path, e)
        return None


def _upright_rgb(image: Image.Image) -> Image.Image:
    """The first frame, turned as its EXIF orientation says, in RGB (any mode: CMYK, 16-bit, palette...)."""
    if image.getexif().get(ORIENTATION, 1) != 1:  # phones store portraits sideways with this tag
        image = ImageOps.exif_transpose(image)  # a turned copy (only then: the common case keeps no copy)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit gray: scale to 8 bits, not clip
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("P", "LA", "PA") or (image.mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")  # palette transparency becomes alpha, then RGB
    if image.mode == "RGB":  # most photos: decode in place, no full-size copy
        image.load()
        return image
    return image.convert("RGB")


def _read_raw(path: str | BinaryIO, max_pixels: int) -> Image.Image | None:
    """A camera RAW file: its embedded preview when large enough (what the camera showed), else a half-size
    demosaic (a quarter of the pixels, 4x less work)."""
    rawpy = require_decoder("raw")
    with rawpy.imread(path) as raw:
        if raw.sizes.raw_width * raw.sizes.raw_height > max_pixels:
            logger.warning("image %s refused: %dx%d pixels is over the %d-pixel limit", path, raw.sizes.raw_width,
                           raw.sizes.raw_height, max_pixels)
            return None
        preview = _raw_preview(raw, max_pixels)
        if preview is not None:
            return preview
        return Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8))


def _raw_preview(raw, max_pixels: int) -> Image.Image | None:
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        with Image.open(io.BytesIO(thumb.data)) as image:
            if image.width * image.height > max_pixels or max(image.size) < RAW_PREVIEW_MIN_SIDE:
                return None
            image = _upright_rgb(image)
    else:
        image = Image.fromarray(thumb.data).convert("RGB")
        if max(image.size) < RAW_PREVIEW_MIN_SIDE:
            return None
    flip = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}
    return image.transpose(flip[raw.sizes.flip]) if raw.sizes.flip in flip else image


_warned_missing: set[str] = set()


def _warn_missing(message: str, path) -> None:
    """One line per missing package and run, naming the first file that needed it."""
    if message not in _warned_missing:
        _warned_missing.add(message)
        logger.warning("%s (and other files of its type) skipped: it %s", path, message)


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
        kind = _needed_format(path)
        if kind == "raw":  # LibRaw's sizes; rawpy does not expose the capture time
            with require_decoder("raw").imread(path) as raw:
                facts["width"], facts["height"] = raw.sizes.width, raw.sizes.height
                if raw.sizes.flip in (5, 6):  # shot in portrait
                    facts["width"], facts["height"] = raw.sizes.height, raw.sizes.width
            return facts
        if kind is not None:
            require_decoder(kind)  # HEIF's opener registered with Pillow
        with Image.open(path) as image:
            exif = image.getexif()
            facts["width"], facts["height"] = image.size
            if exif.get(ORIENTATION, 1) in (5, 6, 7, 8):  # stored sideways: the picture is as it shows upright
                facts["width"], facts["height"] = image.height, image.width
            taken = exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL)
    except Exception:  # unreadable or not an image: what the file system says is still true
        return facts
    when = _exif_time(taken)
    if when is not None:
        facts.update(taken=when, taken_from="exif")
    return facts


EXIF_IFD, DATE_TIME_ORIGINAL = 0x8769, 36867  # the EXIF sub-IFD and its DateTimeOriginal tag
ORIENTATION = 0x0112  # EXIF: how the stored pixels must be turned to show upright
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
