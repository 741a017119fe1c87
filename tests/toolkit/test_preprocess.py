"""One preprocessing for every input: containers, real captures, golden vectors."""

import json
from pathlib import Path

import numpy as np
import pytest

from edgetailor.toolkit.errors import SampleError
from edgetailor.toolkit.loaders import load_samples
from edgetailor.toolkit.preprocess import (DEFAULT, GlyphPreprocessing, MnistStyleV0, connected_components,
                                           from_spec, prepare_images)

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "preprocess" / "golden.npz"


@pytest.fixture(scope="module")
def mnist():
    from edgetailor.toolkit.real_users import load_mnist_5k

    data = load_mnist_5k()
    return data.images[:300], data.labels[:300]


def _on_paper(glyphs: np.ndarray, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """Dark ink on grey-white paper, off centre, with a lighting gradient and noise."""
    from PIL import Image

    out = []
    for glyph in glyphs:
        big = np.asarray(Image.fromarray(glyph).resize((56, 56), Image.BILINEAR), dtype=np.float64) / 255.0
        page = np.zeros((size, size))
        top, left = rng.integers(0, size - 56, 2)
        page[top:top + 56, left:left + 56] = big
        light = 0.75 + 0.2 * np.linspace(0, 1, size)[None, :]
        photo = light * (1.0 - 0.7 * page) + rng.normal(0, 0.02, page.shape)
        out.append(np.clip(photo, 0, 1))
    return np.stack(out)


def test_the_same_image_gives_the_same_sample_from_every_container(tmp_path, mnist):
    from PIL import Image

    from edgetailor.toolkit.captures import write_image_folder

    raw, labels = mnist[0][:40], mnist[1][:40]
    order = np.argsort(labels, kind="stable")
    raw, labels = raw[order], labels[order]
    api = prepare_images(raw).images
    np.savez(tmp_path / "u.npz", x=raw, y=labels)
    header = lambda a: bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)  # noqa: E731
    (tmp_path / "u-images-idx3-ubyte").write_bytes(header(raw) + raw.tobytes())
    (tmp_path / "u-labels-idx1-ubyte").write_bytes(header(labels.astype(np.uint8)) + labels.astype(np.uint8).tobytes())
    write_image_folder(list(raw), labels, [str(d) for d in range(10)], tmp_path / "folder", fmt="png")
    for path in ("u.npz", "u-images-idx3-ubyte", "folder"):
        data = load_samples(tmp_path / path)
        assert np.array_equal(data.images, api), path
        assert np.array_equal(data.labels, labels), path
    # A JPEG folder of the same images decodes to slightly different pixels; an RGB PNG to the same ones.
    (tmp_path / "rgb" / "3").mkdir(parents=True)
    Image.fromarray(raw[0]).convert("RGB").save(tmp_path / "rgb" / "3" / "a.png")
    assert np.array_equal(load_samples(tmp_path / "rgb").images[0], api[0])


def test_batches_and_single_images_agree(mnist):
    raw = mnist[0][:50]
    batch = prepare_images(raw).images
    one_by_one = np.stack([DEFAULT.prepare(image / 255.0) for image in raw])
    as_list = prepare_images([image for image in raw]).images
    assert np.array_equal(batch, one_by_one) and np.array_equal(batch, as_list)


def test_prepared_samples_are_fixed_points(mnist):
    once = prepare_images(mnist[0]).images
    twice = prepare_images(once).images
    assert (np.abs(once.astype(int) - twice).reshape(len(once), -1).max(axis=1) == 0).mean() >= 0.98


def test_noisy_dark_ink_on_paper_matches_the_clean_sample(mnist):
    rng = np.random.default_rng(0)
    clean = prepare_images(mnist[0][:60]).images
    photos = prepare_images(_on_paper(mnist[0][:60], rng)).images
    # the same glyph, placed the same way: closer than the clean sample is to itself one pixel over
    shifted = np.abs(np.roll(clean, 1, axis=2).astype(int) - clean).mean()
    assert np.abs(photos.astype(int) - clean).mean() < 0.8 * shifted


def test_speckles_and_border_smudges_are_ignored():
    glyph = np.zeros((60, 60))
    glyph[15:45, 27:33] = 1.0                      # a "1"
    clean = DEFAULT.prepare(glyph)
    dirty = glyph.copy()
    dirty[5, 5] = dirty[50, 52] = dirty[8, 49] = 1.0  # dust
    dirty[:, 0:2] = 0.8                            # the page edge, in shadow
    assert np.array_equal(DEFAULT.prepare(dirty), clean)


