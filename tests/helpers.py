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


def _reference_module():
    """scripts/clip_benchmark_reference.py: CLIP_benchmark as the reference, and the data it is compared on (the
    benchmark script uses them too)."""
    import importlib.util
    import sys

    if "clip_benchmark_reference" not in sys.modules:
        spec = importlib.util.spec_from_file_location("clip_benchmark_reference",
                                                      REPO_ROOT / "scripts" / "clip_benchmark_reference.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["clip_benchmark_reference"] = module
    return sys.modules["clip_benchmark_reference"]


def clip_benchmark_classification(out: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    return _reference_module().write_classification(out, sizes, seed)


def clip_benchmark_retrieval(out: Path, count: int, seed: int = 1) -> Path:
    return _reference_module().write_retrieval(out, count, seed)


def random_open_clip_checkpoint(path: Path, name: str = "ViT-B-32", seed: int = 0) -> Path:
    """A random-init open_clip model's state dict, saved as a checkpoint file (what users pass as `pretrained`)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    torch.save(open_clip.create_model(name).state_dict(), path)
    return path
