"""Metadata of an index: item id -> image path / caption, and each image's facts, in SQLite (stdlib; fast at 1M rows).

Ids are row positions in the index's embedding arrays: images 0..N-1, captions 0..C-1, append-only. A deleted item
keeps its id and is marked, so ids never shift under a client that holds them.

Each image row also holds what a search filter asks (vclr.data.images.image_facts): its folder relative to the
collection, file type, size, pixel size and the date it was taken; `select_images` turns a `where` into the ids
that match, in SQL. And the SHA-256 of the file's bytes (`hash`), by which a re-index knows a moved, renamed or
copied file without embedding it again (vclr.index.build).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (id INTEGER PRIMARY KEY, path TEXT NOT NULL, deleted INTEGER DEFAULT 0,
                                   state TEXT);
CREATE TABLE IF NOT EXISTS texts (id INTEGER PRIMARY KEY, text TEXT NOT NULL, image_id INTEGER NOT NULL,
                                  deleted INTEGER DEFAULT 0);
CREATE INDEX IF NOT EXISTS texts_by_image ON texts (image_id);
CREATE VIRTUAL TABLE IF NOT EXISTS image_words USING fts5 (words, tokenize = 'unicode61 remove_diacritics 2');
"""  # image_words: the text OCR read in each image (rowid = image id; "" when it read none)


