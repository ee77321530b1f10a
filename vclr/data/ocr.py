"""Text inside images (OCR): screenshots, scans, signs and receipts are found by the words on them.

    text = read_text("invoice.jpg")          # the words Tesseract reads ("" when none; None when it failed)
    texts = read_texts(paths)                # several at a time (each call is a tesseract process)

The engine is Tesseract (Debian/Ubuntu `tesseract-ocr`, through `pytesseract`): packaged by every Linux
distribution and Homebrew, CPU-only, 100+ languages, and no model download at run time (the alternative, an ONNX OCR
from PyPI such as RapidOCR, fetches or bundles detection and recognition models and adds onnxruntime to indexing).
Images are read by vclr's decoder (every format the index reads, upright), converted to gray and enlarged when
small, since Tesseract reads text 20-40 px high best. A failure on one image is logged and skipped, never raised.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from vclr.errors import VclrError

logger = logging.getLogger(__name__)

MIN_SIDE = 1000  # smaller images are enlarged to this (shorter side) before OCR
MAX_SIDE = 4000  # larger ones are reduced: OCR time grows with pixels
OCR_LANGUAGES = os.environ.get("VCLR_OCR_LANG", "eng")  # Tesseract language packs, e.g. "eng+deu"


def check_ocr() -> None:
    """A clear error when the OCR engine is missing."""
    try:
        import pytesseract
    except ImportError:
        raise VclrError("OCR needs pytesseract: pip install 'vclr[ocr]' (and Tesseract: apt install "
                        "tesseract-ocr)") from None
    try:
        pytesseract.get_tesseract_version()
    except (pytesseract.TesseractNotFoundError, OSError):
        raise VclrError("OCR needs the Tesseract program: apt install tesseract-ocr (brew install tesseract on "
                        "macOS)") from None


def read_text(path: str) -> str | None:
    """The words in an image, whitespace-normalised ("" when there are none), or None when OCR failed."""
    import pytesseract
    from PIL import Image

    from vclr.data.images import read_image

    try:
        image = read_image(path)
        if image is None:
            return None
        gray = image.convert("L")
        scale = max(1.0, MIN_SIDE / min(gray.size))
        scale = min(scale, MAX_SIDE / max(gray.size))
        if scale != 1.0:
            gray = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))),
                               Image.Resampling.BICUBIC)
        return " ".join(pytesseract.image_to_string(gray, lang=OCR_LANGUAGES, timeout=60).split())
    except Exception as e:  # a crash, a timeout, a broken file: this image has no text, the index goes on
        logger.warning("OCR failed on %s: %s", path, e)
        return None


def read_texts(paths: Iterable[str], threads: int | None = None, progress=None) -> list[str | None]:
    """read_text of each path, several Tesseract processes at a time (one per core by default)."""
    paths = list(paths)
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        texts = []
        for text in pool.map(read_text, paths):
            texts.append(text)
            if progress:
                progress(1)
        return texts
