"""Captioned-image datasets: tables loaded with HF `datasets`, images decoded with PIL, captions tokenized once.

A source is an imagefolder split directory (holding metadata.jsonl / .csv / .parquet) or such a table file. Image
paths are relative to the table's folder. Each caption column holds one caption or a list of captions. Rows whose
image is missing or unreadable, or that have no caption, are skipped with a warning and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T
from tqdm import tqdm

from vclr.config import DataConfig
from vclr.data.augment import augmentation, seeded, view_of, view_seed
from vclr.data.batch import IMAGE_INPUTS, ImageInput
from vclr.data.images import read_image
from vclr.errors import DataError

logger = logging.getLogger(__name__)

TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


@dataclass
class CaptionTable:
    """One row per usable image: its absolute path and its captions (at least one)."""

    source: str
    image_paths: list[str]
    captions: list[list[str]]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped

    def __len__(self) -> int:
        return len(self.image_paths)

    def flat_captions(self) -> tuple[list[str], np.ndarray]:
        """All captions in order, and for each the row of its image."""
        texts = [c for caps in self.captions for c in caps]
        caption_image = np.repeat(np.arange(len(self.captions)), [len(c) for c in self.captions])
        return texts, caption_image

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path, caps in zip(self.image_paths, self.captions):
            digest.update(os.path.basename(path).encode())
            digest.update("\x1f".join(caps).encode())
        return digest.hexdigest()[:16]


def _table_file(source: Path) -> Path:
    if source.is_dir():
        for name in METADATA_NAMES:
            if (source / name).is_file():
                return source / name
        raise DataError(f"dataset dir {source} has no {' / '.join(METADATA_NAMES)}; "
                        "create one with `vclr make-synthetic` or point data.train at a table file")
    if not source.is_file():
        raise DataError(f"dataset {source} does not exist; set data.train / data.test to a dataset dir or table file")
    if source.suffix not in TABLE_BUILDERS:
        raise DataError(f"dataset table {source} has an unsupported suffix; use one of {', '.join(TABLE_BUILDERS)}")
    return source


def _row_captions(row: dict, caption_columns: Sequence[str]) -> list[str]:
    captions: list[str] = []
    for column in caption_columns:
        value = row[column]
        values = value if isinstance(value, (list, tuple)) else [value]
        captions.extend(v.strip() for v in values if isinstance(v, str) and v.strip())
    return captions


MAX_CAPTION_CHARS = 4000  # a tokenizer keeps ~77 tokens anyway; megabyte captions only cost time


def _sanitized_jsonl(table_file: Path) -> tuple[Path, dict[str, int], tempfile.TemporaryDirectory | None]:
    """A JSON-lines table as datasets can read it: lines with bytes that are not UTF-8 are decoded with U+FFFD
    replacements, lines that are not JSON objects are dropped; both counted. The file itself is used when clean."""
    counts = {"non-UTF-8 bytes in metadata (replaced)": 0, "malformed metadata line": 0}
    lines = []
    with open(table_file, "rb") as f:
        for raw in f:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                counts["non-UTF-8 bytes in metadata (replaced)"] += 1
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                counts["malformed metadata line"] += 1
                continue
            lines.append(json.dumps(row, ensure_ascii=False))
    counts = {k: v for k, v in counts.items() if v}
    if not counts:
        return table_file, {}, None
    scratch = tempfile.TemporaryDirectory(prefix="vclr-table-")
    clean = Path(scratch.name) / table_file.name
    clean.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return clean, counts, scratch


def _read_table(source: str | os.PathLike):
    """(table file, HF Dataset, rows skipped or repaired while reading) of a dataset dir or table file."""
    import datasets  # heavy import: only when loading data

    table_file = _table_file(Path(source))
    datasets.disable_progress_bars()
    readable, repaired, scratch = table_file, {}, None
    if table_file.suffix == ".jsonl":
        readable, repaired, scratch = _sanitized_jsonl(table_file)
    try:
        table = datasets.load_dataset(TABLE_BUILDERS[table_file.suffix], data_files=str(readable), split="train",
                                      keep_in_memory=scratch is not None)
    except Exception as e:  # datasets raises many types for malformed files
        raise DataError(f"could not read dataset table {table_file}: {type(e).__name__}: {e}") from None
    finally:
        if scratch is not None:
            scratch.cleanup()
    return table_file, table, repaired


def _require_columns(table_file: Path, table, columns: Sequence[str], hint: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"dataset table {table_file} has no column {missing[0]!r} (columns: "
                        f"{', '.join(table.column_names)}); {hint}")


def _image_root(table_file: Path, image_root: str | os.PathLike | None) -> Path:
    """Where a table's relative image paths start: `image_root`, else the table's own folder."""
    return Path(image_root) if image_root is not None else table_file.parent


def load_class_labels(source: str | os.PathLike, image_paths: Sequence[str], label_column: str = "label",
                      name_column: str = "class_name", image_column: str = "file_name",
                      image_root: str | os.PathLike | None = None) -> tuple[np.ndarray, list[str]]:
    """Integer labels aligned with `image_paths` (a loaded table's), and the class names indexed by label."""
    table_file, table, _ = _read_table(source)
    _require_columns(table_file, table, (image_column, label_column, name_column),
                     "name them with `label_column` / `name_column`")
    root = _image_root(table_file, image_root)
    by_path, names = {}, {}
    for row in table.select_columns([image_column, label_column, name_column]):
        by_path[str((root / str(row[image_column])).resolve())] = int(row[label_column])
        names[int(row[label_column])] = str(row[name_column])
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{table_file}: labels must be 0..K-1, got {sorted(names)[:10]}")
    return np.array([by_path[p] for p in image_paths], dtype=np.int64), [names[k] for k in range(len(names))]


def load_caption_table(source: str | os.PathLike, image_column: str = "file_name",
                       caption_columns: Sequence[str] = ("captions",),
                       image_root: str | os.PathLike | None = None) -> CaptionTable:
    """Read the table with `datasets`, resolve image paths, drop rows with no image file or no caption.

    Image paths are relative to `image_root`, by default the table's own folder.
    """
    table_file, table, repaired = _read_table(source)
    _require_columns(table_file, table, (image_column, *caption_columns),
                     "set data.image_column / data.caption_columns")
    root = _image_root(table_file, image_root)
    paths, captions, row_of = [], [], {}
    skipped = {"missing image file": 0, "no caption": 0, "duplicate image row (captions merged)": 0,
               "caption truncated": 0, **repaired}
    for row in table.select_columns([image_column, *caption_columns]):
        path = root / str(row[image_column] or "")
        row_captions = _row_captions(row, caption_columns)
        long = [c for c in row_captions if len(c) > MAX_CAPTION_CHARS]
        if long:
            skipped["caption truncated"] += len(long)
            row_captions = [c[:MAX_CAPTION_CHARS] for c in row_captions]
        if not row[image_column] or not path.is_file():
            skipped["missing image file"] += 1
        elif not row_captions:
            skipped["no caption"] += 1
        elif (resolved := str(path.resolve())) in row_of:  # the same image again: one row, all its captions
            skipped["duplicate image row (captions merged)"] += 1
            merged = captions[row_of[resolved]]
            merged.extend(c for c in row_captions if c not in merged)
        else:
            row_of[resolved] = len(paths)
            paths.append(resolved)
            captions.append(row_captions)
    skipped = {k: v for k, v in skipped.items() if v}
    for reason, count in skipped.items():
        logger.warning("%s: skipped %d rows (%s)", table_file, count, reason)
    if not paths:
        raise DataError(f"dataset {table_file} has no usable rows (skipped: {skipped or 'none'})")
    return CaptionTable(str(table_file), paths, captions, skipped)


def split_held_out(table: CaptionTable, fraction: float) -> tuple[CaptionTable, CaptionTable]:
    """(train, held out): about `fraction` of the images, picked by a hash of their path relative to the table's
    folder (so the same images wherever the dataset lies, across runs and machines), with all their captions."""
    folder = Path(table.source).resolve().parent
    held = [stable_id(os.path.relpath(path, folder)) % 10_000 < fraction * 10_000 for path in table.image_paths]

    def part(keep: bool) -> CaptionTable:
        rows = [i for i, h in enumerate(held) if h == keep]
        return CaptionTable(table.source, [table.image_paths[i] for i in rows], [table.captions[i] for i in rows],
                            table.skipped if not keep else {})

    return part(False), part(True)


def decode_transform(image_size: int, augment: bool = False, interpolation: str = "bicubic",
                     settings=None) -> Callable[[Image.Image], torch.Tensor]:
    """PIL -> uint8 (3, S, S), as open_clip's own preprocess: the short side resized on the PIL image with the model's
    interpolation, then a centre crop (or, when augmenting, vclr.data.augment's crop and the photometric changes its
    `settings`, a DataConfig, turn on); its ToTensor of that uint8 image, normalised later on batches
    (normalize_images), gives open_clip's input exactly.

    No flips, ever: captions say "left" and "right".
    """
    if augment:
        geometry = augmentation(image_size, interpolation, settings)
    else:
        geometry = T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode(interpolation)),
                              T.CenterCrop(image_size)])
    return T.Compose([geometry, T.PILToTensor()])