def test_polarity_and_blank_images():
    glyph = np.zeros((40, 40))
    glyph[8:32, 18:23] = 1.0
    assert np.array_equal(DEFAULT.prepare(1.0 - glyph), DEFAULT.prepare(glyph))
    images = [glyph, np.zeros((40, 40)), np.full((40, 40), 0.7), glyph * 0.03 + 0.5]
    with pytest.raises(SampleError, match="3 of 4 images have no usable ink"):
        prepare_images(images)
    kept = prepare_images(images, skip_bad=True)
    assert kept.kept.tolist() == [0] and [i for i, _ in kept.refused] == [1, 2, 3]


def test_bad_arrays_are_refused_with_the_reason():
    with pytest.raises(SampleError, match="NaN"):
        prepare_images(np.full((2, 28, 28), np.nan))
    with pytest.raises(SampleError, match=r"lie in \[0, 1\]"):
        prepare_images(np.full((2, 28, 28), 3.0))
    with pytest.raises(SampleError, match="dtype"):
        prepare_images(np.zeros((2, 28, 28), np.int32))
    with pytest.raises(SampleError, match="empty"):
        prepare_images(np.zeros((0, 28, 28), np.uint8))


def test_connected_components_match_a_flood_fill():
    rng = np.random.default_rng(1)
    mask = rng.random((3, 30, 30)) > 0.6
    labels, sizes = connected_components(mask)
    for n in range(3):
        seen = np.zeros((30, 30), bool)
        for r, c in zip(*np.nonzero(mask[n])):
            if seen[r, c]:
                continue
            stack, members = [(r, c)], []
            seen[r, c] = True
            while stack:
                y, x = stack.pop()
                members.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < 30 and 0 <= xx < 30 and mask[n, yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            stack.append((yy, xx))
            ids = {labels[n, y, x] for y, x in members}
            assert len(ids) == 1 and sizes[ids.pop()] == len(members)


def test_the_spec_round_trips_and_old_bundles_keep_their_behaviour():
    spec = json.loads(json.dumps(DEFAULT.to_dict()))
    assert from_spec(spec) == DEFAULT and from_spec(spec).name == "glyph-v1"
    assert isinstance(from_spec("mnist-style 20x20 box, centred by mass on 28x28"), MnistStyleV0)
    raw = np.random.default_rng(0).integers(0, 255, (2, 28, 28), dtype=np.uint8)
    assert np.array_equal(prepare_images(raw, from_spec(None)).images, raw)  # 0.1 bundles: 28x28 as it is
    with pytest.raises(SampleError, match="does not know"):
        from_spec({"name": "glyph-v9"})


def test_golden_vectors():
    """Inputs and the samples glyph-v1 must make of them, for every client
    (the mobile SDK and the firmware reuse this file). Regenerate only on
    purpose: python tests/fixtures/preprocess/make_golden.py."""
    with np.load(GOLDEN) as golden:
        spec = json.loads(str(golden["preprocess"]))
        preprocessing = from_spec(spec)
        assert isinstance(preprocessing, GlyphPreprocessing)
        count = int(golden["count"])
        for i in range(count):
            raw = golden[f"input_{i}"]
            assert np.array_equal(preprocessing.prepare(raw / 255.0 if raw.dtype == np.uint8 else raw),
                                  golden[f"output_{i}"]), f"golden vector {i}: {str(golden[f'what_{i}'])}"


def test_large_images_are_prepared_a_few_at_a_time(monkeypatch):
    """Chunks bounded by pixels (a batch of large images as float64 is 8x its bytes) give the same samples."""
    import edgetailor.toolkit.preprocess as preprocess

    rng = np.random.default_rng(0)
    images = np.zeros((5, 60, 40), np.uint8)
    for i, image in enumerate(images):
        image[10:50, 15 + i:22 + i] = 200 + rng.integers(0, 55)
    whole = prepare_images(images).images
    monkeypatch.setattr(preprocess, "PREPARE_PIXELS", 60 * 40 * 2)
    assert np.array_equal(prepare_images(images).images, whole)


@pytest.mark.parametrize("shape", [(4108, 12), (12, 4108), (2, 5000)])
def test_thin_strips_are_prepared_not_crashed_on(shape):
    """A side shorter than the working-size factor became zero pixels wide (IndexError, found by fuzzing)."""
    image = np.zeros(shape)
    image[shape[0] // 4:shape[0] // 2, shape[1] // 4:shape[1] // 2 + 1] = 1.0
    result = prepare_images([image], skip_bad=True)
    assert len(result.images) + len(result.refused) == 1
