"""The device's state: the user's samples, trained personalizations, and the
keys and bundle versions it trusts, in one SQLite database in the state directory.

Every change is one transaction, so a process killed at any moment leaves the
previous state whole: a personalization becomes active in the same commit
that stores its models, and samples are never rewritten. The database runs in
WAL mode with ``synchronous=FULL``, so a commit survives power loss too.

Nothing in it may lock the user out. Every sample row carries its sha256 and
every personalization its models' sha256, so damage is found when read: a
damaged personalization is set aside (GE answers alone, and says why), a
damaged sample is skipped, and ``repair_state`` copies every readable row
into a fresh database. A personalization commits only if the samples it was
trained on are still the current ones (``samples_generation``, a
compare-and-swap), so a slow personalize cannot replace a newer one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgetailor.toolkit.atomic import fsync_dir
from edgetailor.toolkit.errors import StateError

DB_NAME = "state.sqlite"
SCHEMA_VERSION = 3          # the newest this toolkit reads and writes
# A state that holds only glyphs is written as version 2: the dtype column it gains has a default, and
# toolkits before 0.5 name their columns, so they still read it. The first float32 sample makes it 3,
# which they refuse rather than read a sensor window as a glyph.
GLYPH_STATE_VERSION = 2
KEEP_PERSONALIZATIONS = 3
BUSY_TIMEOUT_S = 120.0     # concurrent device processes wait for each other's short write transactions

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
    dtype TEXT NOT NULL DEFAULT 'uint8',
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
    report TEXT NOT NULL,
    samples_generation INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS trusted_keys (
    keyid TEXT PRIMARY KEY,
    public BLOB NOT NULL,
    source TEXT NOT NULL,
    added_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked_keys (
    keyid TEXT PRIMARY KEY,
    revoked_by TEXT NOT NULL,
    revoked_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    manifest_digest TEXT NOT NULL,
    accepted_at TEXT NOT NULL
);
"""
_TABLES = {"meta", "samples", "personalizations", "trusted_keys", "revoked_keys", "releases"}
# Version 1 states (edgetailor 0.1) lack the compare-and-swap column and the trust tables.
_MIGRATE_V1 = "ALTER TABLE personalizations ADD COLUMN samples_generation INTEGER NOT NULL DEFAULT -1"
# Version 2 states hold glyphs only: their samples lack the dtype column (float32 sensor windows came in 3).
_MIGRATE_V2 = "ALTER TABLE samples ADD COLUMN dtype TEXT NOT NULL DEFAULT 'uint8'"
SAMPLE_DTYPES = ("uint8", "float32")


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
    samples_generation: int = -1


class SamplesChanged(StateError):
    """The stored samples changed while a personalization trained: committing it would replace a newer one."""


class DamagedState(StateError):
    """A row whose bytes no longer match their sha256, or a database page SQLite cannot read."""

    default_hint = "run `edgetailor device repair --state S`: it keeps every readable sample"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_OPEN_HINT = ("check the path, its permissions and free space; if the database is damaged, "
              "`edgetailor device repair` salvages its samples")


def open_store(state_dir: str | Path, read_only: bool = False) -> "StateStore":
    """The state for a command. A command that only answers (``read_only``)
    still opens when the state cannot be written (a full disk, a read-only
    folder) or read at all: read-only, or else an empty state in memory, so GE
    answers alone; ``problem`` says why."""
    if not read_only:
        return StateStore(state_dir)
    try:
        return StateStore(state_dir)
    except StateError as writable_error:
        try:
            store = StateStore(state_dir, read_only=True)
            store.problem = (f"the state in {state_dir} is open read-only ({writable_error.message.split(': ', 1)[-1]})"
                             "; nothing will be stored")
            return store
        except StateError as exc:
            return StateStore.in_memory(state_dir, f"the state in {state_dir} cannot be read "
                                                   f"({exc.message.split(': ', 1)[-1]}); GE answers alone")