def draft_size(image_size: int, jpeg_draft: float) -> int:
    """The side, in pixels, that reduced-scale JPEG decoding keeps (data.jpeg_draft x the model's input size);
    0 (full-size decoding) when jpeg_draft is 0."""
    return math.ceil(image_size * jpeg_draft) if jpeg_draft > 0 else 0


class ImageDecoder:
    """An image file (path or file object) -> uint8 (3, S, S) through `geometry`, or None when it is unreadable.

    The one decoding step of every PIL path (training items and caches, shards, embedding, validation): read_image
    with reduced-scale JPEG decoding down to `draft_to` pixels a side, then the model's resize and crop.
    """

    def __init__(self, geometry: Callable[[Image.Image], torch.Tensor], draft_to: int = 0):
        self.geometry, self.draft_to = geometry, draft_to

    def __call__(self, source) -> torch.Tensor | None:
        image = read_image(source, draft_to=self.draft_to)
        return None if image is None else self.geometry(image)


def read_bytes(path: str) -> bytes | None:
    """A file's encoded bytes, or None (with a warning) when it cannot be read or is empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        logger.warning("unreadable image %s skipped: %s", path, e)
        return None
    return data or None


def decode_images(paths: Sequence[str], decoder: ImageDecoder) -> list[torch.Tensor | None]:
    """Every image through `decoder` (-> uint8 tensor), decoded on threads; None where unreadable."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes outside the GIL
        return list(tqdm(pool.map(decoder, paths, chunksize=64), total=len(paths), desc="decoding images",
                         unit="img", leave=False))


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) normalised; runs on whatever device the batch is on.

    The same float operations, in the same order, as torchvision's ToTensor then Normalize (x / 255, - mean, / std):
    the input is open_clip's own preprocess bit for bit, so embeddings (and benchmark figures) equal open_clip's
    and CLIP_benchmark's exactly rather than within rounding."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return images.float().div(255).sub(mean_t).div(std_t)


