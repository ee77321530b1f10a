"""Helpers the tests share (fixtures are in conftest.py): a free port, a short training's overrides, a training that
dies after a checkpoint, an untrained model's index, photo-like image folders and webdataset shards.

    from helpers import REPO_ROOT, free_port, train_overrides, untrained_index, photo_folder, write_shards
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent  # for scripts/ and the sources; configs come from the package
TINY_MODEL = "vclr-tiny-rn"  # an open_clip config (vclr's own, registered with open_clip): fast on a CPU


@contextlib.contextmanager
def served(app):
    """The ASGI app served by uvicorn on a free local port in a thread, until the block ends. -> its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StopAfterCheckpoint(Exception):
    """A training 'killed' right after writing a checkpoint (see die_after_checkpoint)."""


def die_after_checkpoint(monkeypatch, step: int):
    """Make the trainer raise StopAfterCheckpoint right after it writes checkpoint `step`. -> the real save."""
    import vclr.train.loop as train_mod

    real_save = train_mod.save_checkpoint

    def save_then_die(trainer):
        path = real_save(trainer)
        if trainer.state.step == step:
            raise StopAfterCheckpoint
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    return real_save


def train_overrides(data, run, **extra):
    values = {"data.train": data / "train", "data.test": data / "test", "train.output_dir": run,
              "optim.max_steps": 150, "optim.warmup_steps": 10, "data.batch_size": 64,
              "loss.triplet_warmup_steps": 50, "train.checkpoint_every": 75, "train.max_minutes": 0}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def untrained_run(run: Path, seed: int = 0, overrides: tuple[str, ...] = ()) -> Path:
    """An untrained tiny model (the default config: vclr-tiny-rn at 64 px) saved as a vclr run."""
    import torch

    from vclr.config import load_config
    from vclr.model.build import build_model
    from vclr.rundir import save_model_as_run

    cfg = load_config(None, [f"train.output_dir={run}", *overrides])
    torch.manual_seed(seed)
    save_model_as_run(run, cfg, build_model(cfg.model))
    return run


def untrained_index(data: Path, run: Path) -> Path:
    """An index of `data` embedded by an untrained tiny model saved as a run (for tests of the service and the query
    path, not of the model): RUN and RUN_index beside it."""
    from vclr.index.build import build_index

    untrained_run(run)
    index_dir = run.parent / f"{run.name}_index"
    build_index(run, str(data), index_dir)
    return index_dir


def draw_photo(path: Path, seed: int) -> None:
    """A photo-like image of another size than the model's (so resizing and cropping are exercised)."""
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(70, 140)), int(rng.integers(70, 140))
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        draw.ellipse([x, y, x + int(rng.integers(10, 40)), y + int(rng.integers(10, 40))],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)


def photo_folder(root: Path, count: int = 57, start: int = 0) -> list[Path]:
    """`count` images in nested folders (jpg, png, webp, bmp), none with a caption."""
    folders = ["", "trip", "trip/day2", "pets"]
    suffixes = [".jpg", ".png", ".webp", ".bmp"]
    paths = []
    for i in range(start, start + count):
        path = root / folders[i % 4] / f"img{i:03d}{suffixes[i % 4]}"
        draw_photo(path, i)
        paths.append(path)
    return paths


