"""Training on a dataset with missing, unreadable and caption-less rows: skipped, counted, no crash."""

import json
import logging
import shutil

import pytest
from helpers import train_overrides

from vclr.config import load_config
from vclr.train.loop import train


def _broken_copy(src, dst, count=80):
    dst.mkdir()
    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()][:count]
    for row in rows:
        shutil.copy(src / row["file_name"], dst / row["file_name"])
    (dst / rows[0]["file_name"]).unlink()  # missing
    (dst / rows[1]["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # unreadable
    (dst / rows[2]["file_name"]).write_bytes(b"")  # zero bytes
    rows[3]["captions"] = []  # no caption
    (dst / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


@pytest.mark.parametrize("cache_images", [True, False])
def test_training_skips_bad_rows_with_counts(small_shapes, tmp_path, caplog, cache_images):
    data = _broken_copy(small_shapes / "train", tmp_path / "train")
    overrides = train_overrides(small_shapes, tmp_path / "run", **{
        "data.train": data, "data.batch_size": 16, "optim.max_steps": 3, "optim.warmup_steps": 1,
        "train.checkpoint_every": 3, "data.cache_images": cache_images})
    with caplog.at_level(logging.WARNING):
        result = train(load_config(None, overrides))
    assert result.step == 3 and (tmp_path / "run" / "model.safetensors").is_file()
    assert "skipped 1 rows (missing image file)" in caplog.text
    assert "skipped 1 rows (no caption)" in caplog.text
    assert caplog.text.count("unreadable image") >= 2  # each broken file named in a warning
    if cache_images:
        assert "skipped 2 unreadable images" in caplog.text
    assert "'unreadable image': 2" in caplog.text  # the end-of-training summary
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["skipped_or_repaired"] == {"missing image file": 1, "no caption": 1, "unreadable image": 2}
    # cached: the unreadable rows are dropped up front; read lazily, they are skipped from the batches they fall in
    assert report["usable_pairs"] == (76 if cache_images else 78)
