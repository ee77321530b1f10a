"""Decode and resize whole batches of encoded images on the training device (`data.decode_on=device`).

On CUDA, JPEGs are decoded in one batched nvJPEG call (`torchvision.io.decode_jpeg(device="cuda")`), so the data
loader only reads bytes and a GPU is not starved by PIL. Images that nvJPEG cannot take (PNG, CMYK...) fall back to
torchvision's CPU decoder one by one; unreadable ones are dropped and reported. Geometry matches the loader path
(`decode_transform`): short side to S with antialiasing, then a centre crop, or a random resized crop when augmenting.
Images of the same size are resized in one call.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from vclr.data.augment import random_crop

logger = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_image(data, mode=ImageReadMode.RGB).to(device)  # (3, H, W) uint8
    except Exception as e:  # torchvision raises RuntimeError for broken or unknown formats
        logger.warning("unreadable image bytes skipped: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def decode_batch(encoded: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Encoded images -> list of (3, H, W) uint8 on `device`; None where a file cannot be decoded."""
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else None for b in encoded]
    decoded: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, (b, t) in enumerate(zip(encoded, tensors)) if t is not None and b[:3] == JPEG_MAGIC]
    if jpegs:
        try:  # one batched call; nvJPEG on CUDA
            for i, image in zip(jpegs, decode_jpeg([tensors[i] for i in jpegs], mode=ImageReadMode.RGB,
                                                   device=device)):
                decoded[i] = image.to(device)
        except RuntimeError:  # one bad JPEG fails the whole batch: decode the batch one by one instead
            jpegs = []
    for i, data in enumerate(tensors):
        if decoded[i] is None and data is not None:
            decoded[i] = _decode_one(data, device)
    return decoded


def resize_center_crop(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Same-geometry images are resized together. -> (B, 3, S, S) uint8, in input order."""
    out = [None] * len(images)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[tuple(image.shape)].append(i)
    for indices in groups.values():
        batch = torch.stack([images[i] for i in indices])  # (G, 3, H, W)
        batch = TF.center_crop(TF.resize(batch, size, antialias=True), [size, size])  # (G, 3, S, S)
        for i, image in zip(indices, batch):
            out[i] = image
    return torch.stack(out)


def random_resized_crop(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """As the loader path's augmentation (scale 0.8-1, near-square); crop boxes drawn from torch's CPU RNG."""
    crop = random_crop(size)
    out = []
    for image in images:
        params = crop.make_params([image])
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        out.append(TF.resized_crop(image, top, left, height, width, [size, size], antialias=True))
    return torch.stack(out)  # (B, 3, S, S)


def decode_resize(encoded: list[bytes], size: int, device: torch.device, augment: bool = False):
    """(images (B', 3, S, S) uint8 on `device`, kept: bool (B,)) — B' = kept.sum() readable images, in order."""
    decoded = decode_batch(encoded, device)
    kept = torch.tensor([image is not None for image in decoded], dtype=torch.bool)
    images = [image for image in decoded if image is not None]
    if not images:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8, device=device), kept
    geometry = random_resized_crop if augment else resize_center_crop
    return geometry(images, size), kept
