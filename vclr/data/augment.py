"""Training augmentation (data.augment and its settings), and the seeded views a locked tower's cache holds.

    transform = augmentation(224, "bicubic", cfg.data)      # PIL -> PIL: random resized crop, colour, grey, blur
    view = view_of(seed, epoch, row, views=4)               # which cached view an item takes this epoch
    with seeded(view_seed(seed, row, view)): image = transform(pil)   # that view's pixels, the same every time

Captions describe whole scenes and say "left" and "right": the crop is mild by default (80-100% of the area,
near-square) and nothing flips. Colour jitter (brightness, contrast, saturation: never the hue, which captions name),
greyscale and blur are off unless set (data.augment_color_jitter, data.augment_grayscale, data.augment_blur).

With train.cache_views=K a locked image tower sees K views of each image: view k of row i is the augmentation drawn
under the seed `view_seed(seed, i, k)`, so the cache (computed once) and the uncached path (a tower run every step)
give the same pixels for the same (row, view) (tests/test_train_locked_cache.py). Each epoch an item takes view
`view_of(seed, epoch, i)`: a function of the seed, as the caption choice is, so a resumed run sees the same views.
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch
from torchvision.transforms import v2 as T

from vclr.config import DataConfig


def random_crop(image_size: int, interpolation: str = "bicubic",
                min_scale: float = DataConfig.augment_scale) -> T.RandomResizedCrop:
    """The augmentation's crop, for the PIL and the device-decode paths alike: mild and near-square, because captions
    describe the whole scene and its layout."""
    return T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), ratio=(0.9, 1.1),
                               interpolation=T.InterpolationMode(interpolation), antialias=True)


def augmentation(image_size: int, interpolation: str = "bicubic", settings: DataConfig | None = None) -> T.Compose:
    """PIL -> PIL: the random resized crop, then the photometric changes `settings` (DataConfig's defaults when
    None) turns on."""
    settings = settings if settings is not None else DataConfig()
    steps = [random_crop(image_size, interpolation, settings.augment_scale)]
    jitter = settings.augment_color_jitter
    if jitter:  # no hue jitter: captions name colours ("a red heart")
        steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    if settings.augment_grayscale:
        steps.append(T.RandomGrayscale(p=settings.augment_grayscale))
    if settings.augment_blur:
        steps.append(T.RandomApply([T.GaussianBlur(kernel_size=max(3, image_size // 20 * 2 + 1), sigma=(0.1, 2.0))],
                                   p=settings.augment_blur))
    return T.Compose(steps)


def augmentation_key(settings) -> dict:
    """What the augmentation depends on, for cache keys."""
    return {name: getattr(settings, name, None) for name in ("augment", "augment_scale", "augment_color_jitter",
                                                            "augment_grayscale", "augment_blur")}


def view_seed(seed: int, row: int, view: int) -> int:
    """The torch seed view `view` of image row `row` is drawn under."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{row}/{view}".encode(), digest_size=8).digest(), "little") >> 1


def view_of(seed: int, epoch: int, row: int, views: int) -> int:
    """The cached view an item takes in `epoch`."""
    return int(np.random.default_rng((seed, epoch, row, 1)).integers(views))


@contextlib.contextmanager
def seeded(seed: int):
    """torch's CPU generator seeded for the block and restored after it (torchvision's transforms draw from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
