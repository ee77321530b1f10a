"""The one writer for everything durable: atomic files, and atomic directories with a checksum manifest.

    atomic_write_text(run_dir / "config.yaml", text)
    manifest = write_directory(index_dir, lambda tmp: np.save(tmp / "x.npy", x), "manifest.json", {"dim": 512})
    problem = directory_problem(index_dir, "manifest.json")      # None, or why it cannot be trusted

A file is written to a temp file beside it, fsynced, renamed over the old one, and the folder is fsynced. A
directory is written into a temp directory; then every file is fsynced, the manifest (`{"files": {relative path:
{"bytes", "sha256"}}, ...}`) is written last, the temp directory is fsynced and renamed into place (the previous
version is swapped out in one atomic exchange where the kernel offers it, else set aside first and removed after),
and the parent is fsynced. A crash at any moment leaves the previous version or the new one, never half of one; a
crash between the two renames of the fallback leaves the previous version set aside, and the next reader or writer
moves it back (`recover_set_aside`).

Temp and set-aside directories carry their writer's host and pid in their names (`.NAME.tmp-HOST-PID-XXXX`), so a
later writer or reader removes those of writers that died (SIGKILL, power cut), and never one that a live writer owns.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from vclr.errors import DiskFullError

logger = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"  # the manifest of a directory that has no manifest of its own (checkpoints)
_OWNED = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[^-]+)-(?P<pid>\d+)-[^-]+$")


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 4 MiB blocks (checkpoints and indexes record it to detect damage)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries (the names of files created or renamed in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename, fsync the folder: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------ directories


def _owner() -> str:
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def temp_dir(final: str | os.PathLike, purpose: str = "tmp") -> Path:
    """A new empty directory beside `final`, named for its owner: `.NAME.tmp-HOST-PID-XXXX`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{purpose}-{_owner()}-"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make published checkpoints and indexes private to their writer
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _dead_writers_dirs(parent: Path, name: str | None) -> list[tuple[Path, re.Match]]:
    """Temp and set-aside directories in `parent` (of `name`, or of any name) whose writer, on this host, has died.
    Only this host's are judged (a pid means nothing on another machine); a live writer's are never returned."""
    host = _owner().rsplit("-", 1)[0]
    found: list[tuple[Path, re.Match]] = []
    if not parent.is_dir():
        return found
    for entry in parent.iterdir():
        match = _OWNED.match(entry.name)
        if not match or (name is not None and match["name"] != name) or not entry.is_dir():
            continue
        if match["host"] == host and not _alive(int(match["pid"])):
            found.append((entry, match))
    return found


def _restore(set_aside: Path, final: Path) -> bool:
    """Move the previous version back from a dead writer's set-aside directory when `final` is missing (its writer
    died between setting it aside and renaming the new one into place). -> whether it did."""
    if final.exists() or not set_aside.name.startswith(f".{final.name}.old-") or not (set_aside / final.name).is_dir():
        return False
    os.replace(set_aside / final.name, final)
    fsync_path(final.parent)
    logger.warning("%s was missing after an interrupted save; restored its previous version", final)
    return True


def recover_set_aside(final: str | os.PathLike) -> bool:
    """Restore `final`'s previous version if an interrupted swap left it set aside. -> whether one was recovered."""
    final = Path(final)
    return not final.exists() and any(_restore(entry, final)
                                      for entry, _ in _dead_writers_dirs(final.parent, final.name))


