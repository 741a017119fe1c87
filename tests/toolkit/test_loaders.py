import gzip
import struct

import numpy as np
import pytest

from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import DataFormatError, SampleError
from edgetailor.toolkit.loaders import load_samples, relabel, save_npz
from edgetailor.toolkit.preprocess import prepare_images


def _write_idx(path, array, opener=open):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())


@pytest.fixture
def glyphs():
    rng = np.random.default_rng(0)
    images = np.zeros((6, 28, 28), dtype=np.uint8)
    for i in range(6):
        images[i, 6:22, 8 + i:12 + i] = 255
    return images, rng.integers(0, 10, 6).astype(np.uint8)


def test_npz_roundtrip(tmp_path, glyphs):
    images, labels = glyphs
    save_npz(LabeledImages(images, labels), tmp_path / "raw.npz")
    data = load_samples(tmp_path / "raw.npz")  # raw images: prepared on the way in
    assert np.array_equal(data.images, prepare_images(images).images) and np.array_equal(data.labels, labels)
    save_npz(data, tmp_path / "samples.npz")  # prepared samples: read back as they are
    again = load_samples(tmp_path / "samples.npz")
    assert np.array_equal(again.images, data.images) and again.prepared_with == data.prepared_with


def test_npz_of_another_size_is_normalised(tmp_path):
    x = np.zeros((2, 64, 48), dtype=np.uint8)
    x[:, 10:50, 20:26] = 255
    np.savez(tmp_path / "big.npz", x=x, y=np.array([1, 1]))
    data = load_samples(tmp_path / "big.npz")
    assert data.images.shape == (2, 28, 28) and data.images.max() > 200


@pytest.mark.parametrize("gz", [False, True])
def test_idx_pair(tmp_path, glyphs, gz):
    images, labels = glyphs
    suffix, opener = (".gz", gzip.open) if gz else ("", open)
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, opener)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, opener)
    data = load_samples(tmp_path / f"train-images-idx3-ubyte{suffix}")
    assert np.array_equal(data.images, prepare_images(images).images) and np.array_equal(data.labels, labels)


def test_emnist_files_are_transposed_back(tmp_path, glyphs):
    images, labels = glyphs
    _write_idx(tmp_path / "emnist-digits-train-images-idx3-ubyte", images.transpose(0, 2, 1).copy())
    _write_idx(tmp_path / "emnist-digits-train-labels-idx1-ubyte", labels)
    assert np.array_equal(load_samples(tmp_path / "emnist-digits-train-images-idx3-ubyte").images,
                          prepare_images(images).images)


def test_image_folder_any_size_dark_ink(tmp_path):
    from PIL import Image

    for label in ("3", "7"):
        (tmp_path / label).mkdir()
        page = np.full((90, 70), 255, dtype=np.uint8)  # dark ink on a white page, not 28x28
        page[15:75, 30:38] = 0
        Image.fromarray(page).save(tmp_path / label / "a.png")
        Image.fromarray(page).convert("RGB").save(tmp_path / label / "b.jpg")
    data = load_samples(tmp_path)
    assert data.images.shape == (4, 28, 28)
    assert data.label_names == ["3", "7"]
    assert data.images[:, 0, 0].max() < 30 and data.images.max() > 200  # inverted to white ink on black


def test_bad_files_name_the_problem(tmp_path, glyphs):
    images, labels = glyphs
    (tmp_path / "x-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(DataFormatError, match="magic"):
        load_samples(tmp_path / "x-images-idx3-ubyte")
    _write_idx(tmp_path / "t-images-idx3-ubyte", images)
    (tmp_path / "t-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 6) + b"\x01")
    with pytest.raises(DataFormatError, match="truncated"):
        load_samples(tmp_path / "t-images-idx3-ubyte")
    np.savez(tmp_path / "nokeys.npz", a=images)
    with pytest.raises(DataFormatError, match="'x' and 'y'"):
        load_samples(tmp_path / "nokeys.npz")
    np.savez(tmp_path / "float.npz", x=images * 1.0, y=labels)
    with pytest.raises(SampleError, match=r"lie in \[0, 1\]"):
        load_samples(tmp_path / "float.npz")
    np.savez(tmp_path / "int.npz", x=images.astype(np.int32), y=labels)
    with pytest.raises(DataFormatError, match="uint8"):
        load_samples(tmp_path / "int.npz")
    with pytest.raises(DataFormatError, match="no such file"):
        load_samples(tmp_path / "missing.npz")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataFormatError, match="cannot tell the format"):
        load_samples(tmp_path / "notes.txt")


def test_relabel_refuses_unknown_labels(glyphs):
    images, _ = glyphs
    data = LabeledImages(images[:2], np.array([0, 1]), ["A", "7"])
    with pytest.raises(SampleError, match="'A'"):
        relabel(data, [str(d) for d in range(10)])
    assert relabel(LabeledImages(images[:1], np.array([0]), ["7"]), [str(d) for d in range(10)]).labels.tolist() == [7]
