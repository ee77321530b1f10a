"""The datasets a benchmark scores: names resolved to folders in vclr's standard format, one table of vclr's own.

    data = resolve_dataset("fashion-mnist")                    # vclr's own: prepared into the cache on first use
    data = resolve_dataset("cifar10", root="wds/{dataset}")    # CLIP_benchmark's names: its webdataset layout
    data = resolve_dataset("cifar10")                          # ... from the hub's clip-benchmark/wds_cifar10
    data = resolve_dataset("vclr-demo/data/test")              # a path: a split folder, a dataset, a shard folder

A resolved dataset is a folder with one subfolder per split (`metadata.jsonl` in each, as `vclr prepare` writes) and
CLIP_benchmark's three text files beside them: `dataset_type.txt` (classification, retrieval, and vclr's selection
and multilingual), `classnames.txt` (one a line, by label) and `zeroshot_classification_templates.txt` (`{c}` for
the class name). Without them the kind is read from the columns (`label`: classification; `file_names`: selection;
`captions_<lang>`: multilingual; else retrieval), class names from a `class_name` column and templates from
CLIP_benchmark's own file for the name (the `benchmark` extra) or "a photo of a {c}.".

Anything fetched or converted lands in `$VCLR_CACHE/benchmark/`, keyed by where it came from, and is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vclr.data.cache import cache_dir
from vclr.data.dataset import METADATA_NAMES, _read_table
from vclr.errors import DataError, PrepareError, VclrError
from vclr.storage import atomic_write_text

logger = logging.getLogger(__name__)

KINDS = ("classification", "retrieval", "selection", "multilingual")
DEFAULT_TEMPLATES = ("a photo of a {c}.",)  # CLIP's single prompt, in CLIP_benchmark's placeholder
HUB_ORG = "clip-benchmark"  # the hub's datasets: clip-benchmark/wds_<name with / as ->


class UnknownDataset(VclrError):
    """A dataset name that is neither a path nor a registered name."""


@dataclass(frozen=True)
class BenchmarkDataset:
    """A dataset resolved to a local folder in the standard format; `splits` maps a split name to its folder."""

    name: str
    kind: str
    splits: dict[str, Path]
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    languages: tuple[str, ...] = ()
    source: str = ""

    def split(self, name: str) -> Path:
        if name not in self.splits:
            raise DataError(f"dataset {self.name} has no {name} split (it has {', '.join(self.splits)})")
        return self.splits[name]

    def fingerprint(self) -> str:
        """What makes two results on this dataset comparable: its tables, class names, templates and kind."""
        digest = hashlib.sha256(json.dumps([self.kind, self.classnames, self.templates, self.languages]).encode())
        for split in sorted(self.splits):
            digest.update(split.encode())
            digest.update(_table_file(self.splits[split]).read_bytes())
        return digest.hexdigest()[:16]


def _table_file(folder: Path) -> Path:
    return next(folder / name for name in METADATA_NAMES if (folder / name).is_file())


def _is_split(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in METADATA_NAMES)


def _read_text_lines(path: Path) -> tuple[str, ...]:
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) \
        if path.is_file() else ()


def _columns(split: Path) -> list[str]:
    return _read_table(split)[1].column_names


def _kind_of(root: Path, test: Path) -> str:
    declared = _read_text_lines(root / "dataset_type.txt")
    if declared:
        kind = declared[0].lower()
        if kind not in KINDS:
            raise DataError(f"{root / 'dataset_type.txt'} says {kind!r}; vclr knows {', '.join(KINDS)}")
        return kind
    columns = _columns(test)
    if "file_names" in columns:
        return "selection"
    if any(c.startswith("captions_") for c in columns):
        return "multilingual"
    return "classification" if "label" in columns else "retrieval"


def _class_names_from_column(split: Path) -> tuple[str, ...]:
    table = _read_table(split)[1]
    if "class_name" not in table.column_names or "label" not in table.column_names:
        return ()
    names = {int(row["label"]): str(row["class_name"]) for row in table.select_columns(["label", "class_name"])}
    return tuple(names.get(i, "") for i in range(max(names) + 1)) if names else ()


def clip_benchmark_templates(name: str, language: str = "en") -> tuple[str, ...]:
    """CLIP_benchmark's zero-shot templates for a dataset it knows (the `benchmark` extra), else ()."""
    try:
        import clip_benchmark
    except ImportError:
        return ()
    path = Path(clip_benchmark.__file__).parent / "datasets" / f"{language}_zeroshot_classification_templates.json"
    if not path.is_file():
        return ()
    templates = json.loads(path.read_text(encoding="utf-8"))
    short = name.split("/", 1)[-1]
    found = templates.get(name) or templates.get(short)
    return tuple(found) if isinstance(found, list) else ()