class MetadataStore:
    def __init__(self, path: str | Path = ":memory:", read_only: bool = False):
        uri = f"file:{path}?mode=ro" if read_only else str(path)
        self.db = sqlite3.connect(uri, uri=read_only, check_same_thread=False)
        # counts and deleted ids are asked for on every search: scanning 1M rows each time cost ~30 ms a query
        self._cached: dict[tuple[str, str], object] = {}
        if not read_only:
            self.db.executescript(SCHEMA)
            self.upgrade()

    def upgrade(self) -> None:
        """Columns that older stores lack: `state` (a file's size and mtime, for incremental re-indexing; vclr <= 0.1)
        the content hash and the image facts (filled on the next `vclr index`, without embedding again)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(images)")}
        with self.db:
            for name, kind in (("state", "TEXT"), ("hash", "TEXT"), *FACT_COLUMNS.items()):
                if name not in columns:
                    self.db.execute(f"ALTER TABLE images ADD COLUMN {name} {kind}")

    # ------------------------------------------------------------------------------------------------- writing

    def add_images(self, paths: Sequence[str], states: Sequence[str | None] | None = None) -> np.ndarray:
        start = self.count("images")
        states = states if states is not None else [None] * len(paths)
        self._cached.clear()
        with self.db:
            self.db.executemany("INSERT INTO images (id, path, state) VALUES (?, ?, ?)",
                                ((start + i, str(p), s) for i, (p, s) in enumerate(zip(paths, states))))
        return np.arange(start, start + len(paths), dtype=np.int64)

    def add_texts(self, texts: Sequence[str], image_ids: Sequence[int]) -> np.ndarray:
        start = self.count("texts")
        self._cached.clear()
        with self.db:
            self.db.executemany("INSERT INTO texts (id, text, image_id) VALUES (?, ?, ?)",
                                ((start + i, t, int(m)) for i, (t, m) in enumerate(zip(texts, image_ids))))
        return np.arange(start, start + len(texts), dtype=np.int64)

    def set_facts(self, ids: Sequence[int], facts: Sequence[dict]) -> None:
        """Each image's facts (vclr.data.images.image_facts)."""
        names = list(FACT_COLUMNS)
        with self.db:
            self.db.executemany(f"UPDATE images SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
                                ([f.get(n) for n in names] + [int(i)] for i, f in zip(ids, facts)))

    def set_hashes(self, ids: Sequence[int], hashes: Sequence[str | None]) -> None:
        with self.db:
            self.db.executemany("UPDATE images SET hash = ? WHERE id = ?", ((h, int(i)) for i, h in zip(ids, hashes)))

    def move_image(self, image_id: int, path: str, state: str) -> None:
        """The same content (and vector) now lives at another path: the id, its captions and its vector stay."""
        with self.db:
            self.db.execute("UPDATE images SET path = ?, state = ? WHERE id = ?", (str(path), state, int(image_id)))

    def set_words(self, ids: Sequence[int], words: Sequence[str]) -> None:
        """The text read in each image (OCR), full-text indexed (SQLite FTS5)."""
        with self.db:
            self.db.executemany("DELETE FROM image_words WHERE rowid = ?", ((int(i),) for i in ids))
            self.db.executemany("INSERT INTO image_words (rowid, words) VALUES (?, ?)",
                                ((int(i), w) for i, w in zip(ids, words)))

    def without_words(self) -> list[tuple[int, str]]:
        """(id, path) of the live images not read by OCR yet."""
        return self.db.execute("SELECT id, path FROM images WHERE deleted = 0 AND id NOT IN "
                               "(SELECT rowid FROM image_words) ORDER BY id").fetchall()

    def match_words(self, text: str, limit: int) -> list[tuple[int, str]]:
        """Live images whose OCR text holds every word of `text`, best first (FTS5's BM25): (id, the matched
        words in context, marked [like this])."""
        terms = re.findall(r"\w+", text)
        if not terms:
            return []
        match = " ".join('"' + t.replace('"', '') + '"' for t in terms)  # quoted: FTS5 syntax in a query is text
        rows = self.db.execute(
            "SELECT image_words.rowid, snippet(image_words, 0, '[', ']', '…', 12) FROM image_words JOIN images ON "
            "images.id = image_words.rowid WHERE image_words MATCH ? AND images.deleted = 0 ORDER BY bm25(image_words) "
            "LIMIT ?", (match, int(limit)))
        return [(int(i), s) for i, s in rows]

    def mark_deleted(self, table: str, ids: Iterable[int]) -> None:
        self._cached.clear()
        with self.db:
            self.db.executemany(f"UPDATE {_table(table)} SET deleted = 1 WHERE id = ?", ((int(i),) for i in ids))

    def save_to(self, path: str | Path) -> None:
        """A consistent copy of the whole store (SQLite's online backup)."""
        target = sqlite3.connect(str(path))
        try:
            self.db.backup(target)
        finally:
            target.close()

    # ------------------------------------------------------------------------------------------------- reading

    def count(self, table: str) -> int:
        if ("count", table) not in self._cached:
            self._cached["count", table] = self.db.execute(f"SELECT COUNT(*) FROM {_table(table)}").fetchone()[0]
        return self._cached["count", table]

    def deleted_ids(self, table: str) -> np.ndarray:
        """(n,) sorted ids of the deleted items (read-only: the same array is handed out until the next change)."""
        if ("deleted", table) not in self._cached:
            rows = self.db.execute(f"SELECT id FROM {_table(table)} WHERE deleted = 1 ORDER BY id").fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            ids.flags.writeable = False
            self._cached["deleted", table] = ids
        return self._cached["deleted", table]

    def is_live(self, table: str, item_id: int) -> bool:
        """An id of the table that is not deleted."""
        deleted = self.deleted_ids(table)
        position = np.searchsorted(deleted, item_id)
        return 0 <= item_id < self.count(table) and not (position < len(deleted) and deleted[position] == item_id)

    def image_paths(self, ids: Sequence[int] | None = None) -> list[str]:
        return self._column("images", "path", ids)

    def texts(self, ids: Sequence[int] | None = None) -> list[str]:
        return self._column("texts", "text", ids)

    def first_captions(self, image_ids: Sequence[int]) -> list[str | None]:
        """Each image's first live caption (None if it has none): what a result shows under the image."""
        ids = [int(i) for i in image_ids]
        if not ids:
            return []
        rows = self.db.execute(f"SELECT image_id, text FROM texts WHERE deleted = 0 AND image_id IN "
                               f"({','.join('?' * len(ids))}) ORDER BY id DESC", ids).fetchall()
        first = dict(rows)  # rows come newest first: the oldest (first) caption of each image wins
        return [first.get(i) for i in ids]

    def captions_of(self, image_ids: Sequence[int]) -> dict[int, list[str]]:
        """image id -> its live captions, oldest first."""
        ids = [int(i) for i in image_ids]
        found: dict[int, list[str]] = {i: [] for i in ids}
        for start in range(0, len(ids), 900):
            part = ids[start:start + 900]
            for image_id, text in self.db.execute(f"SELECT image_id, text FROM texts WHERE deleted = 0 AND image_id "
                                                  f"IN ({','.join('?' * len(part))}) ORDER BY id", part):
                found[image_id].append(text)
        return found

    def without_facts(self) -> list[tuple[int, str]]:
        """(id, path) of the live images whose facts are not recorded (indexes built before they were)."""
        return self.db.execute("SELECT id, path FROM images WHERE deleted = 0 AND ext IS NULL ORDER BY id").fetchall()

    def facts(self, ids: Sequence[int]) -> list[dict]:
        """Each image's recorded facts (None values where unknown)."""
        ids = [int(i) for i in ids]
        names = list(FACT_COLUMNS)
        rows = {row[0]: dict(zip(names, row[1:])) for row in self.db.execute(
            f"SELECT id, {', '.join(names)} FROM images WHERE id IN ({','.join('?' * len(ids))})", ids)} if ids else {}
        return [rows.get(i, dict.fromkeys(names)) for i in ids]

    def select_images(self, folder: str | None = None, after: float | None = None, before: float | None = None,
                      ext: Sequence[str] = ()) -> np.ndarray:
        """(n,) sorted ids of the live images that match every condition given: `folder` a glob over folders
        relative to the collection (`**` spans folders: `2024/**` is 2024 and all below it), `after` <= taken <
        `before` (POSIX timestamps), `ext` one of these file types."""
        clauses, args = ["deleted = 0"], []
        if folder is not None:
            folders = [f for (f,) in self.db.execute("SELECT DISTINCT folder FROM images WHERE deleted = 0")
                       if f is not None and folder_matches(folder, f)]
            clauses.append(f"folder IN ({','.join('?' * len(folders))})" if folders else "0")
            args += folders
        if after is not None:
            clauses.append("taken >= ?")
            args.append(after)
        if before is not None:
            clauses.append("taken < ?")
            args.append(before)
        if ext:
            clauses.append(f"ext IN ({','.join('?' * len(ext))})")
            args += list(ext)
        rows = self.db.execute(f"SELECT id FROM images WHERE {' AND '.join(clauses)} ORDER BY id", args)
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def without_hash(self) -> list[tuple[int, str, str | None]]:
        """(id, path, state) of the live images whose content hash is not recorded (indexes from before hashes)."""
        return self.db.execute("SELECT id, path, state FROM images WHERE deleted = 0 AND hash IS NULL").fetchall()

    def hashes(self, ids: Sequence[int]) -> list[str | None]:
        return self._column("images", "hash", ids)

    def ids_by_hash(self, hashes: Iterable[str]) -> dict[str, list[int]]:
        """hash -> ids of the live images with that content, oldest first."""
        wanted = sorted(set(hashes))
        found: dict[str, list[int]] = {}
        for start in range(0, len(wanted), 900):  # SQLite's bound-parameter limit
            part = wanted[start:start + 900]
            for h, image_id in self.db.execute(f"SELECT hash, id FROM images WHERE deleted = 0 AND hash IN "
                                               f"({','.join('?' * len(part))}) ORDER BY id", part):
                found.setdefault(h, []).append(image_id)
        return found

    def live_image_states(self) -> dict[str, tuple[int, str | None]]:
        """path -> (id, file state) of every image not deleted."""
        rows = self.db.execute("SELECT path, id, state FROM images WHERE deleted = 0").fetchall()
        return {path: (image_id, state) for path, image_id, state in rows}

    def caption_image(self) -> np.ndarray:
        rows = self.db.execute("SELECT image_id FROM texts ORDER BY id").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def _column(self, table: str, column: str, ids: Sequence[int] | None) -> list[str]:
        if ids is None:
            return [r[0] for r in self.db.execute(f"SELECT {column} FROM {_table(table)} ORDER BY id")]
        ids = [int(i) for i in ids]
        found = dict(self.db.execute(f"SELECT id, {column} FROM {_table(table)} WHERE id IN "
                                     f"({','.join('?' * len(ids))})", ids).fetchall()) if ids else {}
        return [found[i] for i in ids]

    def close(self) -> None:
        self.db.close()


# the image facts a filter may ask (vclr.data.images.image_facts) and their SQLite types
FACT_COLUMNS = {"folder": "TEXT", "ext": "TEXT", "bytes": "INTEGER", "width": "INTEGER", "height": "INTEGER",
                "taken": "REAL", "taken_from": "TEXT"}


def folder_matches(pattern: str, folder: str) -> bool:
    """A folder glob: `*` and `?` within one folder name, `**` across any number of them (`a/**` is a and all
    below it; `**/raw` is every raw folder). `[` is a plain character."""
    pattern = pattern.strip("/")
    regex = ""
    for part in re.split(r"(\*\*/?|/\*\*)", pattern):
        if part in ("**", "**/"):
            regex += "(?:.*/)?" if part == "**/" else ".*"
        elif part == "/**":
            regex += "(?:/.*)?"
        else:
            regex += "".join("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch) for ch in part)
    return re.fullmatch(regex, folder) is not None


def _table(name: str) -> str:
    if name not in ("images", "texts"):
        raise ValueError(f"no table {name!r}")
    return name