class StateStore:
    """The state database. ``read_only`` opens it without writing anything (a
    read-only folder, a full disk): what a GE-only ``evaluate`` needs."""

    def __init__(self, state_dir: str | Path, labels: list[str] | None = None, read_only: bool = False):
        self.dir = Path(state_dir)
        self.read_only = read_only
        self.damaged_samples = 0
        self.other_samples = 0
        self.problem: str | None = None      # why this state is open read-only or in memory
        path = self.dir / DB_NAME
        try:
            if read_only:
                self.db = _connect_read_only(path)
            else:
                self.dir.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self._create_or_migrate()
        except sqlite3.DatabaseError as exc:
            if not isinstance(exc, sqlite3.OperationalError):    # a damaged file, not a missing or busy one
                raise DamagedState(f"the device state in {self.dir} is damaged: {exc}") from None
            raise StateError(f"cannot open the device state in {self.dir}: {exc}", hint=_OPEN_HINT) from None
        except OSError as exc:
            raise StateError(f"cannot open the device state in {self.dir}: {exc}", hint=_OPEN_HINT) from None
        if labels is not None:
            self.check_labels(labels)

    @classmethod
    def in_memory(cls, state_dir: str | Path, problem: str) -> "StateStore":
        """An empty, throw-away state: what a command that only answers uses when the real one cannot be read."""
        store = cls.__new__(cls)
        store.dir, store.read_only, store.damaged_samples, store.problem = Path(state_dir), True, 0, problem
        store.other_samples = 0
        store.db = sqlite3.connect(":memory:", isolation_level=None)
        store.db.executescript(_SCHEMA)
        if (store.dir / DB_NAME).exists():
            # The real state may pin keys that cannot be read now: stay locked, so that only bundles signed by a
            # key given to this very command open (an unreadable state must not turn signature checks off).
            store.db.execute("INSERT INTO meta(key, value) VALUES ('trust_pinned', '1')")
        return store

    def _create_or_migrate(self) -> None:
        """Create the tables, or bring a version-1 state up to date. A current
        state is only read here: opening takes no write lock, so commands that
        only answer run beside a personalize, and on a full disk."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = self.get_meta("schema_version") if "meta" in tables else None
        if (_TABLES <= tables and version is not None and int(version) >= GLYPH_STATE_VERSION
                and "dtype" in self._sample_columns()):
            return      # current (a newer version is refused by check_labels)
        with self.transaction():
            if "personalizations" in tables:
                columns = {r[1] for r in self.db.execute("PRAGMA table_info(personalizations)")}
                if "samples_generation" not in columns:
                    self.db.execute(_MIGRATE_V1)
            if "samples" in tables and "dtype" not in self._sample_columns():
                self.db.execute(_MIGRATE_V2)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            if version is not None and int(version) < GLYPH_STATE_VERSION:
                self.set_meta("schema_version", str(GLYPH_STATE_VERSION))

    def check_labels(self, labels: list[str]) -> None:
        stored = self.get_meta("labels")
        if stored is None:
            if self.read_only:
                return
            with self.transaction():
                if self.get_meta("labels") is None:
                    self.set_meta("schema_version", str(GLYPH_STATE_VERSION))
                    self.set_meta("labels", json.dumps(labels))
            return
        if int(self.get_meta("schema_version") or 0) > SCHEMA_VERSION:
            raise StateError(f"{self.dir} was written by a newer toolkit (state schema "
                             f"{self.get_meta('schema_version')}, this toolkit reads up to {SCHEMA_VERSION})",
                             hint="upgrade edgetailor on this device")
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
    def _sample_columns(self) -> set[str]:
        return {r[1] for r in self.db.execute("PRAGMA table_info(samples)")}

    def add_samples(self, images: np.ndarray, labels: np.ndarray) -> int:
        """Store validated samples: uint8 glyphs (N, H, W) or float32 windows
        (N, channels, length); duplicates (same values and label) are skipped.
        Returns how many were new."""
        samples = np.ascontiguousarray(images)
        if samples.ndim != 3 or samples.dtype.name not in SAMPLE_DTYPES:
            raise ValueError(f"samples must be (N, H, W) {' or '.join(SAMPLE_DTYPES)}, got {samples.dtype} "
                             f"{samples.shape}")
        now, dtype = _now(), samples.dtype.name
        rows = [(int(label), x.shape[0], x.shape[1], x.tobytes(), hashlib.sha256(x.tobytes()).hexdigest(), now,
                 dtype) for x, label in zip(samples, labels)]
        with self.transaction():
            before = self.count_samples()
            self.db.executemany("INSERT OR IGNORE INTO samples(label, height, width, image, digest, added_at, dtype) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            if dtype != "uint8" and int(self.get_meta("schema_version") or 0) < SCHEMA_VERSION:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
            added = self.count_samples() - before
            if added:
                self._bump_generation()
            return added

    def samples_generation(self) -> int:
        """Grows with every change to the stored samples: what a personalization was trained on."""
        return int(self.get_meta("samples_generation") or 0)

    def _bump_generation(self) -> None:
        self.set_meta("samples_generation", str(self.samples_generation() + 1))

    def count_samples(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def load_samples(self, shape: tuple[int, int] | None = None,
                     dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        images, labels, _ = self.load_samples_with_generation(shape, dtype)
        return images, labels

    def load_samples_with_generation(self, shape: tuple[int, int] | None = None,
                                     dtype: str | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Every intact sample of ``shape`` and ``dtype`` (default: all) and the
        generation they belong to, read in one snapshot. Rows whose bytes no
        longer match their sha256 are skipped and counted in
        ``damaged_samples``; rows of another shape or dtype (a state shared by
        two bundles with the same labels, say spoken and written digits) in
        ``other_samples``."""
        try:
            with self.snapshot():
                generation = self.samples_generation()
                kind = "dtype" if "dtype" in self._sample_columns() else "'uint8'"   # a read-only version-2 state
                rows = self.db.execute(f"SELECT label, height, width, image, digest, {kind} FROM samples "
                                       "ORDER BY id").fetchall()
        except sqlite3.DatabaseError as exc:
            raise DamagedState(f"cannot read the samples stored in {self.dir}: {exc}") from None
        intact = [r for r in rows if _sample_intact(*r)]
        self.damaged_samples = len(rows) - len(intact)
        wanted = [r for r in intact
                  if (shape is None or (r[1], r[2]) == tuple(shape)) and (dtype is None or r[5] == dtype)]
        self.other_samples = len(intact) - len(wanted)
        if not wanted:
            return np.zeros((0, *(shape or (0, 0))), dtype=dtype or np.uint8), np.zeros(0, np.int64), generation
        images = np.stack([np.frombuffer(blob, dtype=kind).reshape(h, w) for _, h, w, blob, _, kind in wanted])
        return images, np.array([r[0] for r in wanted], dtype=np.int64), generation

    def clear_samples(self) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM samples")
            self._bump_generation()

    # personalizations --------------------------------------------------
    def save_personalization(self, bundle_id: str, n_samples: int, le_model: bytes, gn_model: bytes,
                             threshold: float, report: dict[str, Any], samples_generation: int | None = None) -> int:
        """Store a trained LE+GN and make it the active one, in one commit; with
        ``samples_generation``, only if the samples are still the ones it was
        trained on (else SamplesChanged, and nothing is written)."""
        with self.transaction():
            current = self.samples_generation()
            if samples_generation is not None and samples_generation != current:
                raise SamplesChanged(f"the samples in {self.dir} changed while this personalization trained "
                                     f"(generation {samples_generation} -> {current})",
                                     hint="personalize again: it trains on the samples stored now")
            cursor = self.db.execute(
                "INSERT INTO personalizations(created_at, bundle_id, n_samples, le_model, gn_model, le_sha256, "
                "gn_sha256, threshold, report, samples_generation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (_now(), bundle_id, n_samples, le_model, gn_model, hashlib.sha256(le_model).hexdigest(),
                 hashlib.sha256(gn_model).hexdigest(), threshold, json.dumps(report), current))
            new_id = int(cursor.lastrowid)
            self.set_meta("active_personalization", str(new_id))
            self.db.execute("DELETE FROM personalizations WHERE id NOT IN "
                            "(SELECT id FROM personalizations ORDER BY id DESC LIMIT ?)", (KEEP_PERSONALIZATIONS,))
        return new_id

    def active_personalization(self) -> Personalization | None:
        """The personalization in use, or None. Raises DamagedState when its bytes do not match their sha256."""
        try:
            active = self.get_meta("active_personalization")
            if active is None:
                return None
            row = self.db.execute(
                "SELECT id, created_at, bundle_id, n_samples, le_model, gn_model, le_sha256, gn_sha256, threshold, "
                "report, samples_generation FROM personalizations WHERE id = ?", (int(active),)).fetchone()
        except (sqlite3.DatabaseError, ValueError) as exc:
            raise DamagedState(f"the personalization stored in {self.dir} cannot be read: {exc}") from None
        if row is None:
            return None
        pid, created, bundle_id, n, le, gn, le_sha, gn_sha, threshold, report, generation = row
        if (not isinstance(le, bytes) or not isinstance(gn, bytes) or hashlib.sha256(le).hexdigest() != le_sha
                or hashlib.sha256(gn).hexdigest() != gn_sha):
            raise DamagedState(f"personalization {pid} in {self.dir} is damaged (its models do not match their "
                               "sha256)", hint="run `edgetailor device reset` (keeps the samples) or personalize "
                                               "again")
        try:
            parsed = json.loads(report)
        except (ValueError, TypeError):
            raise DamagedState(f"personalization {pid} in {self.dir} has a damaged report") from None
        return Personalization(pid, created, bundle_id, n, bytes(le), bytes(gn), float(threshold), parsed,
                               int(generation))

    def clear_personalization(self) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM meta WHERE key = 'active_personalization'")
            self.db.execute("DELETE FROM personalizations")

    # trust: keys and bundle versions -------------------------------------
    def trusted_keys(self) -> dict[str, bytes]:
        return {k: bytes(v) for k, v in self.db.execute("SELECT keyid, public FROM trusted_keys")}

    def revoked_keys(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT keyid FROM revoked_keys")}

    def trust_key(self, keyid: str, public: bytes, source: str) -> None:
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO trusted_keys(keyid, public, source, added_at) VALUES (?, ?, ?, ?)",
                            (keyid, public, source, _now()))
            self.set_meta("trust_pinned", "1")   # survives a repair that loses the keys: the state stays locked

    def revoke_key(self, keyid: str, revoked_by: str) -> None:
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO revoked_keys(keyid, revoked_by, revoked_at) VALUES (?, ?, ?)",
                            (keyid, revoked_by, _now()))
            # gone from the trusted keys too, so that losing the revocations (a repair) cannot bring it back
            self.db.execute("DELETE FROM trusted_keys WHERE keyid = ?", (keyid,))

    def accepted_release(self, name: str) -> tuple[int, str] | None:
        row = self.db.execute("SELECT version, manifest_digest FROM releases WHERE name = ?", (name,)).fetchone()
        return (int(row[0]), row[1]) if row else None

    def accept_release(self, name: str, version: int, manifest_digest: str) -> None:
        """Remember the highest version accepted for ``name``: older ones are refused from now on."""
        with self.transaction():
            self.db.execute("INSERT INTO releases(name, version, manifest_digest, accepted_at) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT(name) DO UPDATE SET version = excluded.version, "
                            "manifest_digest = excluded.manifest_digest, accepted_at = excluded.accepted_at "
                            "WHERE excluded.version > releases.version", (name, version, manifest_digest, _now()))

    def check_health(self) -> None:
        """Raise DamagedState when SQLite finds damaged pages (``quick_check``: milliseconds for a device's state)."""
        try:
            result = self.db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            result = str(exc)
        if result != "ok":
            raise DamagedState(f"the database in {self.dir} is damaged ({result[:200]})")

    def snapshot(self):
        """A read transaction: every query inside sees one consistent state (WAL snapshot)."""
        return _Transaction(self.db, "BEGIN")

    def close(self) -> None:
        self.db.close()