def open_folder(path: str | os.PathLike, name: str | None = None) -> BenchmarkDataset:
    """A local dataset in the standard format: one split folder (its siblings are the other splits), or a folder of
    split folders."""
    path = Path(path)
    if _is_split(path):
        root = path.parent
        splits = {p.name: p for p in sorted(root.iterdir()) if _is_split(p) and p != path}
        splits["test"] = path  # the named folder is what is scored; train/val siblings feed linear probes
    else:
        root = path
        splits = {p.name: p for p in sorted(path.iterdir()) if _is_split(p)} if path.is_dir() else {}
        if "test" not in splits and len(splits) == 1:
            splits["test"] = next(iter(splits.values()))
    if "test" not in splits:
        raise DataError(f"{path} holds no split to score: give a folder with metadata.jsonl, or one with a test/ "
                        "split folder")
    kind = _kind_of(root, splits["test"])
    classnames = _read_text_lines(root / "classnames.txt") or (_class_names_from_column(splits["test"])
                                                                if kind == "classification" else ())
    name = name or str(path)
    templates = _read_text_lines(root / "zeroshot_classification_templates.txt") or \
        clip_benchmark_templates(name) or DEFAULT_TEMPLATES
    languages = tuple(sorted(c[len("captions_"):] for c in _columns(splits["test"]) if c.startswith("captions_")))
    return BenchmarkDataset(name, kind, splits, classnames, templates, languages, str(path))


# ---------------------------------------------------------------------------------- converted and fetched data


def _prepared(key: str, prepare: Callable[[Path], None]) -> Path:
    """A folder of the cache that `prepare` fills once: a `.complete` marker is written last, so an interrupted
    preparation starts again instead of serving half a dataset."""
    folder = cache_dir() / "benchmark" / key
    if not (folder / ".complete").is_file():
        logger.info("preparing %s (once; kept in %s)", key, folder)
        prepare(folder)
        atomic_write_text(folder / ".complete", "")
    return folder


def _layout_stamp(root: Path) -> str:
    """Where a CLIP_benchmark layout lies and the size and time of each of its files: a changed shard converts again."""
    entries = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps([str(root.resolve()), entries]).encode()).hexdigest()[:12]


def open_clip_benchmark_layout(root: str | os.PathLike, name: str) -> BenchmarkDataset:
    """A dataset in CLIP_benchmark's webdataset layout, converted once into the standard format."""
    from vclr.data.prepare import prepare_clip_benchmark

    root = Path(root)
    slug = re.sub(r"[^\w.-]+", "-", name).strip("-") or "dataset"
    folder = _prepared(f"wds/{slug}-{_layout_stamp(root)}", lambda out: prepare_clip_benchmark(root, out))
    return open_folder(folder, name)


def _download_wds(name: str) -> Path:
    """The hub's copy of a CLIP_benchmark dataset (clip-benchmark/wds_<name>), downloaded by huggingface_hub into its
    cache; one line when there is no network."""
    from huggingface_hub import snapshot_download

    from vclr.model.source import HUB_HOST, reachable

    repo = f"{HUB_ORG}/wds_{name.replace('/', '-')}"
    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except Exception:  # not in the cache yet: download it
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not reachable(HUB_HOST):
        raise DataError(f"dataset {name}: cannot download {repo} from the Hugging Face hub (no network); give "
                        "`dataset_root` with a local copy in CLIP_benchmark's webdataset layout")
    return Path(snapshot_download(repo, repo_type="dataset"))


# ---------------------------------------------------------------------------------------------- vclr's own names


def _prepare_fashion_mnist(out: Path) -> None:
    from vclr.data.prepare import prepare_fashion_mnist

    prepare_fashion_mnist(out)  # with its class names and templates


