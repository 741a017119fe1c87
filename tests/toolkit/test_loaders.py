import gzip
import struct

import numpy as np
import pytest

from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import DataFormatError, LimitError, SampleError
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


def test_load_images_needs_no_labels(tmp_path, glyphs):
    from PIL import Image

    from edgetailor.toolkit.loaders import load_images

    images, labels = glyphs
    expected = prepare_images(images).images
    np.savez(tmp_path / "x-only.npz", x=images)
    with pytest.raises(DataFormatError, match="'x' and 'y'"):
        load_samples(tmp_path / "x-only.npz")
    data = load_images(tmp_path / "x-only.npz")
    assert np.array_equal(data.images, expected) and data.labels.tolist() == [0] * 6
    assert data.label_names == ["unlabelled"]
    _write_idx(tmp_path / "t-images-idx3-ubyte", images)  # no labels file beside it
    assert np.array_equal(load_images(tmp_path / "t-images-idx3-ubyte").images, expected)
    flat, nested = tmp_path / "flat", tmp_path / "nested"
    flat.mkdir()
    (nested / "a" / "deeper").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(flat / f"{i}.png")
        Image.fromarray(image).save(nested / "a" / ("deeper" if i % 2 else ".") / f"{i}.png")
    (flat / "notes.txt").write_text("not an image")
    data = load_images(flat)
    assert np.array_equal(data.images, expected) and "ignored 1 file" in data.notes[0]
    order = [int(name) for name in ("1", "3", "5", "0", "2", "4")]  # path order: a/deeper/* before a/*.png
    assert np.array_equal(load_images(nested).images, expected[order])


def test_folders_are_prepared_in_batches_like_one(tmp_path, glyphs, monkeypatch):
    from PIL import Image

    import edgetailor.toolkit.loaders as loaders

    images, _ = glyphs
    for label in ("3", "7"):
        (tmp_path / label).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).resize((28 + 7 * i, 28)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "7" / "blank.png").write_bytes((tmp_path / "7" / "0.png").read_bytes())
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "7" / "blank.png")
    whole = load_samples(tmp_path, skip_bad=True)
    monkeypatch.setattr(loaders, "FOLDER_BATCH_PIXELS", 1000)
    batched = load_samples(tmp_path, skip_bad=True)
    assert np.array_equal(whole.images, batched.images) and np.array_equal(whole.labels, batched.labels)
    assert whole.notes == batched.notes and any("blank.png" in note for note in whole.notes)
    with pytest.raises(SampleError, match="7/blank.png"):
        load_samples(tmp_path)


def test_damaged_npz_files_are_data_format_errors(tmp_path, glyphs):
    """What fuzzing found: each raised a bare BadZipFile, TypeError, TokenError, SystemError ... before."""
    import io
    import zipfile

    images, labels = glyphs
    np.savez(tmp_path / "ok.npz", x=images, y=labels)
    whole = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataFormatError, match="cut.npz is not a readable .npz file"):
        load_samples(tmp_path / "cut.npz")
    np.savez(tmp_path / "names0d.npz", x=images, y=labels, label_names=np.array("abc"))
    with pytest.raises(DataFormatError, match="label_names must be a 1-D array of strings"):
        load_samples(tmp_path / "names0d.npz")
    np.savez(tmp_path / "json.npz", x=images, y=labels, preprocess=np.array("{not json"))
    with pytest.raises(DataFormatError, match="preprocess is not valid JSON"):
        load_samples(tmp_path / "json.npz")
    np.savez(tmp_path / "deep.npz", x=images, y=labels, preprocess=np.array("[" * 100 + "]" * 100))
    with pytest.raises(LimitError, match="max_json_depth"):
        load_samples(tmp_path / "deep.npz")

    def rewritten(name: str, old: bytes, new: bytes, source: str = "ok.npz") -> None:
        out = io.BytesIO()
        with zipfile.ZipFile(tmp_path / source) as source, zipfile.ZipFile(out, "w") as target:
            for info in source.infolist():
                target.writestr(info.filename, source.read(info).replace(old, new, 1))
        (tmp_path / name).write_bytes(out.getvalue())

    rewritten("token.npz", b"'shape': (6, 28, 28)", b"'shape': '''(6, 28, 28)")  # tokenize.TokenError
    with pytest.raises(DataFormatError, match="token.npz: x.npy has a header numpy cannot parse"):
        load_samples(tmp_path / "token.npz")
    rewritten("object.npz", b"'|u1'", b"'|O' ")
    with pytest.raises(DataFormatError, match="not numbers or strings"):
        load_samples(tmp_path / "object.npz")
    np.savez(tmp_path / "ucs.npz", x=images, y=labels, label_names=np.array(["\U0010FFFF"] * 10))
    # numpy hands U+11FFFF on, and Python's str() of it fails with SystemError
    rewritten("ucs2.npz", b"\xff\xff\x10\x00", b"\xff\xff\x11\x00", source="ucs.npz")
    with pytest.raises(DataFormatError, match="characters outside Unicode"):
        load_samples(tmp_path / "ucs2.npz")