def write_shards(split_dir: Path, out: Path, n_shards: int, sizes=None) -> Path:
    """An imagefolder split -> webdataset .tar shards (key.png + key.json with the captions)."""
    from vclr.data.dataset import load_caption_table

    table = load_caption_table(split_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(zip(table.image_paths, table.captions))
    sizes = sizes or [len(rows) // n_shards + (i < len(rows) % n_shards) for i in range(n_shards)]
    start = 0
    for shard, size in enumerate(sizes):
        with tarfile.open(out / f"shard-{shard:04d}.tar", "w") as tar:
            for i, (path, captions) in enumerate(rows[start:start + size], start):
                for name, data in ((f"{i:06d}.png", Path(path).read_bytes()),
                                   (f"{i:06d}.json", json.dumps({"captions": captions}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        start += size
    return out


# ------------------------------------------------------------------------ datasets in CLIP_benchmark's own layout

POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom")
SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 215, 40),
                 "purple": (140, 40, 170)}


def position_scene(rng: np.random.Generator, position: int, colour: str, square: bool = False) -> Image.Image:
    """A noisy image of one shape at one of 7 positions, of a random size: classes a random tower tells apart only
    in part."""
    w, h = int(rng.integers(70, 130)), int(rng.integers(60, 120))
    image = Image.fromarray((rng.random((h, w, 3)) * 90 + 120).astype(np.uint8))
    fx, fy = [(0.25, 0.25), (0.5, 0.25), (0.75, 0.25), (0.25, 0.5), (0.5, 0.5), (0.75, 0.5), (0.5, 0.78)][position]
    x, y, r = int(fx * w + rng.integers(-6, 7)), int(fy * h + rng.integers(-6, 7)), int(min(w, h) * 0.16)
    (ImageDraw.Draw(image).rectangle if square else ImageDraw.Draw(image).ellipse)([x - r, y - r, x + r, y + r],
                                                                                   fill=SHAPE_COLOURS[colour])
    return image


class _Items(list):
    """(image, target) items with the attributes CLIP_benchmark's converter reads (classes, templates)."""

    classes: list[str] = []
    templates: list[str] = []


def hue_scene(rng: np.random.Generator, hue: int) -> Image.Image:
    """A small disc of one of 7 neighbouring hues (jittered) on colourful noise: classes a random tower's features
    separate only in part."""
    import colorsys

    w, h = int(rng.integers(70, 130)), int(rng.integers(60, 120))
    image = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
    rgb = colorsys.hsv_to_rgb((hue / 7 * 0.6 + rng.normal(0, 0.03)) % 1, 0.8, 0.9)
    x, y, r = int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4)), int(min(w, h) * 0.2)
    ImageDraw.Draw(image).ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(255 * c) for c in rgb))
    return image


def clip_benchmark_classification(out: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """A zero-shot / linear-probe set written by CLIP_benchmark's own converter (its webdataset layout): 7 classes
    by the disc's hue, class names and templates included."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    rng = np.random.default_rng(seed)
    for split, count in sizes.items():
        items = _Items((hue_scene(rng, i % 7), i % 7) for i in range(count))
        items.classes = ["red disc", "orange disc", "yellow disc", "lime disc", "green disc", "teal disc", "cyan disc"]
        items.templates = ["a photo of a {c}.", "a picture with a {c}.", "{c}"]
        with contextlib.redirect_stdout(io.StringIO()):
            convert_dataset(items, split, str(out), transform=PIL_to_bytes("png"), image_format="png", verbose=False)
    return out


def clip_benchmark_retrieval(out: Path, count: int, seed: int = 1) -> Path:
    """A retrieval set of `count` JPEGs with 5 captions each, by CLIP_benchmark's own converter."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_retrieval_dataset

    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        colour, shape, where = list(SHAPE_COLOURS)[i % 5], ("circle", "square")[(i // 5) % 2], POSITIONS[i % 7]
        # every caption unique: equal captions tie exactly, and CLIP_benchmark's torch.topk orders ties its own way
        items.append((position_scene(rng, i % 7, colour, shape == "square"),
                      [f"a {colour} {shape} ({i})", f"shape {i}: a {shape} at the {where}", f"{colour} {shape} {i}",
                       f"picture {i} of a {colour} {shape}", f"the {shape} in {colour}, {where}, {i}"]))
    with contextlib.redirect_stdout(io.StringIO()):
        convert_retrieval_dataset(items, "test", str(out), transform=PIL_to_bytes("jpg"), image_format="jpg",
                                  verbose=False)
    return out


def random_open_clip_checkpoint(path: Path, name: str = "ViT-B-32", seed: int = 0) -> Path:
    """A random-init open_clip model's state dict, saved as a checkpoint file (what users pass as `pretrained`)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    torch.save(open_clip.create_model(name).state_dict(), path)
    return path