def _prepare_openmoji(out: Path) -> None:
    from vclr.data.prepare import prepare_openmoji

    prepare_openmoji(out, size=128)  # the size scripts/bench_emoji.py trains and scores at; the split is by concept
    atomic_write_text(out / "dataset_type.txt", "retrieval\n")


def _prepare_shapes(out: Path) -> None:
    from vclr.data.synthetic import make_synthetic

    make_synthetic(out, num_train=1, num_test=1000)  # the demo's 1,000 test scenes (they come first, whatever train)
    atomic_write_text(out / "dataset_type.txt", "retrieval\n")


@dataclass(frozen=True)
class NamedDataset:
    help: str
    prepare: Callable[[Path], None]  # writes the standard format into an empty folder


# vclr's own datasets by name; adding one is one row (and its prepare function)
NAMED_DATASETS = {
    "fashion-mnist": NamedDataset("Fashion-MNIST (Debian's dataset-fashion-mnist): zero-shot, linear probe",
                                  _prepare_fashion_mnist),
    "openmoji": NamedDataset("OpenMoji emoji (npm openmoji), 128 px, held-out concepts: retrieval", _prepare_openmoji),
    "shapes": NamedDataset("the demo's 1,000 synthetic test scenes: retrieval", _prepare_shapes),
}

# CLIP_benchmark's datasets outside its collections and template files (its builder knows them by these names)
CLIP_BENCHMARK_EXTRA_NAMES = ("multilingual_mscoco_captions", "flickr30k-200", "crossmodal3600", "xtd10", "xtd200",
                              "winoground", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "objectnet")


def clip_benchmark_names() -> list[str]:
    """The dataset names CLIP_benchmark knows (from the installed package: its collections and template files)."""
    try:
        from clip_benchmark.datasets.builder import dataset_collection
    except ImportError:
        return []
    names = {n for members in dataset_collection.values() for n in members} | set(CLIP_BENCHMARK_EXTRA_NAMES)
    import clip_benchmark

    templates = Path(clip_benchmark.__file__).parent / "datasets" / "en_zeroshot_classification_templates.json"
    names |= set(json.loads(templates.read_text(encoding="utf-8"))) - {"dummy"}
    return sorted(names)


def known_names() -> list[str]:
    return sorted(NAMED_DATASETS) + clip_benchmark_names()


def _format_root(template: str, name: str) -> str:
    return template.format(dataset=name, dataset_cleaned=name.replace("/", "-"))


def resolve_dataset(name: str, root: str | None = None, languages: tuple[str, ...] = ("en",)) -> BenchmarkDataset:
    """A dataset by path or name. `root` (CLIP_benchmark's --dataset_root: a folder, or a template with {dataset} or
    {dataset_cleaned}) says where CLIP_benchmark-named datasets lie: in its webdataset layout, or else where its
    builder keeps (and downloads) them; without `root` they come from the hub's webdataset copies. `languages`: the
    caption languages of CLIP_benchmark's multilingual retrieval sets (xtd10, crossmodal3600, ...)."""
    from vclr.data.prepare import clip_benchmark_splits

    path = Path(name)
    if path.exists():
        return _open_path(path, name)
    if name in NAMED_DATASETS:
        return open_folder(_prepared(name, NAMED_DATASETS[name].prepare), name)
    short = name[len("wds/"):] if name.startswith("wds/") else name
    if root:
        local = Path(_format_root(root, short))
        if local.is_dir() and not clip_benchmark_splits(local) and (local / short).is_dir():
            local = local / short  # a root that holds several datasets by name
        if clip_benchmark_splits(local):
            return open_clip_benchmark_layout(local, name)
        if not name.startswith("wds/") and short in clip_benchmark_names():
            return open_with_clip_benchmark_builder(short, local, languages)
        raise DataError(f"dataset {name}: {local} is not in CLIP_benchmark's webdataset layout (ROOT/test/nshards.txt "
                        "and ROOT/test/0.tar ...)")
    if name.startswith("wds/") or short in clip_benchmark_names():
        return open_clip_benchmark_layout(_download_wds(short), name)
    known = known_names()
    hint = "" if clip_benchmark_names() else "; `pip install 'vclr[benchmark]'` adds CLIP_benchmark's names"
    raise UnknownDataset(f"unknown dataset {name!r}: not a path, and not one of the known names "
                         f"({', '.join(known)}){hint}")


