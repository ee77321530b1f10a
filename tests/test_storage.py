"""The one durable writer: atomic directories with a checksum manifest, and cleanup of dead writers' temp dirs."""

import json
import os
import subprocess
import sys

import pytest

from vclr import storage
from vclr.storage import (
    atomic_write_text,
    directory_problem,
    recover_set_aside,
    remove_stale_temp_dirs,
    temp_dir,
    write_directory,
)


def _this_host() -> str:
    """The host part of the names this machine's writers give their temp dirs (`.NAME.tmp-HOST-PID-XXXX`)."""
    return storage._owner().rsplit("-", 1)[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_directory_round_trip_with_manifest_and_nested_files(tmp_path):
    def write(tmp):
        (tmp / "a.bin").write_bytes(b"abc")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("hello")

    manifest = write_directory(tmp_path / "out", write, "manifest.json", {"version": 3})
    assert manifest["version"] == 3 and set(manifest["files"]) == {"a.bin", "sub/b.txt"}
    assert manifest["files"]["a.bin"]["bytes"] == 3
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert directory_problem(tmp_path / "out", "manifest.json") is None
    (tmp_path / "out" / "sub" / "b.txt").write_text("hellO")
    assert directory_problem(tmp_path / "out", "manifest.json") == "sub/b.txt does not match its checksum"
    assert directory_problem(tmp_path / "out", "manifest.json", checksums=False) is None  # same size
    (tmp_path / "out" / "a.bin").unlink()
    assert "a.bin is missing" in directory_problem(tmp_path / "out", "manifest.json")
    assert directory_problem(tmp_path, "manifest.json") == "no manifest.json"


def test_replacing_keeps_the_old_version_when_writing_fails(tmp_path):
    write_directory(tmp_path / "out", lambda tmp: (tmp / "v").write_text("1"))

    def crash(tmp):
        (tmp / "v").write_text("2")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_directory(tmp_path / "out", crash)
    assert (tmp_path / "out" / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the failed temp dir went with the error
    write_directory(tmp_path / "out", lambda tmp: (tmp / "v").write_text("3"))
    assert (tmp_path / "out" / "v").read_text() == "3" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_only_dead_writers_temp_dirs_are_removed(tmp_path):
    live = temp_dir(tmp_path / "idx")  # ours: this process is alive
    host = _this_host()
    dead_tmp = tmp_path / f".idx.tmp-{host}-{_dead_pid()}-abc123"
    dead_old = tmp_path / f".idx.old-{host}-{_dead_pid()}-xyz_9"
    other_host = tmp_path / f".idx.tmp-elsewhere-{_dead_pid()}-abc"  # a pid of another machine proves nothing
    other_name = tmp_path / f".run.tmp-{host}-{_dead_pid()}-abc"
    for folder in (dead_tmp, dead_old, other_host, other_name):
        folder.mkdir()
    removed = remove_stale_temp_dirs(tmp_path, "idx")
    assert sorted(removed) == sorted([dead_tmp, dead_old])
    assert live.is_dir() and other_host.is_dir() and other_name.is_dir()
    assert remove_stale_temp_dirs(tmp_path) == [other_name]  # any name


def test_a_failed_save_is_cleaned_by_the_next_one(tmp_path):
    """What a SIGKILL leaves (a temp dir of a dead pid) is removed by the next save of the same directory."""
    write_directory(tmp_path / "out", lambda tmp: (tmp / "v").write_text("1"))
    stale = tmp_path / f".out.tmp-{_this_host()}-{_dead_pid()}-zz"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"\0" * 10)
    write_directory(tmp_path / "out", lambda tmp: (tmp / "v").write_text("2"))
    assert not stale.exists()


def test_atomic_text_replaces_whole_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "f.txt", "one")
    atomic_write_text(tmp_path / "a" / "f.txt", "two")
    assert (tmp_path / "a" / "f.txt").read_text() == "two" and len(list((tmp_path / "a").iterdir())) == 1


def test_replacing_swaps_in_one_atomic_exchange(tmp_path, monkeypatch):
    """On Linux the new version is exchanged with the old in one renameat2 call: `final` never goes missing (the
    two-rename fallback has a moment without it), and nothing is left beside it."""
    write_directory(tmp_path / "out", lambda tmp: (tmp / "v").write_text("1"))
    renames, real_replace = [], os.replace
    monkeypatch.setattr(storage.os, "replace", lambda a, b: renames.append((a, b)) or real_replace(a, b))
    write_directory(tmp_path / "out", lambda tmp: (tmp / "v").write_text("2"))
    assert renames == [] and (tmp_path / "out" / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _set_aside_by_a_killed_writer(tmp_path, name="out", version="1"):
    """What the two-rename fallback leaves when its writer is SIGKILLed between the renames: no `name`, the previous
    version inside `.NAME.old-HOST-DEADPID-X`, the new one complete in a temp dir."""
    write_directory(tmp_path / name, lambda tmp: (tmp / "v").write_text(version))
    host, pid = _this_host(), _dead_pid()
    old = tmp_path / f".{name}.old-{host}-{pid}-ab"
    old.mkdir()
    os.replace(tmp_path / name, old / name)
    (tmp_path / f".{name}.tmp-{host}-{pid}-cd").mkdir()


def test_a_version_set_aside_by_a_killed_swap_is_restored(tmp_path):
    _set_aside_by_a_killed_writer(tmp_path)
    assert not (tmp_path / "out").exists()
    assert recover_set_aside(tmp_path / "out")
    assert (tmp_path / "out" / "v").read_text() == "1" and directory_problem(tmp_path / "out") is None
    assert not recover_set_aside(tmp_path / "out")  # present: nothing to do
    # the next writer restores it too, before removing what the dead writer left
    _set_aside_by_a_killed_writer(tmp_path / "w")
    write_directory(tmp_path / "w" / "other", lambda tmp: (tmp / "v").write_text("x"))
    remove_stale_temp_dirs(tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["other", "out"]
    assert (tmp_path / "w" / "out" / "v").read_text() == "1"


def test_a_live_writers_set_aside_version_is_left_alone(tmp_path):
    """A live writer between its renames owns its set-aside version: a reader must not move it back under it."""
    write_directory(tmp_path / "out", lambda tmp: (tmp / "v").write_text("1"))
    old = temp_dir(tmp_path / "out", "old")  # this (live) process
    os.replace(tmp_path / "out", old / "out")
    assert not recover_set_aside(tmp_path / "out") and (old / "out").is_dir()