def remove_stale_temp_dirs(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove temp and set-aside directories in `parent` (of `name`, or of any name) whose writer has died, after
    moving back any previous version that an interrupted swap left set aside (`_restore`)."""
    parent, removed = Path(parent), []
    for entry, match in _dead_writers_dirs(parent, name):
        _restore(entry, parent / match["name"])
        try:
            shutil.rmtree(entry)
            removed.append(entry)
        except OSError as e:  # a read-only mount: leave it, the data is intact either way
            logger.debug("could not remove stale %s: %s", entry, e)
    if removed:
        logger.info("removed %d temp dirs of interrupted saves in %s", len(removed), parent)
    return removed


def file_entries(folder: Path, skip: str) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `folder` except the manifest `skip`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != skip)
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def publish_directory(tmp: Path, final: Path, manifest_name: str = CHECKSUMS, manifest: dict | None = None) -> dict:
    """Checksum and fsync every file of `tmp`, write the manifest last, and swap `tmp` into place as `final`."""
    manifest = dict(manifest or {}, files=file_entries(tmp, manifest_name))
    for name in manifest["files"]:
        fsync_path(tmp / name)
    (tmp / manifest_name).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    fsync_path(tmp / manifest_name)
    for folder in sorted({(tmp / name).parent for name in manifest["files"]} | {tmp}):
        fsync_path(folder)
    _swap_into_place(tmp, final)
    fsync_path(final.parent)
    return manifest


_RENAME_EXCHANGE = 2  # linux/fs.h


@functools.cache
def _renameat2():
    """libc's renameat2, looked up once; None where libc has none (not Linux, or glibc before 2.28)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). -> False where the kernel, libc
    or file system does not offer it."""
    renameat2, at_fdcwd = _renameat2(), -100
    return renameat2 is not None and renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                                               _RENAME_EXCHANGE) == 0


def _swap_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):  # no moment without `final`; `tmp` now holds the previous version
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = temp_dir(final, "old")
    os.replace(final, old / final.name)  # two renames: the old version survives until the new one is in place
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_directory(final: str | os.PathLike, write_files: Callable[[Path], None], manifest_name: str = CHECKSUMS,
                    manifest: dict | None = None, expected_bytes: int = 0) -> dict:
    """`write_files(tmp)` fills a temp directory, which then replaces `final` atomically. -> the manifest written.
    A disk that fills part-way raises DiskFullError saying how much the new version needs (`expected_bytes`, or
    what was written plus the previous version's size), with the previous version untouched."""
    final = Path(final)
    remove_stale_temp_dirs(final.parent, final.name)
    tmp = temp_dir(final)
    try:
        write_files(tmp)
        return publish_directory(tmp, final, manifest_name, manifest)
    except BaseException as e:
        full = _disk_full(e, final.parent)
        written = _tree_bytes(tmp) if full else 0  # before the temp directory goes
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            needed = max(expected_bytes, written + (_tree_bytes(final) if final.is_dir() else 0))
            raise DiskFullError(f"no space left on the disk of {final.parent} while writing {final.name} (after "
                                f"{written / 1e6:.1f} MB): it needs about {needed / 1e6:.1f} MB and "
                                f"{shutil.disk_usage(final.parent).free / 1e6:.1f} MB are free; the previous version "
                                "is intact. Free some space or write elsewhere") from e
        raise


def _disk_full(error: BaseException, folder: Path) -> bool:
    """ENOSPC anywhere in the chain, or a writer that words it its own way (SQLite, FAISS) on a disk with no room."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(error, Exception):
        return False
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _tree_bytes(folder: Path) -> int:
    try:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    except OSError:
        return 0


def read_manifest(folder: Path, manifest_name: str = CHECKSUMS) -> dict:
    return json.loads((folder / manifest_name).read_text(encoding="utf-8"))


def directory_problem(folder: str | os.PathLike, manifest_name: str = CHECKSUMS, checksums: bool = True,
                      manifest: dict | None = None) -> str | None:
    """Why a published directory cannot be trusted (no or unreadable manifest, a file missing, of the wrong size or
    not matching its checksum), or None. Sizes are always checked; `checksums=False` skips reading every byte."""
    folder = Path(folder)
    if manifest is None:
        if not (folder / manifest_name).is_file():
            return f"no {manifest_name}"
        try:
            manifest = read_manifest(folder, manifest_name)
        except ValueError:
            return f"unreadable {manifest_name}"
    for name, expected in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != expected["bytes"]:
            return f"{name} is missing or has the wrong size"
        if checksums and sha256_file(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None