def stable_id(data: str | bytes) -> int:
    """A signed 64-bit identity of an image path or image bytes: equal inputs, equal ids, in every process."""
    raw = data.encode() if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True)


def tokenize_all(tokenizer, texts: Sequence[str], batch: int = 4096) -> torch.Tensor:
    """(N, context_length) token ids; long captions are truncated by the tokenizer."""
    chunks = [tokenizer(list(texts[i:i + batch])) for i in range(0, len(texts), batch)]
    return torch.cat(chunks) if chunks else torch.zeros(0, getattr(tokenizer, "context_length", 77), dtype=torch.long)


class ImageTextDataset(Dataset):
    """Item i: (uint8 image (3, S, S), caption tokens (L,), image id). One of image i's captions, chosen per epoch.
    The image id (`stable_id` of the file's path) tells the loss which rows of a batch show the same image.

    The caption choice is a pure function of (seed, epoch, i), so a resumed run that skips batches sees the same
    captions as an uninterrupted one. With `cache_images` all images are decoded once into one uint8 tensor.
    `image_input` says what an item carries for its image (TrainBatch.image_input): "pixels"; "encoded", the file's
    bytes, decoded later on the training device (`vclr.data.device_decode`; `cache_images` then keeps the bytes in
    RAM); or "rows", the image's row number, for a locked image tower whose outputs are cached per row
    (vclr.train.locked_cache computes them through `image(i)`). With `views` K (train.cache_views) an augmented
    item takes one of K seeded views of its image each epoch (vclr.data.augment): its pixels, or, as "rows", the row
    `view * N + i` of a cache holding every view.
    """

    def __init__(self, table: CaptionTable, tokenizer, image_size: int, *, seed: int = 0, augment: bool = False,
                 cache_images: bool = True, cache_max_gb: float = 4.0, image_input: ImageInput = "pixels",
                 decode_now: bool = True, jpeg_draft: float = DataConfig.jpeg_draft, augment_settings=None,
                 views: int = 0):
        if image_input not in IMAGE_INPUTS:
            raise ValueError(f"image_input must be one of {IMAGE_INPUTS}, got {image_input!r}")
        self.table = table
        self.seed = seed
        self.epoch = 0
        self.image_size = image_size
        self.image_input = image_input
        self.encoded = image_input == "encoded"
        self.encoded_cache: list[bytes | None] | None = None
        self.decoder = ImageDecoder(decode_transform(image_size, augment, settings=augment_settings),
                                    draft_size(image_size, jpeg_draft))
        self.views = views if augment else 0
        self.augment_settings = augment_settings if augment else None  # what its views' pixels depend on
        texts, caption_image = table.flat_captions()
        self.tokens = tokenize_all(tokenizer, texts)  # (C, L)
        self.caption_start = np.concatenate([[0], np.cumsum([len(c) for c in table.captions])])  # (N + 1,)
        self.caption_image = caption_image
        self.image_ids = [stable_id(os.path.abspath(path)) for path in table.image_paths]
        self.cache: torch.Tensor | None = None
        self.unreadable_on_the_fly: set[int] = set()  # found while decoding lazily (this process's items only)
        self.cache_images, self.cache_max_gb, self.augment = cache_images, cache_max_gb, augment
        if decode_now:
            self.prepare_images()

    def prepare_images(self) -> None:
        """Decode (or read) the images into RAM when the settings and the size allow; else they load per item."""
        if self.encoded:
            self._maybe_cache_encoded(self.cache_images, self.cache_max_gb)
            return
        cache_gb = len(self.table) * 3 * self.image_size**2 / 1e9
        if self.cache_images and not self.augment and cache_gb <= self.cache_max_gb:
            self._fill_cache()
        elif self.cache_images and not self.augment:
            logger.info("not caching images: %.1f GB > data.cache_max_gb=%.1f", cache_gb, self.cache_max_gb)

    def _fill_cache(self) -> None:
        images = decode_images(self.table.image_paths, self.decoder)
        bad = [i for i, image in enumerate(images) if image is None]
        if bad:
            logger.warning("%s: skipped %d unreadable images", self.table.source, len(bad))
            self.drop_rows(set(bad))
            images = [image for image in images if image is not None]
        self.cache = torch.stack(images) if images else torch.zeros(0, 3, self.image_size, self.image_size,
                                                                    dtype=torch.uint8)  # (N, 3, S, S)

    def _maybe_cache_encoded(self, cache_images: bool, cache_max_gb: float) -> None:
        encoded_gb = sum(os.path.getsize(p) for p in self.table.image_paths) / 1e9
        if not cache_images or encoded_gb > cache_max_gb:
            logger.info("reading image bytes from disk per batch (%.1f GB encoded)", encoded_gb)
            return
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            self.encoded_cache = list(tqdm(pool.map(read_bytes, self.table.image_paths, chunksize=256),
                                           total=len(self.table), desc="reading images", unit="img", leave=False))

    def drop_rows(self, bad: set[int]) -> None:
        """Forget rows `bad` (unreadable images): their captions, tokens and ids go with them."""
        keep = [i for i in range(len(self.table)) if i not in bad]
        caption_rows = np.concatenate([np.arange(self.caption_start[i], self.caption_start[i + 1]) for i in keep])
        self.tokens = self.tokens[torch.from_numpy(caption_rows)]
        self.table = CaptionTable(self.table.source, [self.table.image_paths[i] for i in keep],
                                  [self.table.captions[i] for i in keep],
                                  {**self.table.skipped, "unreadable image": len(bad)})
        self.caption_start = np.concatenate([[0], np.cumsum([len(c) for c in self.table.captions])])
        self.caption_image = self.table.flat_captions()[1]
        self.image_ids = [self.image_ids[i] for i in keep]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.table)

    def caption_index(self, i: int) -> int:
        start, stop = self.caption_start[i], self.caption_start[i + 1]
        draw = np.random.default_rng((self.seed, self.epoch, i)).integers(stop - start)
        return int(start + draw)

    def image(self, i: int, view: int | None = None) -> torch.Tensor | bytes | None:
        """Image i's pixels (or bytes); with `view`, that seeded augmented view of it."""
        if self.encoded:
            return self.encoded_cache[i] if self.encoded_cache is not None else read_bytes(self.table.image_paths[i])
        if view is not None:
            with seeded(view_seed(self.seed, i, view)):
                return self.decoder(self.table.image_paths[i])
        if self.cache is not None:
            return self.cache[i]
        return self.decoder(self.table.image_paths[i])

    def __getitem__(self, i: int):
        view = view_of(self.seed, self.epoch, i, self.views) if self.views else None
        if self.image_input == "rows":
            image = i if view is None else view * len(self) + i  # a row of the cache of every view
        else:
            image = self.image(i, view)
        if image is None:
            self.unreadable_on_the_fly.add(i)
            return None  # unreadable on the fly: collate drops it
        caption = self.caption_index(i)
        return image, self.tokens[caption], self.image_ids[i], caption