def _open_path(path: Path, name: str) -> BenchmarkDataset:
    from vclr.data.prepare import clip_benchmark_splits, prepare_webdataset
    from vclr.data.shards import find_shards

    if clip_benchmark_splits(path):
        return open_clip_benchmark_layout(path, name)
    if path.is_dir() and not _is_split(path) and find_shards(path):  # vclr's own shards: all of them are scored
        folder = _prepared(f"shards/{path.name}-{_layout_stamp(path)}",
                           lambda out: prepare_webdataset(path, out, test_fraction=1.0))
        return open_folder(folder, name)
    if path.is_file() and path.suffix == ".json":
        raise PrepareError(f"{path}: convert a Karpathy JSON and its image folder with `vclr prepare karpathy` first, "
                           "then benchmark the test split it writes")
    return open_folder(path, name)


BUILDER_KINDS = {"zeroshot_classification": "classification", "zeroshot_retrieval": "retrieval",
                 "image_caption_selection": "selection"}
MULTILINGUAL = ("multilingual_mscoco_captions", "flickr30k-200", "crossmodal3600", "xtd10", "xtd200")


def _save_image(image, path: Path) -> None:
    """A builder's item image (PIL, or a CHW float tensor as its dummy set gives) as a PNG file."""
    if not hasattr(image, "save"):
        from torchvision.transforms.functional import to_pil_image

        image = to_pil_image(image)
    image.convert("RGB").save(path)


def _builder_rows(dataset, kind: str, out: Path) -> list[dict]:
    rows = []
    for i in range(len(dataset)):
        images, target = dataset[i]
        images = images if isinstance(images, (list, tuple)) else [images]
        names = [f"{i:07d}-{j}.png" for j in range(len(images))]
        for image, file_name in zip(images, names):
            _save_image(image, out / file_name)
        if kind == "classification":
            rows.append({"file_name": names[0], "label": int(target)})
        elif kind == "selection":
            rows.append({"file_names": names, "captions": [str(c) for c in target]})
        else:  # retrieval: a list of captions (some builders nest it once more)
            captions = target[0] if len(target) == 1 and isinstance(target[0], (list, tuple)) else target
            rows.append({"file_name": names[0], "captions": [str(c) for c in captions]})
    return rows


def open_with_clip_benchmark_builder(name: str, root: Path, languages: tuple[str, ...] = ("en",)) -> BenchmarkDataset:
    """A CLIP_benchmark dataset through its own builder (`clip_benchmark.datasets.builder.build_dataset`, which
    downloads into `root` as `clip_benchmark eval` does), its items written once into the standard format; a
    multilingual set gets one `captions_<lang>` column per language."""
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_default_task

    from vclr.data.prepare import write_split

    kind = BUILDER_KINDS.get(get_dataset_default_task(name), "classification")
    langs = tuple(languages) if name in MULTILINGUAL else ("en",)

    def prepare(out: Path) -> None:
        (out / "test").mkdir(parents=True, exist_ok=True)
        rows, meta = None, None
        for lang in langs:
            dataset = build_dataset(name, root=str(root), transform=None, split="test", download=True,
                                    language=lang, task=get_dataset_default_task(name))
            lang_rows = _builder_rows(dataset, kind, out / "test")
            if rows is not None and len(lang_rows) != len(rows):
                raise DataError(f"dataset {name}: language {lang} has {len(lang_rows)} images, {langs[0]} "
                                f"{len(rows)}; the languages must share their images")
            if name in MULTILINGUAL:
                for row, lang_row in zip(rows or lang_rows, lang_rows):
                    row[f"captions_{lang}"] = lang_row.pop("captions", [])
            rows, meta = rows or lang_rows, dataset
        write_split(out, "test", rows)
        atomic_write_text(out / "dataset_type.txt", ("multilingual" if name in MULTILINGUAL else kind) + "\n")
        if kind == "classification" and getattr(meta, "classes", None):
            atomic_write_text(out / "classnames.txt", "".join(f"{c}\n" for c in meta.classes))
        if isinstance(getattr(meta, "templates", None), list):
            atomic_write_text(out / "zeroshot_classification_templates.txt", "".join(f"{t}\n" for t in meta.templates))

    slug = re.sub(r"[^\w.-]+", "-", name)
    return open_folder(_prepared(f"builder/{slug}-{'-'.join(langs)}", prepare), name)
