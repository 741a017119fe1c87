"""The sample store: generic data of any size prepared once, in a streamed
pass, into a cache that training reads a batch at a time."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from edgetailor.server_side.samples import SampleStore, input_spec_of, open_samples
from edgetailor.toolkit.arrayfiles import iter_idx, read_idx
from edgetailor.toolkit.errors import DataFormatError, SampleError
from edgetailor.toolkit.loaders import load_samples


def _raw_glyphs(generic_split, n=300):
    """Raw 28x28 images (not yet prepared) drawn from the built-in digits, shifted off-centre."""
    images = np.roll(generic_split.train.images[:n], 3, axis=2)
    return images, generic_split.train.labels[:n]


def _write_idx(path, images, labels):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(struct.pack(">BBBB3I", 0, 0, 8, 3, *images.shape) + images.tobytes())
    labels_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    with opener(labels_path, "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, len(labels)) + labels.astype(np.uint8).tobytes())


def test_an_npz_streams_into_the_same_samples_as_the_loader(tmp_path, generic_split):
    images, labels = _raw_glyphs(generic_split)
    path = tmp_path / "raw.npz"
    np.savez(path, x=images, y=labels)
    expected = load_samples(path)
    for workers in (0, 2):
        store = open_samples(path, cache_dir=tmp_path / f"cache{workers}", workers=workers)
        assert len(store) == len(expected) and store.label_names == expected.label_names
        np.testing.assert_array_equal(store.read(np.arange(len(store))), expected.images)
        np.testing.assert_array_equal(store.labels, expected.labels)
        assert store.fingerprint() == expected.fingerprint()   # the data hash checkpoints record


def test_a_gzipped_idx_pair_streams_in_chunks(tmp_path, generic_split, monkeypatch):
    images, labels = _raw_glyphs(generic_split, 257)
    path = tmp_path / "t-images-idx3-ubyte.gz"
    _write_idx(path, images, labels)
    monkeypatch.setattr("edgetailor.server_side.samples.CHUNK_IMAGES", 50)    # several chunks, one short
    store = open_samples(path, cache_dir=tmp_path / "cache")
    expected = load_samples(path)
    np.testing.assert_array_equal(store.read(np.arange(len(store))), expected.images)
    chunks = list(iter_idx(path, 100))
    assert [len(c) for c in chunks] == [100, 100, 57]
    np.testing.assert_array_equal(np.concatenate(chunks), read_idx(path))


def test_a_truncated_idx_is_refused_by_name(tmp_path, generic_split):
    images, labels = _raw_glyphs(generic_split, 40)
    path = tmp_path / "t-images-idx3-ubyte"
    _write_idx(path, images, labels)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataFormatError, match="truncated"):
        open_samples(path, cache_dir=tmp_path / "cache")


def test_views_read_rows_in_any_order(tmp_path, generic_split):
    images, labels = _raw_glyphs(generic_split, 120)
    path = tmp_path / "raw.npz"
    np.savez(path, x=images, y=labels)
    on_disk = open_samples(path, cache_dir=tmp_path / "cache")
    in_memory = SampleStore.from_images(load_samples(path))
    view_disk, view_memory = on_disk.subset(np.arange(10, 110)), in_memory.subset(np.arange(10, 110))
    positions = np.array([99, 0, 5, 6, 7, 50, 5])          # unsorted, repeated, runs
    np.testing.assert_array_equal(view_disk.read(positions), view_memory.read(positions))
    np.testing.assert_array_equal(view_disk.labels, view_memory.labels)
    spec_disk, spec_memory = input_spec_of(view_disk), input_spec_of(view_memory)
    assert spec_disk.mean == pytest.approx(spec_memory.mean) and spec_disk.std == pytest.approx(spec_memory.std)


def test_the_cache_is_reused_and_remade_when_the_file_changes(tmp_path, generic_split):
    images, labels = _raw_glyphs(generic_split, 60)
    path = tmp_path / "raw.npz"
    np.savez(path, x=images, y=labels)
    first = open_samples(path, cache_dir=tmp_path / "cache")
    stamp = os.stat(first.path).st_mtime_ns
    again = open_samples(path, cache_dir=tmp_path / "cache")
    assert again.path == first.path and os.stat(again.path).st_mtime_ns == stamp
    np.savez(path, x=images[::-1], y=labels[::-1])
    changed = open_samples(path, cache_dir=tmp_path / "cache")
    assert changed.path != first.path and changed.fingerprint() != first.fingerprint()


def test_a_folder_with_a_blank_image_is_refused_or_skipped(tmp_path, generic_split):
    from PIL import Image

    images, labels = _raw_glyphs(generic_split, 12)
    for i, (image, label) in enumerate(zip(images, labels)):
        (tmp_path / "data" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "data" / str(label) / f"{i}.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "data" / "3" / "blank.png")
    with pytest.raises(SampleError, match="blank.png"):
        open_samples(tmp_path / "data", cache_dir=tmp_path / "cache", workers=2)
    store = open_samples(tmp_path / "data", cache_dir=tmp_path / "cache", skip_bad=True, workers=2)
    assert len(store) == 12 and "left out 1 of 13 files" in store.notes[0]


def test_a_simulated_set_trains_from_the_cache_with_loader_workers(tmp_path):
    """The large-data path a user runs, small: simulate-data, then pretrain
    reading the prepared cache through DataLoader worker processes."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "EDGETAILOR_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "edgetailor"]
    subprocess.run([*cli, "server", "simulate-data", "--out", str(tmp_path / "sim"), "--images", "3000"],
                   check=True, env=env, capture_output=True)
    run = subprocess.run([*cli, "server", "pretrain", "--data", str(tmp_path / "sim" / "train-images-idx3-ubyte"),
                          "--out", str(tmp_path / "ge"), "--recipe", "fast", "--epochs", "2", "--workers", "1",
                          "--device", "cpu", "--evaluate-every", "1"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "images/s" in run.stdout
    meta = json.loads((tmp_path / "ge" / "model.json").read_text())
    assert meta["data"]["n_train"] + meta["data"]["n_test"] + meta["data"]["n_user_pool"] == 3000
    assert meta["data"]["source"].endswith("train-images-idx3-ubyte")
    assert [h["epoch"] for h in meta["training"]["history"]] == [1, 2]
    assert meta["training"]["images"] == 2 * meta["data"]["n_train"]
    assert meta["generic_accuracy"] > 0.5
    assert len(list((tmp_path / "cache").iterdir())) == 1                   # prepared once, kept


def test_a_cache_disk_without_room_is_refused_before_any_work(tmp_path, generic_split, monkeypatch):
    import shutil

    images, labels = _raw_glyphs(generic_split, 50)
    path = tmp_path / "raw.npz"
    np.savez(path, x=images, y=labels)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    with pytest.raises(DataFormatError, match="needs 0.0 MB for 50 images; its disk has 0.0 MB free") as error:
        open_samples(path, cache_dir=tmp_path / "cache")
    assert "EDGETAILOR_CACHE" in error.value.hint
    assert list((tmp_path / "cache").iterdir()) == []
