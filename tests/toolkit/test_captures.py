import numpy as np
import pytest
from PIL import Image

from edgetailor.toolkit.captures import (
    TITLE_HEIGHT, CaptureStyle, render_capture, render_captures, sample_grid_png, write_image_folder,
)
from edgetailor.toolkit.errors import SampleError
from edgetailor.toolkit.real_users import load_mnist_5k

# A capture with no lighting, blur, noise, dust or JPEG: the glyph's pixels are plain to find.
CLEAN = CaptureStyle(lighting=(0.0, 0.0), blur_sigma=(0.0, 0.0), noise_sigma=(0.0, 0.0), jpeg_quality=None,
                     max_dust=0, paper_texture=0.0)


@pytest.fixture(scope="module")
def digits():
    data = load_mnist_5k()
    return data.subset(np.arange(0, 5000, 125))  # 40 real digits, 4 of each class


@pytest.fixture(scope="module")
def captures(digits):
    return render_captures(digits, seed=0)


def grey(image):
    return image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def test_captures_are_rgb_of_varying_size_within_the_range(digits, captures):
    style = CaptureStyle()
    assert len(captures) == len(digits)
    for image in captures:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert style.size[0] <= min(image.shape[:2]) and max(image.shape[:2]) <= style.size[1]
        assert max(image.shape[:2]) <= style.max_aspect * min(image.shape[:2]) + 1
    shapes = {image.shape[:2] for image in captures}
    assert len(shapes) > 30 and any(h != w for h, w in shapes)


def test_captures_are_dark_ink_on_light_paper(captures):
    for image in captures:
        level = grey(image)
        paper = np.median(level)
        ink = np.sort(level.ravel())[: max(1, level.size // 50)].mean()  # the darkest 2 %: strokes
        assert paper > 0.5 * 255 and ink < 0.75 * paper
        # the paper is lit and tinted, not a flat colour
        assert level.std() > 1.0


def test_the_glyph_box_stays_whole_inside_the_frame():
    outline = np.zeros((28, 28), np.uint8)
    outline[:2], outline[-2:], outline[:, :2], outline[:, -2:] = 255, 255, 255, 255
    for seed in range(60):  # offsets reach the frame's edges
        image = grey(render_capture(outline, np.random.default_rng(seed), CLEAN))
        dark = image < (np.median(image) + image.min()) / 2
        rows, cols = np.flatnonzero(dark.any(axis=1)), np.flatnonzero(dark.any(axis=0))
        box = dark[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        # all four sides of the square came out: none was cut off by the frame
        for side in (box[0], box[-1], box[:, 0], box[:, -1]):
            assert side.mean() > 0.9
        assert abs(box.shape[0] - box.shape[1]) <= 2


def test_captures_are_deterministic_per_seed_and_sample(digits, captures):
    again = render_captures(digits.subset(np.arange(5)), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(captures[:5], again))
    other = render_captures(digits.subset(np.arange(5)), seed=1)
    assert not any(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(captures[:5], other))


def test_style_ranges_are_checked():
    with pytest.raises(SampleError):
        CaptureStyle(size=(200, 100))
    with pytest.raises(SampleError):
        CaptureStyle(glyph_scale=(0.5, 1.2))
    with pytest.raises(SampleError):
        CaptureStyle(offset=1.5)
    small = render_capture(np.full((28, 28), 255, np.uint8), np.random.default_rng(0), CaptureStyle(size=(20, 20)))
    assert small.shape == (20, 20, 3)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_image_folder_has_one_folder_per_label(tmp_path, digits, captures, fmt):
    root = write_image_folder(captures[:12], digits.labels[:12], digits.label_names, tmp_path / "caps", fmt=fmt)
    assert sorted(p.name for p in root.iterdir()) == sorted(digits.label_names)
    files = sorted(root.rglob(f"*.{fmt}"))
    assert len(files) == 12 and not list(root.rglob("*.tmp"))
    for i, (image, label) in enumerate(zip(captures[:12], digits.labels[:12])):
        path = root / digits.label_names[label] / f"{i:05d}.{fmt}"
        with Image.open(path) as read:
            back = np.asarray(read.convert("RGB"))
        assert back.shape == image.shape
        if fmt == "png":
            assert np.array_equal(back, image)
        else:  # quality 95: close to what was rendered
            assert np.abs(back.astype(int) - image).mean() < 3


def test_image_folder_refuses_bad_labels(tmp_path, captures):
    with pytest.raises(SampleError):
        write_image_folder(captures[:2], [0, 1], ["a", "b/c"], tmp_path)
    with pytest.raises(SampleError):
        write_image_folder(captures[:2], [0, 2], ["a", "b"], tmp_path)
    with pytest.raises(SampleError):
        write_image_folder(captures[:2], [0, 1], ["a", "b"], tmp_path, fmt="gif")


def test_contact_sheet_opens_and_has_the_expected_size(tmp_path, digits, captures):
    images = captures[:23] + [digits.images[0]]  # RGB captures of any size and a grey glyph
    path = sample_grid_png(images, tmp_path / "grid.png", columns=10, cell=64)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG" and sheet.size == (640, 3 * 64)
    titled = sample_grid_png(images[:4], tmp_path / "titled.png", cell=50, titles=["a", "b", "c", "d"])
    with Image.open(titled) as sheet:
        assert sheet.size == (4 * 50, 50 + TITLE_HEIGHT)
    with pytest.raises(SampleError):
        sample_grid_png([], tmp_path / "none.png")


def test_the_folder_loader_reads_captures_back(tmp_path, digits, captures):
    from edgetailor.toolkit.loaders import load_samples

    root = write_image_folder(captures[:20], digits.labels[:20], digits.label_names, tmp_path / "f")
    back = load_samples(root)
    assert back.images.shape == (20, 28, 28) and back.label_names == digits.label_names
    assert sorted(back.labels) == sorted(digits.labels[:20])
    # normalised back to white ink on black
    assert np.median(back.images) < 30 and back.images.max() > 200
