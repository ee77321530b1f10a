"""`vclr make-synthetic` and `vclr prepare DATASET`: data in vclr's standard format (images + metadata.jsonl).

Each dataset `vclr prepare` converts is one row of PREPARE_DATASETS: its help, an example, its arguments and the
converter of vclr.data.prepare that it calls. Adding a dataset is one converter function and one row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from vclr.cli.common import add_command
from vclr.errors import VclrError


def add_make_synthetic_arguments(p) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=20000, help="train images")
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def cmd_make_synthetic(args) -> int:
    from vclr.data.synthetic import make_synthetic

    try:
        out = make_synthetic(args.out, args.train, args.test, args.image_size, args.seed)
    except ValueError as e:
        raise VclrError(str(e)) from None
    print(f"wrote {args.train} train and {args.test} test images to {out}")
    return 0


# ------------------------------------------------------------------------------------------------------ prepare


def _karpathy_arguments(d) -> None:
    d.add_argument("--json", required=True, help="dataset_flickr30k.json or dataset_coco.json")
    d.add_argument("--images", required=True, help="folder holding the images (COCO: the folder above train2014/)")
    d.add_argument("--keep-restval", action="store_true", help="keep COCO's restval as its own split")


def _karpathy(prepare, args) -> dict:
    return prepare.prepare_karpathy(args.json, args.images, args.out, restval_to_train=not args.keep_restval)


def _fashion_mnist_arguments(d) -> None:
    d.add_argument("--source", help="folder with the IDX .gz files (default: the Debian package's, fetched if absent)")
    d.add_argument("--limit", type=int, help="at most this many images per split")


def _fashion_mnist(prepare, args) -> dict:
    return prepare.prepare_fashion_mnist(args.out, args.source, args.limit)


def _openmoji_arguments(d) -> None:
    d.add_argument("--source", help="unpacked npm package folder (default: npm pack into the cache)")
    d.add_argument("--size", type=int, default=64, help="PNG size in pixels")
    d.add_argument("--skin-tones", choices=("drop", "group", "keep"), default="drop",
                   help="skin-tone variants: drop them, group them with their base emoji, or keep each")
    d.add_argument("--test-fraction", type=float, default=0.2, help="share of concepts held out")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--limit", type=int, help="only the first N entries")


def _openmoji(prepare, args) -> dict:
    return prepare.prepare_openmoji(args.out, args.source, args.size, args.skin_tones, args.test_fraction, args.seed,
                                    args.limit)


def _webdataset_arguments(d) -> None:
    d.add_argument("--shards", required=True)
    d.add_argument("--test-fraction", type=float, default=0.1)
    d.add_argument("--seed", type=int, default=0)


def _webdataset(prepare, args) -> dict:
    return prepare.prepare_webdataset(args.shards, args.out, args.test_fraction, args.seed)


def _folder_arguments(d) -> None:
    d.add_argument("--images", required=True, help="image folder; the table's paths are relative to it")
    d.add_argument("--captions", required=True, help="the table")
    d.add_argument("--image-column", default="file_name")
    d.add_argument("--caption-columns", default="captions", help="comma-separated")
    d.add_argument("--test-fraction", type=float, default=0.1)
    d.add_argument("--seed", type=int, default=0)


def _folder(prepare, args) -> dict:
    columns = tuple(c.strip() for c in args.caption_columns.split(",") if c.strip())
    return prepare.prepare_folder(args.images, args.captions, args.out, args.image_column, columns,
                                  args.test_fraction, args.seed)


class PrepareDataset(NamedTuple):
    help: str
    example: str
    add_arguments: Callable  # the dataset's own arguments (every dataset takes --out)
    convert: Callable  # (vclr.data.prepare, args) -> {split: images written}


PREPARE_DATASETS = {
    "karpathy": PrepareDataset(
        "Flickr30k / COCO Karpathy split JSON + image folder",
        "vclr prepare karpathy --json dataset_flickr30k.json --images flickr30k-images --out data/f30k",
        _karpathy_arguments, _karpathy),
    "fashion-mnist": PrepareDataset(
        "Fashion-MNIST from Debian's dataset-fashion-mnist", "vclr prepare fashion-mnist --out data/fashion-mnist",
        _fashion_mnist_arguments, _fashion_mnist),
    "openmoji": PrepareDataset(
        "OpenMoji colour emoji (npm package openmoji) with name captions",
        "vclr prepare openmoji --out data/openmoji --size 64 --skin-tones drop", _openmoji_arguments, _openmoji),
    "webdataset": PrepareDataset(
        "a folder of webdataset .tar shards (key.jpg + key.txt/.json)",
        "vclr prepare webdataset --shards shards/ --out data/web", _webdataset_arguments, _webdataset),
    "folder": PrepareDataset(
        "a folder of images + a CSV/JSONL/parquet table of captions",
        "vclr prepare folder --images photos/ --captions captions.csv --out data/photos", _folder_arguments, _folder),
}


def add_prepare_arguments(p) -> None:
    datasets_sub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, dataset in PREPARE_DATASETS.items():
        d = add_command(datasets_sub, name, None, dataset.help, dataset.example)
        d.add_argument("--out", required=True)
        dataset.add_arguments(d)


def cmd_prepare(args) -> int:
    from vclr.data import prepare

    counts = PREPARE_DATASETS[args.dataset].convert(prepare, args)
    print(f"wrote {', '.join(f'{n} {split}' for split, n in counts.items())} images' metadata under {args.out}")
    return 0
