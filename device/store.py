"""The device's state: the user's samples and trained personalizations, in one
SQLite database in the state directory.

Every change is one transaction, so a process killed at any moment leaves the
previous state whole: a personalization becomes active in the same commit
that stores its models, and samples are never rewritten. The database runs in
WAL mode with ``synchronous=FULL``, so a commit survives power loss too.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgetailor.toolkit.errors import StateError

DB_NAME = "state.sqlite"
SCHEMA_VERSION = 1
KEEP_PERSONALIZATIONS = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    label INTEGER NOT NULL,
    height INTEGER NOT NULL,
    width INTEGER NOT NULL,
    image BLOB NOT NULL,
    digest TEXT NOT NULL,
    added_at TEXT NOT NULL,
    UNIQUE (digest, label)
);
CREATE TABLE IF NOT EXISTS personalizations (
    id INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    bundle_id TEXT NOT NULL,
    n_samples INTEGER NOT NULL,
    le_model BLOB NOT NULL,
    gn_model BLOB NOT NULL,
    le_sha256 TEXT NOT NULL,
    gn_sha256 TEXT NOT NULL,
    threshold REAL NOT NULL,
    report TEXT NOT NULL
);
"""


@dataclass
class Personalization:
    id: int
    created_at: str
    bundle_id: str
    n_samples: int
    le_model: bytes
    gn_model: bytes
    threshold: float
    report: dict[str, Any]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StateStore:
    def __init__(self, state_dir: str | Path, labels: list[str]):
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.dir / DB_NAME, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.DatabaseError) as exc:
            raise StateError(f"cannot open the device state in {self.dir}: {exc}",
                             hint="check the path and free space; a corrupt state.sqlite can be moved away "
                                  "to start afresh") from None
        self._check_labels(labels)

    def _check_labels(self, labels: list[str]) -> None:
        stored = self.get_meta("labels")
        if stored is None:
            with self.transaction():
                self.set_meta("schema_version", str(SCHEMA_VERSION))
                self.set_meta("labels", json.dumps(labels))
            return
        if int(self.get_meta("schema_version") or 0) != SCHEMA_VERSION:
            raise StateError(f"{self.dir} was written by another toolkit version (state schema "
                             f"{self.get_meta('schema_version')}, this toolkit reads {SCHEMA_VERSION})")
        if json.loads(stored) != labels:
            raise StateError(f"the state in {self.dir} holds samples for labels {json.loads(stored)}, "
                             f"but the bundle knows {labels}",
                             hint="use a fresh --state directory for this bundle")

    def transaction(self):
        return _Transaction(self.db)

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, value))

    # samples -----------------------------------------------------------
    def add_samples(self, images: np.ndarray, labels: np.ndarray) -> int:
        """Store validated uint8 (N, H, W) images; duplicates (same pixels and label) are skipped.
        Returns how many were new."""
        now = _now()
        rows = [(int(label), img.shape[0], img.shape[1], img.tobytes(), hashlib.sha256(img.tobytes()).hexdigest(),
                 now) for img, label in zip(np.ascontiguousarray(images), labels)]
        with self.transaction():
            before = self.count_samples()
            self.db.executemany("INSERT OR IGNORE INTO samples(label, height, width, image, digest, added_at) "
                                "VALUES (?, ?, ?, ?, ?, ?)", rows)
            return self.count_samples() - before

    def count_samples(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def load_samples(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self.db.execute("SELECT label, height, width, image FROM samples ORDER BY id").fetchall()
        if not rows:
            return np.zeros((0, 0, 0), dtype=np.uint8), np.zeros(0, dtype=np.int64)
        images = np.stack([np.frombuffer(blob, dtype=np.uint8).reshape(h, w) for _, h, w, blob in rows])
        return images, np.array([r[0] for r in rows], dtype=np.int64)

    def clear_samples(self) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM samples")

    # personalizations --------------------------------------------------
    def save_personalization(self, bundle_id: str, n_samples: int, le_model: bytes, gn_model: bytes,
                             threshold: float, report: dict[str, Any]) -> int:
        """Store a trained LE+GN and make it the active one, in one commit."""
        with self.transaction():
            cursor = self.db.execute(
                "INSERT INTO personalizations(created_at, bundle_id, n_samples, le_model, gn_model, le_sha256, "
                "gn_sha256, threshold, report) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (_now(), bundle_id, n_samples, le_model, gn_model, hashlib.sha256(le_model).hexdigest(),
                 hashlib.sha256(gn_model).hexdigest(), threshold, json.dumps(report)))
            new_id = int(cursor.lastrowid)
            self.set_meta("active_personalization", str(new_id))
            self.db.execute("DELETE FROM personalizations WHERE id NOT IN "
                            "(SELECT id FROM personalizations ORDER BY id DESC LIMIT ?)", (KEEP_PERSONALIZATIONS,))
        return new_id

    def active_personalization(self) -> Personalization | None:
        active = self.get_meta("active_personalization")
        if active is None:
            return None
        row = self.db.execute(
            "SELECT id, created_at, bundle_id, n_samples, le_model, gn_model, le_sha256, gn_sha256, threshold, report "
            "FROM personalizations WHERE id = ?", (int(active),)).fetchone()
        if row is None:
            return None
        pid, created, bundle_id, n, le, gn, le_sha, gn_sha, threshold, report = row
        if hashlib.sha256(le).hexdigest() != le_sha or hashlib.sha256(gn).hexdigest() != gn_sha:
            raise StateError(f"personalization {pid} in {self.dir} is corrupt (hash mismatch)",
                             hint="run `edgetailor device personalize` again, or reset the state")
        return Personalization(pid, created, bundle_id, n, bytes(le), bytes(gn), float(threshold), json.loads(report))

    def clear_personalization(self) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM meta WHERE key = 'active_personalization'")
            self.db.execute("DELETE FROM personalizations")

    def close(self) -> None:
        self.db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; nests as a no-op."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.outer = False

    def __enter__(self):
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self.outer = True
        return self.db

    def __exit__(self, exc_type, *_):
        if self.outer:
            if exc_type is None:
                self.db.execute("COMMIT")
            elif self.db.in_transaction:
                # SQLite has already rolled back after some errors (SQLITE_FULL);
                # a second ROLLBACK would raise and hide the real error.
                self.db.execute("ROLLBACK")
        return False
