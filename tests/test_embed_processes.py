"""`accelerate launch --num_processes 2 -m vclr.cli index ...`: two CPU processes (gloo) embed their shares and give
the same index (ids, paths, captions, vectors) as one process, for a fresh build and for an update."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO_ROOT, TINY_MODEL, free_port, photo_folder

from vclr.cli import main
from vclr.index.format import RetrievalIndex


def _two_processes(argv: list[str]) -> None:
    # the torchrun launcher (--multi_gpu) with ACCELERATE_USE_CPU=1 starts two CPU processes on gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--gpu_ids", "all", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "vclr.cli", "-q", *argv]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _assert_same_index(a, b) -> None:
    a, b = RetrievalIndex.load(a), RetrievalIndex.load(b)
    assert a.image_paths == b.image_paths and a.texts == b.texts
    assert np.array_equal(a.caption_image, b.caption_image)
    assert np.array_equal(a.store.deleted_ids("images"), b.store.deleted_ids("images"))
    np.testing.assert_allclose(a.image_embeddings, b.image_embeddings, atol=1e-5)
    np.testing.assert_allclose(a.text_embeddings, b.text_embeddings, atol=1e-5)
    assert sorted(a.manifest["unreadable_files"]) == sorted(b.manifest["unreadable_files"])


@pytest.mark.slow
def test_two_processes_index_as_one(checkpoint, tmp_path):  # noqa: F811
    root = tmp_path / "photos"
    paths = photo_folder(root, count=23)  # odd: the processes get unequal shares
    paths[3].with_suffix(".txt").write_text("a caption\nanother caption\n")
    paths[20].with_suffix(".txt").write_text("the last caption\n")
    (root / "broken.jpg").write_bytes(b"not an image")
    flags = ["--model", TINY_MODEL, "--pretrained", str(checkpoint), "--data", str(root), "--batch-size", "4"]
    assert main(["index", *flags, "--out", str(tmp_path / "one")]) == 0
    _two_processes(["index", *flags, "--out", str(tmp_path / "two")])
    _assert_same_index(tmp_path / "one", tmp_path / "two")
    assert not list(tmp_path.glob(".*.embed-shards"))  # the scratch shards are gone

    photo_folder(root / "more", count=9, start=50)  # an update: new files embedded across the processes
    paths[0].unlink()
    assert main(["index", *flags, "--out", str(tmp_path / "one")]) == 0
    _two_processes(["index", *flags, "--out", str(tmp_path / "two")])
    _assert_same_index(tmp_path / "one", tmp_path / "two")

    # shards larger than the RAM allowance are assembled in a memory-mapped file: the same index
    _two_processes(["index", *flags, "--out", str(tmp_path / "mapped"), "--max-ram-gb", "0"])
    assert main(["index", *flags, "--out", str(tmp_path / "fresh"), "--max-ram-gb", "0"]) == 0
    _assert_same_index(tmp_path / "fresh", tmp_path / "mapped")
    assert not list(tmp_path.glob(".*.embed-shards")) and not list(tmp_path.glob(".*.embeddings"))
