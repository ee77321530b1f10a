"""Decoding one image file safely: PIL only (no torch), so that a service answering through an ONNX export uses the
very decoder that the training data and the index went through."""

from __future__ import annotations

import logging
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
