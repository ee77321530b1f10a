"""Procedural captioned-shape scenes: the built-in demo and test dataset.

Each image holds 1-3 objects (colour, shape, size, cell of a 3x3 grid) on a tinted, noisy background; each image
gets 2-5 compositional English captions that name every object, so a caption identifies its image. Every scene is
unique across both splits, so recall@1 has one right answer. The output is a standard HF `imagefolder`:

    OUT/train/metadata.jsonl   {"file_name": "000001.png", "captions": ["...", ...]}
    OUT/train/000001.png ...
    OUT/test/...

Generate with `vclr make-synthetic --out data/shapes --train 20000 --test 1000`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vclr.storage import atomic_write_text

logger = logging.getLogger(__name__)

COLORS = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "purple": (135, 50, 185),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = {"small": 0.2, "large": 0.37}  # radius as a fraction of a grid cell's width
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
# Grid cell (row, col) -> how captions name it.
POSITIONS = {
    (0, 0): ("in the top left corner", "at the top left"),
    (0, 1): ("at the top", "at the top center"),
    (0, 2): ("in the top right corner", "at the top right"),
    (1, 0): ("on the left", "at the left"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "at the right"),
    (2, 0): ("in the bottom left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "at the bottom center"),
    (2, 2): ("in the bottom right corner", "at the bottom right"),
}
OBJECT_COUNT_WEIGHTS = (0.25, 0.4, 0.35)  # P(1 object), P(2), P(3)
SUPERSAMPLE = 3  # draw larger, then downsample: anti-aliased edges


@dataclass(frozen=True, order=True)
class SceneObject:
    cell: tuple[int, int]
    size: str
    color: str
    shape: str


Scene = tuple[SceneObject, ...]  # sorted by cell: the canonical key of a scene


def random_scene(rng: random.Random) -> Scene:
    count = rng.choices((1, 2, 3), weights=OBJECT_COUNT_WEIGHTS)[0]
    cells = rng.sample(sorted(POSITIONS), count)  # distinct cells: objects never overlap
    objects = [
        SceneObject(cell, rng.choice(sorted(SIZES)), rng.choice(sorted(COLORS)), rng.choice(SHAPES)) for cell in cells
    ]
    return tuple(sorted(objects))


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.85  # same visual weight as a circle of radius r
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        angles = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii)]
    if shape == "cross":
        t = r * 0.33
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
            (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw a scene on a mid-tone tinted background with pixel noise (so colour alone never gives the answer away)."""
    big = image_size * SUPERSAMPLE
    grey = rng.randint(100, 160)
    tint = tuple(grey + rng.randint(-22, 22) for _ in range(3))  # mildly tinted grey: every object colour stands out
    canvas = Image.new("RGB", (big, big), tint)
    draw = ImageDraw.Draw(canvas)
    cell = big / 3
    for obj in scene:
        row, col = obj.cell
        jitter = cell * 0.08
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        r = SIZES[obj.size] * cell * rng.uniform(0.92, 1.08)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill)
    small = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.LANCZOS), dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, small.shape)
    return Image.fromarray(np.clip(small + noise, 0, 255).astype(np.uint8))


def _object_phrase(obj: SceneObject, rng: random.Random) -> str:
    size = rng.choice(SIZE_WORDS[obj.size])
    where = rng.choice(POSITIONS[obj.cell])
    article = "an" if size[0] in "aeiou" else "a"
    return f"{article} {size} {obj.color} {obj.shape} {where}"


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


CAPTION_TEMPLATES = ("{}", "a picture of {}", "an image with {}", "there is {}", "a scene with {}")


def scene_captions(scene: Scene, count: int, rng: random.Random) -> list[str]:
    """`count` distinct paraphrases; each names every object (order, synonyms and template vary)."""
    captions: list[str] = []
    for _ in range(count * 10):  # a few retries for distinctness; tiny scenes have few paraphrases
        objects = list(scene)
        rng.shuffle(objects)
        caption = rng.choice(CAPTION_TEMPLATES).format(_join([_object_phrase(o, rng) for o in objects]))
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            break
    return captions


def _unique_scenes(total: int, rng: random.Random) -> Iterator[Scene]:
    seen: set[Scene] = set()
    while len(seen) < total:
        scene = random_scene(rng)
        if scene not in seen:
            seen.add(scene)
            yield scene


def make_synthetic(
    out_dir: str | os.PathLike,
    num_train: int = 20000,
    num_test: int = 1000,
    image_size: int = 64,
    seed: int = 0,
    min_captions: int = 2,
    max_captions: int = 5,
) -> Path:
    """Write the train and test splits under `out_dir`; returns it. Same seed, same bytes."""
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train} and {num_test}")
    if not 1 <= min_captions <= max_captions:
        raise ValueError(f"need 1 <= min_captions <= max_captions, got {min_captions} and {max_captions}")
    out = Path(out_dir)
    rng = random.Random(seed)
    scenes = list(_unique_scenes(num_train + num_test, rng))
    splits = {"test": scenes[:num_test], "train": scenes[num_test:]}
    for split, split_scenes in splits.items():
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, scene in enumerate(tqdm(split_scenes, desc=f"synthetic {split}", unit="img", leave=False)):
            item_rng = random.Random(f"{seed}/{split}/{i}")  # per-item stream: any item regenerates alone
            file_name = f"{i:06d}.png"
            render_scene(scene, image_size, item_rng).save(split_dir / file_name)
            captions = scene_captions(scene, item_rng.randint(min_captions, max_captions), item_rng)
            rows.append({"file_name": file_name, "captions": captions})
        # written last: its presence marks a complete split
        atomic_write_text(split_dir / "metadata.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        logger.info("wrote %d %s images to %s", len(rows), split, split_dir)
    return out


# ------------------------------------------------------------------ small scenes for benchmark tests and timings

PLACES = ("top left", "top", "top right", "left", "centre", "right", "bottom")
_PLACE_XY = ((0.25, 0.25), (0.5, 0.25), (0.75, 0.25), (0.25, 0.5), (0.5, 0.5), (0.75, 0.5), (0.5, 0.78))


def _noise(rng: np.random.Generator, low: int, spread: int) -> Image.Image:
    """A noise background of a random size (70-130 x 60-120), so every model resizes and crops it."""
    w, h = int(rng.integers(70, 130)), int(rng.integers(60, 120))
    return Image.fromarray((rng.random((h, w, 3)) * spread + low).astype(np.uint8))


def hue_scene(rng: np.random.Generator, hue: int, classes: int = 7) -> Image.Image:
    """A disc of one of `classes` neighbouring hues (jittered) on colourful noise: classes that a random tower's
    features separate only in part (a linear probe on them learns, but not perfectly)."""
    import colorsys

    image = _noise(rng, 0, 255)
    w, h = image.size
    rgb = colorsys.hsv_to_rgb((hue / classes * 0.6 + rng.normal(0, 0.03)) % 1, 0.8, 0.9)
    x, y, r = int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4)), int(min(w, h) * 0.2)
    ImageDraw.Draw(image).ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(255 * c) for c in rgb))
    return image


def position_scene(rng: np.random.Generator, position: int, colour: str, square: bool = False) -> Image.Image:
    """One shape of a named colour at one of 7 PLACES on grey noise."""
    image = _noise(rng, 120, 90)
    w, h = image.size
    fx, fy = _PLACE_XY[position]
    x, y, r = int(fx * w + rng.integers(-6, 7)), int(fy * h + rng.integers(-6, 7)), int(min(w, h) * 0.16)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if square else draw.ellipse)([x - r, y - r, x + r, y + r], fill=COLORS[colour])
    return image
