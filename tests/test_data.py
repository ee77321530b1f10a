"""Synthetic data generation and dataset loading, including bad rows."""

import json

import datasets
import pytest
import torch

from vclr.config import ModelConfig
from vclr.data.dataset import ImageTextDataset, load_caption_table
from vclr.data.synthetic import make_synthetic
from vclr.errors import DataError
from vclr.model.build import get_tokenizer


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("shapes"), num_train=40, num_test=12, seed=3)


def test_synthetic_is_deterministic_and_unique(shapes, tmp_path):
    again = make_synthetic(tmp_path / "again", num_train=40, num_test=12, seed=3)
    for split in ("train", "test"):
        assert (shapes / split / "metadata.jsonl").read_bytes() == (again / split / "metadata.jsonl").read_bytes()
        assert (shapes / split / "000005.png").read_bytes() == (again / split / "000005.png").read_bytes()
    other = make_synthetic(tmp_path / "other", num_train=40, num_test=12, seed=4)
    assert (other / "train" / "metadata.jsonl").read_bytes() != (shapes / "train" / "metadata.jsonl").read_bytes()
    rows = [json.loads(line) for split in ("train", "test")
            for line in (shapes / split / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 52
    assert all(2 <= len(r["captions"]) <= 5 and len(set(r["captions"])) == len(r["captions"]) for r in rows)


def test_synthetic_is_a_standard_imagefolder(shapes):
    ds = datasets.load_dataset("imagefolder", data_dir=str(shapes))
    assert set(ds) == {"train", "test"}
    assert len(ds["train"]) == 40 and len(ds["test"]) == 12
    row = ds["test"][0]
    assert row["image"].size == (64, 64)
    assert isinstance(row["captions"], list) and row["captions"]


def test_load_table_and_dataset(shapes):
    table = load_caption_table(shapes / "test")
    assert len(table) == 12
    texts, t2i = table.flat_captions()
    assert len(texts) == len(t2i) == sum(len(c) for c in table.captions)
    ds = ImageTextDataset(table, get_tokenizer(ModelConfig()), 64, seed=0)
    image, tokens, _, _ = ds[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert tokens.shape == (32,)
    # caption choice: deterministic per (seed, epoch, index), and it varies across epochs
    picks = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        picks.append(ds.caption_index(3))
        assert ds.caption_index(3) == picks[-1]
    assert len(set(picks)) > 1


def _write_table(folder, rows, name="metadata.jsonl"):
    with open(folder / name, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_missing_and_unreadable_images_are_skipped_and_counted(shapes, tmp_path, caplog):
    rows = [json.loads(line) for line in (shapes / "train" / "metadata.jsonl").read_text().splitlines()][:10]
    for row in rows:
        (tmp_path / row["file_name"]).write_bytes((shapes / "train" / row["file_name"]).read_bytes())
    (tmp_path / rows[2]["file_name"]).unlink()  # missing file
    (tmp_path / rows[4]["file_name"]).write_bytes(b"not a png at all")  # unreadable
    rows[6]["captions"] = ["", "  "]  # no usable caption
    _write_table(tmp_path, rows)
    table = load_caption_table(tmp_path)
    assert len(table) == 8
    assert table.skipped == {"missing image file": 1, "no caption": 1}
    ds = ImageTextDataset(table, get_tokenizer(ModelConfig()), 64)
    assert len(ds) == 7
    assert ds.table.skipped["unreadable image"] == 1
    assert len(ds.tokens) == sum(len(c) for c in ds.table.captions)
    assert "skipped 1 unreadable images" in caplog.text
    # lazy decoding: the unreadable item becomes None and collate drops it
    lazy = ImageTextDataset(table, get_tokenizer(ModelConfig()), 64, cache_images=False)
    bad = table.image_paths.index(str((tmp_path / rows[4]["file_name"]).resolve()))
    assert lazy[bad] is None


def test_csv_with_several_caption_columns(shapes, tmp_path):
    src = shapes / "test"
    lines = ["path,short,long"]
    for i in range(5):
        lines.append(f"{src / f'{i:06d}.png'},cap {i},longer caption {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    table = load_caption_table(tmp_path / "pairs.csv", image_column="path", caption_columns=("short", "long"))
    assert table.captions[2] == ["cap 2", "longer caption 2"]


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "has no metadata.jsonl"),
    (lambda p: p / "nope.jsonl", "does not exist"),
])
def test_bad_sources_give_clear_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_caption_table(make(tmp_path))


def test_missing_column_is_named(shapes):
    with pytest.raises(DataError, match="has no column 'text'"):
        load_caption_table(shapes / "test", caption_columns=("text",))
