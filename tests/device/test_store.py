"""The state keeps every kind of sample: float32 sensor windows beside
glyphs; a state of glyphs alone stays version 2 (older toolkits read it),
the first window makes it 3; version-2 states from before read and gain
the dtype column; a repair keeps each sample's dtype."""

from __future__ import annotations

import sqlite3

import numpy as np

from edgetailor.device.store import _SCHEMA, DB_NAME, GLYPH_STATE_VERSION, SCHEMA_VERSION, StateStore, repair_state

LABELS = ["a", "b"]


def test_windows_and_glyphs_are_stored_apart_and_read_by_kind(tmp_path):
    store = StateStore(tmp_path, LABELS)
    windows = np.random.default_rng(0).normal(size=(3, 2, 16)).astype(np.float32)
    glyphs = np.random.default_rng(1).integers(0, 255, (2, 28, 28)).astype(np.uint8)
    assert store.add_samples(windows, np.array([0, 1, 0])) == 3
    assert store.add_samples(windows[:1], np.array([0])) == 0           # the same values and label: kept once
    assert store.add_samples(glyphs, np.array([1, 1])) == 2
    got, labels = store.load_samples((2, 16), "float32")
    assert got.dtype == np.float32 and np.array_equal(got, windows) and labels.tolist() == [0, 1, 0]
    assert store.other_samples == 2
    got, labels = store.load_samples((28, 28), "uint8")
    assert np.array_equal(got, glyphs) and store.other_samples == 3
    empty, _ = store.load_samples((5, 5), "float32")
    assert empty.shape == (0, 5, 5) and store.other_samples == 5
    store.close()


def _version_2_state(path):
    """A state as edgetailor 0.4 wrote it: no dtype column, schema version 2."""
    path.mkdir()
    db = sqlite3.connect(path / DB_NAME, isolation_level=None)
    db.executescript(_SCHEMA.replace(",\n    dtype TEXT NOT NULL DEFAULT 'uint8'", ""))
    assert "dtype" not in {r[1] for r in db.execute("PRAGMA table_info(samples)")}
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", "2"), ("labels", '["a", "b"]')])
    glyph = np.full((28, 28), 7, np.uint8)
    import hashlib
    db.execute("INSERT INTO samples(label, height, width, image, digest, added_at) VALUES (1, 28, 28, ?, ?, 'x')",
               (glyph.tobytes(), hashlib.sha256(glyph.tobytes()).hexdigest()))
    db.close()
    return glyph


def test_a_version_2_state_is_read_and_upgraded(tmp_path):
    glyph = _version_2_state(tmp_path / "old")
    reader = StateStore(tmp_path / "old", LABELS, read_only=True)     # a full disk: read as it is
    images, labels = reader.load_samples()
    assert np.array_equal(images[0], glyph) and labels.tolist() == [1]
    reader.close()
    store = StateStore(tmp_path / "old", LABELS)
    # glyphs only: still version 2, which toolkits before sensor windows read; the first window makes it 3
    assert store.get_meta("schema_version") == str(GLYPH_STATE_VERSION)
    assert "dtype" in {r[1] for r in store.db.execute("PRAGMA table_info(samples)")}
    store.add_samples(np.ones((1, 2, 16), np.float32), np.array([0]))
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    assert store.load_samples((28, 28), "uint8")[0].shape == (1, 28, 28)
    assert store.load_samples((2, 16), "float32")[0].shape == (1, 2, 16)
    store.close()


def test_repair_keeps_each_samples_kind(tmp_path):
    store = StateStore(tmp_path, LABELS)
    windows = np.random.default_rng(0).normal(size=(2, 2, 16)).astype(np.float32)
    store.add_samples(windows, np.array([0, 1]))
    store.add_samples(np.zeros((1, 28, 28), np.uint8) + 3, np.array([1]))
    store.close()
    report = repair_state(tmp_path)
    assert report.samples_kept == 3
    store = StateStore(tmp_path, LABELS)
    assert np.array_equal(store.load_samples((2, 16), "float32")[0], windows)
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    store.close()
    glyph = _version_2_state(tmp_path / "old")
    assert repair_state(tmp_path / "old").samples_kept == 1
    repaired = StateStore(tmp_path / "old", LABELS)
    assert np.array_equal(repaired.load_samples((28, 28), "uint8")[0][0], glyph)
    assert repaired.get_meta("schema_version") == str(GLYPH_STATE_VERSION)
    repaired.close()
