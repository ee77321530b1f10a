"""Reliability: SIGKILL at random moments of a training run, damaged checkpoints, hostile data, out-of-memory and
out-of-disk errors, and determinism."""

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_overrides
from PIL import Image
from safetensors.torch import load_file

import vclr.rundir as rundir
import vclr.train.loop as train_mod
from vclr.cli import main
from vclr.config import load_config
from vclr.data.images import MAX_IMAGE_PIXELS, read_image

ROOT = Path(__file__).resolve().parent.parent


# -------------------------------------------------------------------------------------------- kill at any moment


def _train_cmd(data: Path, run: Path, resume: bool) -> list[str]:
    overrides = train_overrides(data, run, **{"optim.max_steps": 24, "optim.warmup_steps": 4,
                                              "train.checkpoint_every": 2, "train.keep_checkpoints": 2,
                                              "train.log_every": 1, "train.threads": 1})
    return [sys.executable, "-m", "vclr.cli", "-q", "train", *overrides, *(["--resume"] if resume else [])]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _kill_when(proc: subprocess.Popen, run: Path, mode: str, rng: random.Random) -> str:
    """SIGKILL at a random time, or right as a checkpoint is being written (its temp dir exists)."""
    deadline = time.monotonic() + (rng.uniform(3.0, 9.0) if mode == "random" else 30.0)
    while time.monotonic() < deadline and proc.poll() is None:
        if mode == "checkpoint" and list((run / "checkpoints").glob(".step_*.tmp-*")):
            break
        time.sleep(0.002)
    if proc.poll() is not None:
        return "finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return mode


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(small_shapes, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(small_shapes, reference, False), env=_env(), check=True, capture_output=True)

    run, rng, kills = tmp_path / "killed", random.Random(7), []
    for attempt in range(8):  # 8 kills: half at random moments, half in the middle of a checkpoint write
        proc = subprocess.Popen(_train_cmd(small_shapes, run, resume=attempt > 0), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        outcome = _kill_when(proc, run, "checkpoint" if attempt % 2 else "random", rng)
        if outcome == "finished":
            break
        kills.append(outcome)
        for ckpt in rundir.checkpoints(run):  # never a half-written checkpoint under a final name
            assert rundir.checkpoint_problem(ckpt) is None, ckpt
    subprocess.run(_train_cmd(small_shapes, run, True), env=_env(), check=True, capture_output=True)

    assert len(kills) >= 6 and "checkpoint" in kills, kills
    # the temp dirs of checkpoints whose writer was killed are gone after the next successful save
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # every step logged once, none lost, none doubled
    final, expected = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_to_the_previous_one(small_shapes, tmp_path, caplog):
    overrides = train_overrides(small_shapes, tmp_path / "run", **{"optim.max_steps": 6, "optim.warmup_steps": 1,
                                                                   "train.checkpoint_every": 3, "train.log_every": 1})
    train_mod.train(load_config(None, overrides))
    newest = rundir.latest_checkpoint(tmp_path / "run")
    weights = next(p for p in newest.iterdir() if p.name.startswith("model"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "does not match its checksum" in rundir.checkpoint_problem(newest)
    result = train_mod.train(load_config(None, [*overrides, "optim.max_steps=8"]), resume=True)
    assert result.step == 8
    assert "damaged" in caplog.text and "step_0000006" in caplog.text
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # steps 4-6 were trained again from step 3, and logged once


# ------------------------------------------------------------------------------------------------- hostile data


def _png(mode="RGB", size=(32, 32), **kw) -> bytes:
    buffer = io.BytesIO()
    if mode == "I;16":
        image = Image.fromarray(np.full(size, 40000, dtype=np.uint16))
    elif mode == "PA":
        image = Image.new("P", size, 3)
        image.info["transparency"] = 3
    else:
        color = {"RGB": (200, 40, 40), "RGBA": (10, 200, 30, 0), "1": 1}.get(mode, 120)
        image = Image.new(mode, size, color)
    image.save(buffer, "PNG", **kw)
    return buffer.getvalue()


def _jpeg(mode="RGB", size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(len(mode))
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


HOSTILE = {  # name: (file bytes or None, caption(s), how the loader must treat it)
    "truncated_jpeg": (lambda r: _jpeg()[: r.randint(200, 600)], ["a truncated photo"], "unreadable"),
    "zero_byte": (lambda r: b"", ["an empty file"], "unreadable"),
    "not_an_image": (lambda r: b"%PDF-1.4 this is not an image " * r.randint(1, 50), ["a document"], "unreadable"),
    "garbage_with_jpeg_magic": (lambda r: b"\xff\xd8\xff" + r.randbytes(300), ["noise"], "unreadable"),
    "cmyk_jpeg": (lambda r: _jpeg("CMYK"), ["a cmyk image"], "used"),
    "grayscale_png": (lambda r: _png("L"), ["a gray square"], "used"),
    "png_16_bit": (lambda r: _png("I;16"), ["a 16-bit image"], "used"),
    "palette_alpha_png": (lambda r: _png("PA"), ["a palette image"], "used"),
    "rgba_png": (lambda r: _png("RGBA"), ["a transparent image"], "used"),
    "decompression_bomb": (lambda r: _png("1", size=(9000, 8000)), ["a bomb"], "unreadable"),
    "enormous_caption": (lambda r: _png(), ["word " * 400_000], "truncated"),
    "empty_caption": (lambda r: _png(), ["   "], "no caption"),
    "caption_without_image": (None, ["a caption whose image does not exist"], "missing image file"),
}


def _hostile_dataset(folder: Path, seed: int, good: Path) -> dict:
    """Good rows from a clean dataset plus every hostile case (random variants), as an imagefolder split."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    rows = []
    for row in map(json.loads, (good / "metadata.jsonl").read_text().splitlines()[:96]):
        shutil.copy(good / row["file_name"], folder / row["file_name"])
        rows.append(json.dumps(row))
    for name, (make, captions, _) in HOSTILE.items():
        file_name = f"{name}.{'jpg' if 'jpeg' in name or name == 'not_an_image' else 'png'}"
        if make is not None:
            (folder / file_name).write_bytes(make(rng))
        rows.insert(rng.randint(0, len(rows)), json.dumps({"file_name": file_name, "captions": captions}))
    duplicate = json.loads(rows[0])
    rows.append(json.dumps({"file_name": duplicate["file_name"], "captions": ["the same image, listed again"]}))
    rows.append('{"file_name": "broken json line", "captions": [')
    lines = [line.encode() for line in rows]
    lines.insert(rng.randint(0, len(lines)), b'{"file_name": "' + rng.randbytes(3).replace(b'"', b"x") +
                 b'\xff\xfe.png", "captions": ["non-utf-8 name"]}')
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {"good": 96}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_hostile_data_is_skipped_counted_and_training_runs(small_shapes, tmp_path, seed):
    data = tmp_path / "data"
    _hostile_dataset(data / "train", seed, small_shapes / "train")
    run = tmp_path / "run"
    overrides = train_overrides(data, run, **{"optim.max_steps": 4, "optim.warmup_steps": 1, "data.batch_size": 16,
                                              "train.checkpoint_every": 4, "data.test": ""})
    assert main(["-q", "train", *overrides]) == 0
    report = json.loads((run / "data_report.json").read_text())
    skipped = report["skipped_or_repaired"]
    unreadable = sum(1 for *_, how in HOSTILE.values() if how == "unreadable")
    assert skipped["unreadable image"] == unreadable
    assert skipped["no caption"] == 1 and skipped["caption truncated"] == 1
    assert skipped["missing image file"] == 2  # the caption without an image, and the non-UTF-8 name
    assert skipped["duplicate image row (captions merged)"] == 1
    assert skipped["malformed metadata line"] == 1 and skipped["non-UTF-8 bytes in metadata (replaced)"] == 1
    used = sum(1 for *_, how in HOSTILE.values() if how in ("used", "truncated"))
    assert report["usable_pairs"] == 96 + used


def test_image_modes_decode_to_sensible_rgb(tmp_path):
    cases = {"png_16_bit": (_png("I;16"), 40000 / 256), "grayscale": (_png("L"), 120), "cmyk": (_jpeg("CMYK"), None)}
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        image = read_image(str(tmp_path / name))
        assert image is not None and image.mode == "RGB", name
        if expected is not None:
            assert abs(np.asarray(image).mean() - expected) < 2, name
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png("1", size=(9000, 8000)))
    assert 9000 * 8000 > MAX_IMAGE_PIXELS and read_image(str(bomb)) is None


# ---------------------------------------------------------------------------------------------- resource limits


def test_out_of_memory_is_one_line_with_advice(small_shapes, tmp_path, monkeypatch, capsys):
    def oom(trainer, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_mod, "train_step", oom)
    code = main(["train", *train_overrides(small_shapes, tmp_path / "run", **{"optim.max_steps": 2,
                                                                              "optim.warmup_steps": 1})])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("vclr: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    err = errors[0]
    assert "ran out of memory" in err and "train.grad_cache_chunk=16" in err and "data.batch_size=64" in err


def test_index_that_does_not_fit_on_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import vclr.index.format as index_mod
    from vclr.errors import IndexDirError
    from vclr.index.format import RetrievalIndex

    emb = np.eye(8, dtype=np.float32)
    index = RetrievalIndex.build(emb, emb, np.arange(8), [f"{i}.png" for i in range(8)], [str(i) for i in range(8)])
    index.save(tmp_path / "idx")
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(index_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(IndexDirError, match="not enough disk space"):
        index.save(tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert RetrievalIndex.load(tmp_path / "idx").manifest["num_images"] == 8


def _small_index(n: int = 8, d: int = 8):
    from vclr.index.format import RetrievalIndex

    emb = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
    return RetrievalIndex.build(emb, emb, np.arange(n), [f"{i}.png" for i in range(n)], [str(i) for i in range(n)])


# each writer a save goes through, and how it words a full disk: an errno, or a message of its own on a full disk
_WRITERS = [("faiss", "write_index", RuntimeError("Error in faiss::FileIOWriter: write error")),
            ("np", "save", OSError(28, "No space left on device")),
            ("store", "save_to", __import__("sqlite3").OperationalError("database or disk is full")),
            ("manifest", "write_text", OSError(28, "No space left on device"))]


@pytest.mark.parametrize("writer,call", [(w, c) for w in range(len(_WRITERS)) for c in (0, 1)])
def test_a_disk_that_fills_at_any_write_leaves_the_previous_index(tmp_path, monkeypatch, writer, call):
    import faiss

    import vclr.index.format as index_mod
    import vclr.storage as storage
    from vclr.errors import DiskFullError
    from vclr.index.format import RetrievalIndex
    from vclr.index.metadata import MetadataStore

    _small_index(8).save(tmp_path / "idx")
    bigger = _small_index(12)
    name, method, error = _WRITERS[writer]
    owner = {"faiss": faiss, "np": index_mod.np, "store": MetadataStore, "manifest": Path}[name]
    real, calls = getattr(owner, method), []

    def fills_up(*args, **kwargs):
        if name == "manifest" and not str(args[0]).endswith("manifest.json"):
            return real(*args, **kwargs)
        calls.append(1)
        if len(calls) == call + 1:
            monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, method, fills_up)
    monkeypatch.setattr(RetrievalIndex, "_check_disk_space", lambda self, folder: None)  # it guessed wrong
    if name in ("store", "manifest") and call == 1:  # these write once a save: the second call never comes
        bigger.save(tmp_path / "idx")
        assert RetrievalIndex.load(tmp_path / "idx").manifest["num_images"] == 12
        return
    with pytest.raises(DiskFullError, match=r"needs about [\d.]+ MB .*the previous version is intact"):
        bigger.save(tmp_path / "idx")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp directory left behind
    assert RetrievalIndex.load(tmp_path / "idx").manifest["num_images"] == 8


def test_an_error_that_is_not_a_full_disk_keeps_its_own_kind(tmp_path, monkeypatch):
    import vclr.index.format as index_mod

    index = _small_index(8)
    monkeypatch.setattr(index_mod.np, "save", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(PermissionError):
        index.save(tmp_path / "idx")


def test_a_real_full_file_system_leaves_the_previous_index(tmp_path, monkeypatch):
    """A 2 MB tmpfs (where this test may mount one): the save fails part-way for real."""
    import subprocess

    from vclr.errors import DiskFullError
    from vclr.index.format import RetrievalIndex

    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        monkeypatch.setattr(RetrievalIndex, "_check_disk_space", lambda self, folder: None)  # it asks 64 MB spare
        _small_index(100, 64).save(small / "idx")
        with pytest.raises(DiskFullError, match="needs about"):
            _small_index(3000, 64).save(small / "idx")  # ~3 MB of vectors and index: does not fit
        assert RetrievalIndex.load(small / "idx").manifest["num_images"] == 100
        assert [p.name for p in small.iterdir()] == ["idx"]
    finally:
        subprocess.run(["umount", str(small)], check=False)


# ------------------------------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_same_seed_same_data_model_and_metrics(tmp_path):
    def pipeline(folder: Path, seed: int) -> tuple:
        assert main(["-q", "make-synthetic", "--out", str(folder / "data"), "--train", "200", "--test", "40",
                     "--seed", str(seed)]) == 0
        overrides = train_overrides(folder / "data", folder / "run", **{"optim.max_steps": 10,
                                                                        "optim.warmup_steps": 2,
                                                                        "data.batch_size": 32,
                                                                        "train.seed": seed, "train.log_every": 1})
        assert main(["-q", "train", *overrides]) == 0
        assert main(["-q", "eval", "--run", str(folder / "run"), "--no-plots"]) == 0
        losses = [json.loads(line)["loss"] for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
        report = json.loads((folder / "run" / "eval-data-test.json").read_text())  # named by the dataset
        return losses, report["metrics"], report["dataset_fingerprint"], report["verification"]

    first, second, other = pipeline(tmp_path / "a", 5), pipeline(tmp_path / "b", 5), pipeline(tmp_path / "c", 6)
    assert first == second  # identical, not merely close
    assert first[0] != other[0] and first[2] != other[2]  # and the seed does matter
