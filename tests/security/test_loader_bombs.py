"""Small files that declare huge ones: each is refused from what its header
declares, naming the limit, in well under a second and without allocating
what it declares (tracemalloc sees numpy's and Python's allocations)."""

from __future__ import annotations

import gzip
import struct
import time
import tracemalloc

import numpy as np
import pytest

from edgetailor.toolkit.errors import DataFormatError, LimitError
from edgetailor.toolkit.limits import Limits
from edgetailor.toolkit.loaders import decode_image, load_images, load_samples, read_idx
from tests.security.bombs import idx_gz_bomb, idx_header, npy_bytes, npy_header, npz_bomb, png_of_size, write_zip

GLYPH = np.zeros((1, 28, 28), np.uint8)
GLYPH[0, 6:22, 12:16] = 255


def refused(call, error: type[Exception], match: str, seconds: float = 2.0, peak_mib: float = 64.0):
    """``call()`` raises ``error`` matching ``match``, fast and with little memory."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(error, match=match) as info:
            call()
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < seconds, f"refused after {elapsed:.2f} s"
    assert peak < peak_mib * 2**20, f"allocated {peak / 2**20:.0f} MiB before refusing"
    assert "hint:" in str(info.value)
    return info.value


# .npz -----------------------------------------------------------------------

def test_npz_label_value_of_two_billion(tmp_path):
    """One label of 2e9 made a table of 2e9 names (23 GB)."""
    np.savez(tmp_path / "labels.npz", x=GLYPH, y=np.array([2_000_000_000]))
    refused(lambda: load_samples(tmp_path / "labels.npz"), LimitError, "max_label_value")
    np.savez(tmp_path / "named.npz", x=GLYPH, y=np.array([2_000_000_000]), label_names=np.array(["a"]))
    refused(lambda: load_samples(tmp_path / "named.npz"), LimitError, "max_label_value")


def test_npz_label_limit_can_be_raised(tmp_path):
    np.savez(tmp_path / "labels.npz", x=GLYPH, y=np.array([70_000]))
    refused(lambda: load_samples(tmp_path / "labels.npz"), LimitError, "EDGETAILOR_LIMIT_MAX_LABEL_VALUE")
    data = load_samples(tmp_path / "labels.npz", limits=Limits(max_label_value=100_000))
    assert len(data.label_names) == 70_001 and data.labels.tolist() == [70_000]


def test_npz_member_inflating_to_1gib(tmp_path):
    """x.npy: 1 GiB of zeros in a 1 MB zip, refused from the zip directory's size."""
    bomb = npz_bomb(tmp_path / "bomb.npz", (1024, 1024, 1024))
    assert bomb.stat().st_size < 2 << 20
    refused(lambda: load_samples(bomb), LimitError, "max_sample_bytes")
    refused(lambda: load_images(bomb), LimitError, "max_sample_bytes")


def test_npz_member_over_the_compression_ratio(tmp_path):
    """Under the size limit, but inflating 1000x: no sample data compresses like that."""
    bomb = npz_bomb(tmp_path / "bomb.npz", (256, 1024, 1024))
    refused(lambda: load_samples(bomb), LimitError, "max_compression_ratio")


def test_npz_header_declaring_huge_arrays(tmp_path):
    """The npy header's shape is checked before the member's data is read."""
    count = write_zip(tmp_path / "count.npz", {"x.npy": npy_header((2_000_000, 28, 28)),
                                               "y.npy": npy_bytes(np.zeros(1, np.int64))})
    refused(lambda: load_samples(count), LimitError, "max_samples")
    pixels = npz_bomb(tmp_path / "pixels.npz", (1, 8000, 8000))
    refused(lambda: load_samples(pixels, limits=Limits(max_compression_ratio=1e6)), LimitError, "max_image_pixels")


def test_npz_one_colour_image_is_not_read_as_glyphs(tmp_path):
    """(28, 28, 3) with 28 labels was read as 28 images 3 pixels wide."""
    np.savez(tmp_path / "colour.npz", x=np.zeros((28, 28, 3), np.uint8), y=np.arange(28) % 10)
    error = refused(lambda: load_samples(tmp_path / "colour.npz"), DataFormatError,
                    "could be one 28x28 colour image or 28 grey images 3 pixels wide")
    assert "x[None]" in error.hint
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 28, 28, 3), np.uint8), y=np.array([1]))
    with pytest.raises(Exception, match="no usable ink"):  # read as one colour image (a blank one)
        load_samples(tmp_path / "one.npz")


