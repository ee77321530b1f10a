"""Dataset preparers: turn datasets nobody on this team wrote into vclr's standard on-disk format.

Standard format (what `load_caption_table` reads, and an HF `imagefolder`): OUT/<split>/metadata.jsonl with one row
per image, `file_name` (relative to that split folder) and `captions` (a list), plus extra columns such as `label`.

    vclr prepare karpathy --json dataset_flickr30k.json --images flickr30k-images --out data/flickr30k
    vclr prepare fashion-mnist --out data/fashion-mnist
    vclr prepare folder --images photos/ --captions captions.csv --out data/photos
    vclr prepare openmoji --out data/openmoji --size 64
    vclr prepare webdataset --shards shards/ --out data/web
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vclr.data.cache import cache_dir
from vclr.data.dataset import load_caption_table
from vclr.data.shards import sample_captions, sample_image_key
from vclr.errors import PrepareError
from vclr.storage import atomic_write_text

logger = logging.getLogger(__name__)


def write_split(out_dir: Path, split: str, rows: Iterable[dict]) -> int:
    """Write OUT/split/metadata.jsonl atomically; returns the row count."""
    path = out_dir / split / "metadata.jsonl"
    rows = list(rows)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    logger.info("wrote %d rows to %s", len(rows), path)
    return len(rows)


def _relative(image: Path, split_dir: Path) -> str:
    return os.path.relpath(image.resolve(), split_dir.resolve())


# --------------------------------------------------------------------------------------------------------- karpathy


def prepare_karpathy(json_path: str | os.PathLike, images_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     restval_to_train: bool = True) -> dict[str, int]:
    """Flickr30k / COCO Karpathy splits (`images[].sentences[].raw`, `split`, `filename`, COCO's `filepath`).

    Images stay where they are: metadata rows point at them by relative path. `restval` (COCO) joins train, as in
    the usual 113k-image COCO training set, unless `restval_to_train` is False.
    """
    json_path, images_dir, out = Path(json_path), Path(images_dir), Path(out_dir)
    if not json_path.is_file():
        raise PrepareError(f"Karpathy split file {json_path} does not exist "
                           "(dataset_flickr30k.json / dataset_coco.json)")
    if not images_dir.is_dir():
        raise PrepareError(f"image folder {images_dir} does not exist")
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PrepareError(f"{json_path} is not a Karpathy split file (needs an 'images' list): {e}") from None
    splits: dict[str, list[dict]] = {}
    missing = 0
    for n, entry in enumerate(entries):
        try:
            image = images_dir / entry.get("filepath", "") / entry["filename"]
            captions = [s["raw"].strip() for s in entry["sentences"] if s.get("raw", "").strip()]
            split = entry["split"]
        except (KeyError, TypeError, AttributeError) as e:
            raise PrepareError(f"{json_path}: images[{n}] lacks a field the Karpathy format has: {e}") from None
        if split == "restval" and restval_to_train:
            split = "train"
        if not image.is_file():
            missing += 1
            continue
        splits.setdefault(split, []).append({"file_name": _relative(image, out / split), "captions": captions,
                                             "id": entry.get("cocoid", entry.get("imgid", n))})
    if missing:
        logger.warning("%s: %d images listed in the split file are not in %s", json_path, missing, images_dir)
    counts = {split: write_split(out, split, rows) for split, rows in sorted(splits.items())}
    if not counts:
        raise PrepareError(f"no image of {json_path} was found under {images_dir}")
    return counts


# ---------------------------------------------------------------------------------------------------- fashion-mnist

FASHION_MNIST_CLASSES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot")
FASHION_MNIST_DEBIAN = "dataset-fashion-mnist"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_MNIST_TEMPLATES = ("a photo of {}", "{}", "a black and white photo of {}", "a picture of {}")


def with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain): uint8 array of the header's shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PrepareError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise PrepareError(f"{path}: header says {shape} but the file holds {body.size} values")
    return body.reshape(shape)


def _fetch_debian_package(package: str, subdir: str) -> Path:
    """Unpack a Debian package into the cache with `apt-get download` + `dpkg -x` (no root needed to unpack)."""
    target = cache_dir() / "debian" / package
    found = target / subdir.lstrip("/")
    if found.is_dir():
        return found
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True, text=True)
            deb = next(Path(tmp).glob("*.deb"))
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError, StopIteration) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise PrepareError(f"could not fetch the Debian package {package} (is the Debian mirror reachable? try "
                               f"`apt-get update`): {detail.strip().splitlines()[-1] if detail.strip() else e}") \
                from None
    return found


def fashion_mnist_source(source: str | os.PathLike | None = None) -> Path:
    if source:
        return Path(source)
    if FASHION_MNIST_SYSTEM_DIR.is_dir():
        return FASHION_MNIST_SYSTEM_DIR
    return _fetch_debian_package(FASHION_MNIST_DEBIAN, str(FASHION_MNIST_SYSTEM_DIR))


def prepare_fashion_mnist(out_dir: str | os.PathLike, source: str | os.PathLike | None = None,
                          limit: int | None = None) -> dict[str, int]:
    """Fashion-MNIST (IDX files from Debian's dataset-fashion-mnist) -> 28x28 PNGs with class-name captions, labels,
    and the class names and prompt templates of a zero-shot benchmark."""
    src, out = fashion_mnist_source(source), Path(out_dir)
    counts = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        if not (src / images_name).is_file() or not (src / labels_name).is_file():
            raise PrepareError(f"{src} lacks {images_name} / {labels_name}; give the Fashion-MNIST folder as `source`")
        images, labels = read_idx(src / images_name), read_idx(src / labels_name)
        if len(images) != len(labels) or images.ndim != 3:
            raise PrepareError(f"{src}: {split} images {images.shape} and labels {labels.shape} do not match")
        count = min(len(images), limit) if limit else len(images)
        (out / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in tqdm(range(count), desc=f"fashion-mnist {split}", unit="img", leave=False):
            name = FASHION_MNIST_CLASSES[int(labels[i])]
            file_name = f"{i:05d}.png"
            Image.fromarray(images[i], mode="L").save(out / split / file_name)
            captions = [t.format(with_article(name)) for t in FASHION_MNIST_TEMPLATES]
            rows.append({"file_name": file_name, "captions": captions, "label": int(labels[i]), "class_name": name})
        counts[split] = write_split(out, split, rows)
    # for zero-shot benchmarks (CLIP_benchmark's file names): the class names with their article in the templates'
    # places, so that the prompts are the captions the Fashion-MNIST recipe trains on ("a photo of a t-shirt")
    atomic_write_text(out / "dataset_type.txt", "classification\n")
    atomic_write_text(out / "classnames.txt", "".join(with_article(c) + "\n" for c in FASHION_MNIST_CLASSES))
    atomic_write_text(out / "zeroshot_classification_templates.txt",
                      "".join(t.replace("{}", "{c}") + "\n" for t in FASHION_MNIST_TEMPLATES))
    return counts


# ----------------------------------------------------------------------------------------------------------- folder


def _split_of(key: str, test_fraction: float, seed: int) -> str:
    """Stable split by hashing the key: adding images never moves existing ones between splits."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def prepare_folder(images_dir: str | os.PathLike, captions_file: str | os.PathLike, out_dir: str | os.PathLike,
                   image_column: str = "file_name", caption_columns: Sequence[str] = ("captions",),
                   test_fraction: float = 0.1, seed: int = 0) -> dict[str, int]:
    """A folder of images + a CSV/JSONL of captions -> train/test splits in the standard format."""
    if not 0 <= test_fraction < 1:
        raise PrepareError(f"`test_fraction` must be in [0, 1), got {test_fraction}")
    captions_file, images_dir, out = Path(captions_file), Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise PrepareError(f"image folder {images_dir} does not exist")
    table = load_caption_table(captions_file, image_column, caption_columns, image_root=images_dir)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for path, captions in zip(table.image_paths, table.captions):
        split = _split_of(os.path.relpath(path, images_dir.resolve()), test_fraction, seed)
        splits[split].append({"file_name": _relative(Path(path), out / split), "captions": captions})
    return {split: write_split(out, split, rows) for split, rows in splits.items() if rows}


# --------------------------------------------------------------------------------------------------------- openmoji

OPENMOJI_VERSION = "17.0.0"
OPENMOJI_SKIP_GROUPS = ("component",)  # bare skin-tone swatches and hair parts: not concepts anyone searches for


def openmoji_source(source: str | os.PathLike | None = None, version: str = OPENMOJI_VERSION) -> Path:
    """The npm package's folder: `source`, or `npm pack openmoji@version` unpacked into the cache."""
    if source:
        return Path(source)
    target = cache_dir() / "npm" / f"openmoji-{version}"
    if (target / "package" / "data" / "openmoji.json").is_file():
        return target / "package"
    target.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["npm", "pack", f"openmoji@{version}", "--silent"], cwd=target, check=True,
                              capture_output=True, text=True, timeout=600)
        tgz = target / done.stdout.strip().splitlines()[-1]
        with tarfile.open(tgz) as archive:
            archive.extractall(target, filter="data")
        tgz.unlink()
    except (OSError, subprocess.SubprocessError, IndexError, tarfile.TarError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip()
        raise PrepareError(f"could not fetch the npm package openmoji@{version} (is the npm registry reachable?): "
                           f"{detail.splitlines()[-1] if detail else e}") from None
    return target / "package"


def _openmoji_concept(entry: dict, skin_tones: str) -> tuple[str, str] | None:
    """(concept id, concept name) of an entry, or None when the entry is dropped."""
    if entry.get("group") in OPENMOJI_SKIP_GROUPS:
        return None
    if entry.get("skintone"):
        if skin_tones == "drop":
            return None
        if skin_tones == "group":  # every skin tone of a base emoji is one concept, named like the base
            return entry["skintone_base_hexcode"], entry["annotation"].split(":")[0].strip()
    return entry["hexcode"], entry["annotation"]


def openmoji_captions(name: str, entry: dict) -> list[str]:
    """The name plus variants from keywords and group: "face with tears of joy", "a laughing, tears emoji"..."""
    tags = [t.strip() for t in (entry.get("tags") or "").split(",") if t.strip() and t.strip() not in name]
    subgroup = (entry.get("subgroups") or "").replace("-", " ").strip()
    captions = [name, f"{with_article(name)} emoji", f"an emoji showing {name}"]
    if tags:
        captions.append(f"{with_article(', '.join(tags[:3]))} emoji")
    if subgroup:
        captions.append(f"{name}, an emoji of the {subgroup} kind")
    return list(dict.fromkeys(captions))


def render_svg(svg_path: Path, size: int) -> Image.Image:
    """Rasterise an SVG onto white (emoji have transparent backgrounds) at size x size."""
    import resvg_py

    png = resvg_py.svg_to_bytes(svg_path=str(svg_path), width=size, height=size, background="#ffffff")
    return Image.open(io.BytesIO(bytes(png))).convert("RGB")


def prepare_openmoji(out_dir: str | os.PathLike, source: str | os.PathLike | None = None, size: int = 64,
                     skin_tones: str = "drop", test_fraction: float = 0.2, seed: int = 0,
                     limit: int | None = None) -> dict[str, int]:
    """OpenMoji colour emoji -> PNGs with name/keyword captions; train/test split by concept, never by image."""
    if skin_tones not in ("drop", "group", "keep"):
        raise PrepareError(f"`skin_tones` must be drop, group or keep, got {skin_tones!r}")
    package, out = openmoji_source(source), Path(out_dir)
    meta_file = package / "data" / "openmoji.json"
    if not meta_file.is_file():
        raise PrepareError(f"{package} is not the openmoji npm package (no data/openmoji.json)")
    entries = json.loads(meta_file.read_text(encoding="utf-8"))
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    missing = 0
    for entry in tqdm(entries[:limit] if limit else entries, desc="openmoji", unit="emoji", leave=False):
        concept = _openmoji_concept(entry, skin_tones)
        svg = package / "color" / "svg" / f"{entry['hexcode']}.svg"
        if concept is None:
            continue
        if not svg.is_file():
            missing += 1
            continue
        split = _split_of(concept[0], test_fraction, seed)
        file_name = f"{entry['hexcode']}.png"
        (out / split).mkdir(parents=True, exist_ok=True)
        render_svg(svg, size).save(out / split / file_name)
        splits[split].append({"file_name": file_name, "captions": openmoji_captions(concept[1], entry),
                              "concept": concept[0], "group": entry.get("group", "")})
    if missing:
        logger.warning("openmoji: %d entries have no colour SVG and were skipped", missing)
    return {split: write_split(out, split, rows) for split, rows in splits.items() if rows}


# ------------------------------------------------------------------------------------------------------- webdataset

def _wds_samples(shard: Path):
    """(key, {extension: bytes}) per sample of one tar shard; a key is the path up to the basename's first dot, as in
    webdataset, so keys may live in folders whose names hold dots."""
    current, members = None, {}
    with tarfile.open(shard) as archive:
        for info in archive:
            if not info.isfile():
                continue
            folder, _, base = info.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{folder}/{stem}" if folder else stem
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[ext.lower()] = archive.extractfile(info).read()
    if current is not None:
        yield current, members


def prepare_webdataset(shards_dir: str | os.PathLike, out_dir: str | os.PathLike, test_fraction: float = 0.1,
                       seed: int = 0) -> dict[str, int]:
    """A directory of webdataset .tar shards (key.jpg + key.txt / key.json) -> images + metadata, hash-split."""
    shards, out = sorted(Path(shards_dir).glob("*.tar")), Path(out_dir)
    if not shards:
        raise PrepareError(f"no .tar shards in {shards_dir}")
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    skipped = 0
    for shard in tqdm(shards, desc="shards", unit="shard", leave=False):
        try:
            for key, members in _wds_samples(shard):
                ext = sample_image_key(members)
                captions = sample_captions(members)
                if ext is None or not captions:
                    skipped += 1
                    continue
                split = _split_of(f"{shard.name}/{key}", test_fraction, seed)
                file_name = f"{shard.stem}_{key.replace('/', '_')}.{ext}"
                (out / split).mkdir(parents=True, exist_ok=True)
                (out / split / file_name).write_bytes(members[ext])
                splits[split].append({"file_name": file_name, "captions": captions})
        except tarfile.TarError as e:
            raise PrepareError(f"shard {shard} is not a readable tar file: {e}") from None
    if skipped:
        logger.warning("webdataset: skipped %d samples without an image or a caption", skipped)
    return {split: write_split(out, split, rows) for split, rows in splits.items() if rows}


# ------------------------------------------------------------------------------- CLIP_benchmark's webdataset layout

CLIP_BENCHMARK_FILES = ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt")
CLIP_BENCHMARK_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")  # the order its reader takes them in (to_tuple)


def clip_benchmark_splits(root: str | os.PathLike) -> list[str]:
    """The splits of a dataset in CLIP_benchmark's webdataset layout (ROOT/<split>/nshards.txt + 0.tar ...)."""
    root = Path(root)
    return sorted(p.parent.name for p in root.glob("*/nshards.txt")) if root.is_dir() else []


def _clip_benchmark_shards(root: Path, split: str) -> list[Path]:
    text = (root / split / "nshards.txt").read_text().strip()
    try:
        count = int(text)
    except ValueError:
        raise PrepareError(f"{root / split / 'nshards.txt'} must hold the number of shards, got {text[:40]!r}") \
            from None
    shards = [root / split / f"{i}.tar" for i in range(count)]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise PrepareError(f"shard {missing[0]} is missing ({split}/nshards.txt lists {count})")
    return shards


def _clip_benchmark_row(key: str, members: dict, kind: str, classnames: list[str]) -> tuple[str, dict]:
    ext = next((e for e in CLIP_BENCHMARK_IMAGE_KEYS if e in members), None)
    if ext is None:
        raise PrepareError(f"sample {key} has no image ({'/'.join(CLIP_BENCHMARK_IMAGE_KEYS)})")
    if kind == "retrieval":
        if "txt" not in members:
            raise PrepareError(f"sample {key} of a retrieval dataset has no .txt captions")
        return ext, {"captions": members["txt"].decode("utf-8").splitlines()}
    if "cls" not in members:
        raise PrepareError(f"sample {key} of a classification dataset has no .cls label")
    label = int(members["cls"].decode().strip())
    if classnames and not 0 <= label < len(classnames):
        raise PrepareError(f"sample {key}: label {label} is outside classnames.txt's {len(classnames)} classes")
    return ext, {"label": label, **({"class_name": classnames[label]} if classnames else {})}


def prepare_clip_benchmark(root: str | os.PathLike, out_dir: str | os.PathLike,
                           splits: Sequence[str] | None = None) -> dict[str, int]:
    """A dataset in CLIP_benchmark's webdataset layout (as `clip_benchmark` and the hub's clip-benchmark/wds_* hold
    it: ROOT/<split>/nshards.txt and 0.tar..., ROOT/classnames.txt, zeroshot_classification_templates.txt,
    dataset_type.txt) -> vclr's standard format, samples in shard order (the order CLIP_benchmark reads them), the
    three text files copied beside the split folders. Classification samples get `label` (and `class_name`),
    retrieval samples `captions` (the .txt's lines). Multi-label datasets (.npy targets) are not supported."""
    root, out = Path(root), Path(out_dir)
    available = clip_benchmark_splits(root)
    if not available:
        raise PrepareError(f"{root} is not in CLIP_benchmark's webdataset layout (no <split>/nshards.txt)")
    kind = (root / "dataset_type.txt").read_text().strip().lower() if (root / "dataset_type.txt").is_file() \
        else "classification"  # CLIP_benchmark's own default
    if kind not in ("classification", "retrieval"):
        raise PrepareError(f"{root}: dataset_type {kind!r} is not supported (classification or retrieval)")
    classnames = (root / "classnames.txt").read_text(encoding="utf-8").splitlines() \
        if (root / "classnames.txt").is_file() else []
    classnames = [c.strip() for c in classnames]
    counts = {}
    for split in splits or available:
        if split not in available:
            raise PrepareError(f"{root} has no split {split!r} (it has {', '.join(available)})")
        rows = []
        (out / split).mkdir(parents=True, exist_ok=True)
        for shard in tqdm(_clip_benchmark_shards(root, split), desc=f"{root.name} {split}", unit="shard", leave=False):
            try:
                for key, members in _wds_samples(shard):
                    ext, row = _clip_benchmark_row(f"{shard.name}/{key}", members, kind, classnames)
                    file_name = f"{len(rows):07d}.{ext}"
                    (out / split / file_name).write_bytes(members[ext])
                    rows.append({"file_name": file_name, **row})
            except (tarfile.TarError, EOFError, OSError) as e:
                first = (str(e).strip().splitlines() or [""])[0].rstrip(":")
                raise PrepareError(f"shard {shard} is broken ({type(e).__name__}: {first}); download it again") \
                    from None
        counts[split] = write_split(out, split, rows)
    for name in CLIP_BENCHMARK_FILES:
        if (root / name).is_file():
            atomic_write_text(out / name, (root / name).read_text(encoding="utf-8"))
    return counts