def _sample_intact(label: Any, height: Any, width: Any, blob: Any, digest: Any, dtype: Any = "uint8") -> bool:
    return (isinstance(blob, bytes) and isinstance(height, int) and isinstance(width, int) and height > 0
            and width > 0 and dtype in SAMPLE_DTYPES and len(blob) == height * width * np.dtype(dtype).itemsize
            and isinstance(label, int) and hashlib.sha256(blob).hexdigest() == digest)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """Open without writing: ``mode=ro`` when SQLite can still make its WAL index, else ``immutable``
    (a read-only folder or medium, where no other process can be writing either)."""
    if not path.is_file():
        raise sqlite3.OperationalError(f"no state database at {path}")
    uri = path.resolve().as_uri()
    errors = []
    for flags in ("mode=ro", "immutable=1"):
        try:
            db = sqlite3.connect(f"{uri}?{flags}", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)
            db.execute("SELECT count(*) FROM meta").fetchone()
            return db
        except sqlite3.DatabaseError as exc:
            errors.append(f"{flags}: {exc}")
    raise sqlite3.OperationalError("; ".join(errors))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; nests as a no-op."""

    def __init__(self, db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE"):
        self.db = db
        self.begin = begin
        self.outer = False

    def __enter__(self):
        if not self.db.in_transaction:
            self.db.execute(self.begin)
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


@dataclass
class RepairReport:
    samples_kept: int
    samples_lost: int
    personalizations_kept: int
    personalizations_lost: int
    trust_lost: bool           # the trusted keys could not be read: pin them again with --trusted-keys
    backup: Path | None        # the damaged database, kept beside the new one

    def describe(self) -> str:
        text = (f"kept {self.samples_kept} samples ({self.samples_lost} unreadable) and "
                f"{self.personalizations_kept} personalizations ({self.personalizations_lost} unreadable)")
        if self.trust_lost:
            text += "; the trusted keys were unreadable: pass --trusted-keys again"
        return text + (f"; the damaged database is kept as {self.backup}" if self.backup else "")


def repair_state(state_dir: str | Path, keep_personalizations: bool = True) -> RepairReport:
    """Copy every readable row of a damaged state into a fresh database and put it in place.

    SQLite reports page damage only for the rows on the damaged pages, so the
    rows are read in ranges, halving a range that fails down to single rows;
    each sample and personalization must also match its sha256. The old
    database (with its WAL) is renamed, never deleted, and the new one is
    written beside it, fsynced and renamed over: a kill at any moment leaves
    one whole database in place."""
    state_dir = Path(state_dir)
    path = state_dir / DB_NAME
    if not path.exists():
        raise StateError(f"no state to repair in {state_dir}", hint="check the --state path")
    try:
        old = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.DatabaseError as exc:
        raise StateError(f"cannot open {path} at all: {exc}",
                         hint=f"move {path} away to start afresh (its samples are lost)") from None
    meta = dict(_salvage(old, "meta", ("key", "value")))
    samples = [(*r[:7], "uint8" if r[7] == -1 else r[7])      # a version-2 state's rows are glyphs
               for r in _salvage(old, "samples", ("id", "label", "height", "width", "image", "digest", "added_at",
                                                  "dtype"))]
    samples = [r for r in samples if _sample_intact(*r[1:6], r[7])]
    total_samples, total_personalizations = _count(old, "samples"), _count(old, "personalizations")
    columns = ("id", "created_at", "bundle_id", "n_samples", "le_model", "gn_model", "le_sha256", "gn_sha256",
               "threshold", "report", "samples_generation")
    personalizations = [r for r in _salvage(old, "personalizations", columns) if _personalization_intact(r)]
    if not keep_personalizations:
        personalizations = []
    keys = _salvage(old, "trusted_keys", ("keyid", "public", "source", "added_at"))
    revoked = _salvage(old, "revoked_keys", ("keyid", "revoked_by", "revoked_at"))
    releases = _salvage(old, "releases", ("name", "version", "manifest_digest", "accepted_at"))
    whole = {table: _count(old, table) == len(rows) and _readable(old, table, meta.get("schema_version"))
             for table, rows in (("trusted_keys", keys), ("revoked_keys", revoked), ("releases", releases))}
    # A state that may have trusted keys stays locked: better to ask for --trusted-keys again than to open
    # unsigned bundles because the rows that said otherwise were on a damaged page.
    trust_lost = not all(whole.values()) or "labels" not in meta or (meta.get("trust_pinned") == "1" and not keys)
    if trust_lost or keys:
        meta["trust_pinned"] = "1"
    old.close()

    fresh = state_dir / f".{DB_NAME}.repair-{os.getpid()}"
    for leftover in (fresh, Path(f"{fresh}-journal")):
        leftover.unlink(missing_ok=True)
    db = sqlite3.connect(fresh, isolation_level=None)
    try:
        db.executescript(_SCHEMA)
        db.execute("BEGIN")
        meta["schema_version"] = str(SCHEMA_VERSION if any(r[7] != "uint8" for r in samples) else GLYPH_STATE_VERSION)
        meta["samples_generation"] = str(int(meta.get("samples_generation", "0") or 0) + 1)
        active = {int(r[0]) for r in personalizations}
        if not meta.get("active_personalization", "").isdigit() or int(meta["active_personalization"]) not in active:
            meta.pop("active_personalization", None)
        db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
        db.executemany("INSERT INTO samples(id, label, height, width, image, digest, added_at, dtype) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", samples)
        db.executemany(f"INSERT INTO personalizations({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                       personalizations)
        db.executemany("INSERT INTO trusted_keys VALUES (?, ?, ?, ?)", keys)
        db.executemany("INSERT INTO revoked_keys VALUES (?, ?, ?)", revoked)
        db.executemany("INSERT INTO releases VALUES (?, ?, ?, ?)", releases)
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    with open(fresh, "rb+") as handle:
        os.fsync(handle.fileno())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    backup = state_dir / f"{DB_NAME}.damaged-{stamp}"
    # The damaged database gets a second name first, so that at every moment one whole database is in place.
    os.link(path, backup)
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            os.replace(side, Path(f"{backup}{suffix}"))
    os.replace(fresh, path)
    fsync_dir(state_dir)
    return RepairReport(len(samples), max(total_samples - len(samples), 0), len(personalizations),
                        max(total_personalizations - len(personalizations), 0), trust_lost, backup)


def _salvage(db: sqlite3.Connection, table: str, columns: tuple[str, ...], budget: int = 100_000) -> list[tuple]:
    """Every row of ``table`` SQLite can still read, as ``columns`` (a column an
    older state lacks comes back as its default, -1). A query that touches a
    damaged page fails as a whole, so a failing rowid range is halved until
    the readable rows around the damage are found (at most ``budget`` queries)."""
    try:
        present = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
    except sqlite3.DatabaseError:
        present = set(columns)
    if not present:
        return []       # no such table (an older state), or a schema page beyond reading
    select = f"SELECT {', '.join(c if c in present else '-1' for c in columns)} FROM {table}"
    try:
        return db.execute(f"{select} ORDER BY rowid").fetchall()
    except sqlite3.DatabaseError:
        pass
    try:
        high = int(db.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0] or 0)
    except sqlite3.DatabaseError:
        high = 1 << 22
    rows, ranges = [], [(1, high)]
    while ranges and budget > 0:
        low, high = ranges.pop()
        budget -= 1
        try:
            rows += db.execute(f"{select} WHERE rowid BETWEEN ? AND ? ORDER BY rowid", (low, high)).fetchall()
        except sqlite3.DatabaseError:
            if low < high:
                middle = (low + high) // 2
                ranges += [(middle + 1, high), (low, middle)]
    return rows


def _readable(db: sqlite3.Connection, table: str, schema_version: str | None) -> bool:
    try:
        db.execute(f"SELECT * FROM {table}").fetchall()
        return True
    except sqlite3.OperationalError as exc:
        return "no such table" in str(exc) and schema_version == "1"    # a state from before trust existed
    except sqlite3.DatabaseError:
        return False


def _personalization_intact(row: tuple) -> bool:
    le, gn, le_sha, gn_sha, report = row[4], row[5], row[6], row[7], row[9]
    if not (isinstance(le, bytes) and isinstance(gn, bytes)):
        return False
    if hashlib.sha256(le).hexdigest() != le_sha or hashlib.sha256(gn).hexdigest() != gn_sha:
        return False
    try:
        json.loads(report)
    except (TypeError, ValueError):
        return False
    return True


def _count(db: sqlite3.Connection, table: str) -> int:
    """Rows the table claims (max rowid as a fallback when counting hits a damaged page)."""
    for query in (f"SELECT count(*) FROM {table}", f"SELECT max(rowid) FROM {table}"):
        try:
            return int(db.execute(query).fetchone()[0] or 0)
        except sqlite3.DatabaseError:
            continue
    return 0