# IDX ------------------------------------------------------------------------

def test_idx_gz_header_promising_10gb(tmp_path):
    bomb = idx_gz_bomb(tmp_path / "t-images-idx3-ubyte.gz", (10_000, 1000, 1000), zeros=1 << 20)
    refused(lambda: read_idx(bomb), LimitError, "max_sample_bytes")
    refused(lambda: load_images(bomb), LimitError, "max_sample_bytes")


def test_idx_gz_stream_longer_than_its_header(tmp_path):
    """A header for one image, then 1 GiB of zeros: only the declared bytes (and one more) are inflated."""
    bomb = idx_gz_bomb(tmp_path / "t-images-idx3-ubyte.gz", (1, 28, 28), zeros=1 << 30)
    refused(lambda: read_idx(bomb), DataFormatError, "more data follows the 784 bytes")


def test_idx_dimensions_that_overflow(tmp_path):
    (tmp_path / "t-images-idx3-ubyte").write_bytes(idx_header((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)))
    refused(lambda: read_idx(tmp_path / "t-images-idx3-ubyte"), LimitError, "max_samples")
    (tmp_path / "u-images-idx3-ubyte").write_bytes(idx_header((10, 0xFFFFFFFF, 0xFFFFFFFF)))
    refused(lambda: read_idx(tmp_path / "u-images-idx3-ubyte"), LimitError, "max_image_pixels")
    (tmp_path / "v-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 255]) + bytes(64))
    refused(lambda: read_idx(tmp_path / "v-images-idx3-ubyte"), DataFormatError, "255 dimensions")


def test_idx_int32_label_of_two_billion(tmp_path):
    (tmp_path / "t-images-idx3-ubyte").write_bytes(idx_header(GLYPH.shape) + GLYPH.tobytes())
    (tmp_path / "t-labels-idx1-ubyte").write_bytes(idx_header((1,), 0x0C) + struct.pack(">i", 2_000_000_000))
    refused(lambda: load_samples(tmp_path / "t-images-idx3-ubyte"), LimitError, "max_label_value")


def test_truncated_and_corrupt_gz_name_the_file(tmp_path):
    whole = gzip.compress(idx_header(GLYPH.shape) + GLYPH.tobytes())
    (tmp_path / "t-images-idx3-ubyte.gz").write_bytes(whole[:len(whole) // 2])
    refused(lambda: read_idx(tmp_path / "t-images-idx3-ubyte.gz"), DataFormatError, "t-images-idx3-ubyte.gz")
    (tmp_path / "u-images-idx3-ubyte.gz").write_bytes(whole[:10] + bytes(len(whole) - 10))
    refused(lambda: read_idx(tmp_path / "u-images-idx3-ubyte.gz"), DataFormatError, "u-images-idx3-ubyte.gz")
    (tmp_path / "v-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    refused(lambda: read_idx(tmp_path / "v-images-idx3-ubyte"), DataFormatError, "truncated")


# images -----------------------------------------------------------------------

@pytest.mark.parametrize("side", [12_000, 20_000])
def test_png_larger_than_the_pixel_limit(tmp_path, side):
    """144 and 400 megapixels in a few KB; 400 MP is over Pillow's own bomb
    limit too, but ours, which names itself and can be raised, fires first."""
    from PIL import Image

    bomb = png_of_size(tmp_path / "big.png", side, side)
    assert bomb.stat().st_size < 1 << 20
    before = Image.MAX_IMAGE_PIXELS
    refused(lambda: decode_image(bomb), LimitError, "max_image_pixels")
    assert Image.MAX_IMAGE_PIXELS == before
    refused(lambda: load_images(tmp_path), LimitError, "max_image_pixels")


def test_image_folder_file_count(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / f"{i}.png")
    refused(lambda: load_images(tmp_path, limits=Limits(max_samples=2)), LimitError, "max_samples")
