"""Realistic captures: what a phone photo or scan of the same glyph looks like.

MNIST-style glyphs are white ink on black, centred and clean; what a device
is handed is a photo or a scan: dark ink on off-white paper, off centre, at
whatever size the camera gave, unevenly lit, a little blurred, noisy and
JPEG-compressed. Rendering benchmark glyphs as such captures tests the whole
input path (folder loading, normalisation, the model) on inputs like the real
ones, with labels known. Everything is drawn from a seed, so a capture set can
be rebuilt exactly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetailor.toolkit.atomic import write_bytes
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import SampleError

TITLE_HEIGHT = 12  # pixels under each cell of a contact sheet, for its title

WARM = np.array([1.0, 0.1, -1.0])  # white-balance axes, as per-channel gains
GREEN = np.array([-0.5, 1.0, -0.5])

# Ink hues, normalised to a maximum of 1 (their darkness comes from the
# contrast): black pen, blue-black ink, blue ballpoint, graphite pencil.
INK_HUES = np.array([
    [1.00, 1.00, 1.00],
    [0.60, 0.66, 1.00],
    [0.38, 0.48, 1.00],
    [0.92, 0.94, 1.00],
])


@dataclass(frozen=True)
class CaptureStyle:
    """Ranges each capture draws its degradations from, uniformly. Levels are
    fractions of full brightness (255); sizes are pixels.

    The defaults are a phone photo or office scan of a handwritten digit on
    plain paper, cropped loosely: always readable, never pristine.
    """

    size: tuple[int, int] = (48, 160)  # each side of the frame, drawn independently
    max_aspect: float = 1.4  # the longer side over the shorter, at most
    glyph_scale: tuple[float, float] = (0.55, 0.95)  # the 28x28 glyph box over the frame's shorter side
    offset: float = 0.9  # how far off centre the glyph may sit, as a fraction of the room to the edge
    paper_level: tuple[float, float] = (0.72, 0.96)  # paper brightness
    paper_tint: float = 0.06  # white-balance cast of the paper, warm or cool, at most
    paper_texture: float = 0.025  # amplitude of low-frequency paper texture
    lighting: tuple[float, float] = (0.0, 0.35)  # brightness lost from one side (or the centre) to the other
    ink_contrast: tuple[float, float] = (0.5, 0.9)  # 1 - ink luminance / paper luminance
    stroke_hardness: tuple[float, float] = (1.0, 2.5)  # >1 gives pen strokes a solid core and crisp edges
    blur_sigma: tuple[float, float] = (0.0, 1.2)  # Gaussian focus blur, pixels
    noise_sigma: tuple[float, float] = (0.01, 0.04)  # sensor noise
    jpeg_quality: tuple[int, int] | None = (55, 90)  # None: no JPEG artefacts
    max_dust: int = 3  # dark speckles outside the glyph, 0 to this many

    def __post_init__(self) -> None:
        lo, hi = self.size
        if not 8 <= lo <= hi:
            raise SampleError(f"capture size range {self.size} must satisfy 8 <= low <= high",
                              hint="give CaptureStyle(size=(low, high)) in pixels, e.g. (48, 160)")
        if not 0.0 < self.glyph_scale[0] <= self.glyph_scale[1] <= 1.0:
            raise SampleError(f"glyph_scale {self.glyph_scale} must lie in (0, 1]",
                              hint="the glyph box must fit inside the frame: keep glyph_scale at most 1")
        if not 0.0 <= self.offset <= 1.0:
            raise SampleError(f"offset {self.offset} must lie in [0, 1]",
                              hint="1 lets the glyph box touch the frame's edge; more would cut it off")


def _draw(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _frame_size(rng: np.random.Generator, style: CaptureStyle) -> tuple[int, int]:
    lo, hi = style.size
    height = int(rng.integers(lo, hi + 1))
    width = int(rng.integers(lo, hi + 1))
    # Clamp the aspect ratio by pulling the longer side in, within the range.
    if max(height, width) > style.max_aspect * min(height, width):
        longer = max(lo, int(style.max_aspect * min(height, width)))
        height, width = (longer, width) if height > width else (height, longer)
    return height, width


def _resize_float(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    resized = Image.fromarray(np.asarray(image, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _low_frequency_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise with about ``cells`` bumps across the frame, unit standard
    deviation: uneven fibre density and shading of paper."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = _resize_float(coarse, height, width)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _lighting(rng: np.random.Generator, height: int, width: int, strength: float) -> np.ndarray:
    """Multiplicative illumination: a linear falloff across the frame in a
    random direction (a lamp to one side) or a radial one from a random
    point (a phone's vignette, a spot light). 1 at the brightest point."""
    rows = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    cols = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    if rng.random() < 0.5:
        angle = rng.uniform(0.0, 2 * np.pi)
        ramp = np.cos(angle) * cols + np.sin(angle) * rows
    else:
        centre_r, centre_c = rng.uniform(-0.5, 0.5, size=2)
        ramp = (rows - centre_r) ** 2 + (cols - centre_c) ** 2
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    return (1.0 - strength * ramp).astype(np.float32)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) or (H, W, C) float image, edges
    replicated so the frame's border does not darken."""
    if sigma <= 0.05:
        return image
    radius = max(1, int(np.ceil(3.0 * sigma)))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = image.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(k * np.take(padded, np.arange(i, i + n), axis=axis) for i, k in enumerate(kernel))
    return out.astype(np.float32)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8)


def render_capture(glyph: np.ndarray, rng: np.random.Generator, style: CaptureStyle = CaptureStyle()) -> np.ndarray:
    """One white-on-black glyph (28x28 uint8, or any size) as a photo of
    dark ink on paper: RGB uint8 (H, W, 3), H and W within ``style.size``.

    The glyph's whole box is placed inside the frame, so no ink is cut off.
    Degradations follow the physics' order: ink on paper, lighting on both,
    then the lens blurs, the sensor adds noise and the camera compresses.
    """
    glyph = np.asarray(glyph)
    if glyph.ndim != 2:
        raise SampleError(f"render_capture takes one (H, W) glyph, got shape {glyph.shape}")
    coverage = glyph.astype(np.float32) / (255.0 if glyph.dtype == np.uint8 else max(float(glyph.max()), 1.0))

    height, width = _frame_size(rng, style)
    box = max(4, int(round(_draw(rng, style.glyph_scale) * min(height, width))))
    box_h = max(4, min(height, int(round(box * glyph.shape[0] / max(glyph.shape)))))
    box_w = max(4, min(width, int(round(box * glyph.shape[1] / max(glyph.shape)))))
    room_r, room_c = height - box_h, width - box_w
    top = int(round(room_r / 2 * (1.0 + style.offset * rng.uniform(-1.0, 1.0))))
    left = int(round(room_c / 2 * (1.0 + style.offset * rng.uniform(-1.0, 1.0))))
    alpha = np.zeros((height, width), dtype=np.float32)
    placed = np.clip(_resize_float(coverage, box_h, box_w), 0.0, 1.0)
    # MNIST's anti-aliased strokes upscaled are soft all through; a pen
    # leaves a solid core with a narrow soft edge.
    placed = np.clip(placed * _draw(rng, style.stroke_hardness), 0.0, 1.0)
    alpha[top:top + box_h, left:left + box_w] = placed

    level = _draw(rng, style.paper_level)
    # White balance errs mostly along warm-cool (lamp vs daylight), with a
    # little green-magenta; strong pinks or greens look like coloured paper.
    warmth, green = rng.uniform(-1.0, 1.0), rng.uniform(-0.3, 0.3)
    paper_rgb = level * (1.0 + style.paper_tint * (warmth * WARM + green * GREEN))
    texture = (0.6 * _low_frequency_noise(rng, height, width, int(rng.integers(3, 7)))
               + 0.4 * _low_frequency_noise(rng, height, width, int(rng.integers(10, 20))))
    paper = paper_rgb[None, None, :] * (1.0 + style.paper_texture * texture[:, :, None])

    hue = INK_HUES[rng.integers(len(INK_HUES))] * (1.0 + rng.uniform(-0.05, 0.05, size=3))
    luminance = np.array([0.299, 0.587, 0.114])
    target = float(paper_rgb @ luminance) * (1.0 - _draw(rng, style.ink_contrast))
    ink_rgb = np.clip(hue * target / float(hue @ luminance), 0.0, 1.0)
    # Ink soaks in unevenly: a little of the paper's texture shows through it.
    ink = ink_rgb[None, None, :] * (1.0 + 2.0 * style.paper_texture * texture[:, :, None])
    image = paper + alpha[:, :, None] * (ink - paper)

    image = _add_dust(image, rng, style.max_dust, (top, left, box_h, box_w), target)
    image = image * _lighting(rng, height, width, _draw(rng, style.lighting))[:, :, None]
    image = _gaussian_blur(image, _draw(rng, style.blur_sigma))
    image = image + rng.normal(0.0, _draw(rng, style.noise_sigma), size=image.shape).astype(np.float32)
    image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if style.jpeg_quality is not None:
        image = _jpeg(image, int(rng.integers(style.jpeg_quality[0], style.jpeg_quality[1] + 1)))
    return image


def _add_dust(image: np.ndarray, rng: np.random.Generator, max_dust: int, glyph_box: tuple[int, int, int, int],
              ink_level: float) -> np.ndarray:
    """A few small dark specks (dust, toner, pen dots) on the paper outside
    the glyph's box, so they never touch the digit itself."""
    height, width = image.shape[:2]
    top, left, box_h, box_w = glyph_box
    n = int(rng.integers(0, max_dust + 1)) if max_dust > 0 else 0
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    for _ in range(n):
        r, c = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.5, 1.6)
        margin = radius + 2.0
        if top - margin <= r <= top + box_h + margin and left - margin <= c <= left + box_w + margin:
            continue  # would touch the glyph: this speck is skipped, not moved, to keep the draw count fixed
        speck = np.clip(radius + 0.5 - np.hypot(rows - r, cols - c), 0.0, 1.0) * rng.uniform(0.3, 0.8)
        image = image + speck[:, :, None] * (ink_level - image)
    return image


def render_captures(data: LabeledImages, seed: int = 0, style: CaptureStyle = CaptureStyle()) -> list[np.ndarray]:
    """Every image of a LabeledImages as a capture, in order. Capture i
    depends only on (seed, i), so a subset or a longer set renders its
    shared images identically."""
    return [render_capture(image, np.random.default_rng([seed, i]), style) for i, image in enumerate(data.images)]


def write_image_folder(images: list[np.ndarray], labels, label_names: list[str], root: str | Path,
                       fmt: str = "jpg") -> Path:
    """Captures as a labelled image folder, the layout ``loaders`` reads:
    ``root/<label name>/<index>.<fmt>``, the index being the image's
    position in ``images`` so each file names its source sample. JPEG is
    written at quality 95, so the artefacts that show are the capture's own;
    PNG is lossless. Each file appears whole or not at all."""
    from PIL import Image

    fmt = fmt.lower().lstrip(".")
    if fmt not in ("jpg", "png"):
        raise SampleError(f"unknown image format {fmt!r}", hint="write fmt='jpg' or fmt='png'")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images):
        raise SampleError(f"{len(images)} images but {len(labels)} labels")
    for name in label_names:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise SampleError(f"label name {name!r} cannot be a folder name",
                              hint="rename the label: no slashes, not empty, not '.' or '..'")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(label_names)):
        raise SampleError(f"labels run from {labels.min()} to {labels.max()} but there are "
                              f"{len(label_names)} label names")
    root = Path(root)
    for name in label_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        array = np.asarray(image, dtype=np.uint8)
        buffer = io.BytesIO()
        picture = Image.fromarray(array)
        if fmt == "jpg":
            picture.save(buffer, format="JPEG", quality=95)
        else:
            picture.save(buffer, format="PNG")
        write_bytes(root / label_names[label] / f"{index:05d}.{fmt}", buffer.getvalue())
    return root


def sample_grid_png(images: list[np.ndarray], path: str | Path, columns: int = 10, cell: int = 64,
                    titles: list[str] | None = None) -> Path:
    """A contact sheet, so a person can see at a glance whether captures (or
    any glyphs, grey or RGB, of any size) look right. Each image is scaled to
    fit a ``cell`` square on white, keeping its aspect; a title, if given,
    sits in a strip under it. The sheet is min(columns, n) cells wide and
    ceil(n / columns) rows of ``cell`` (+ ``TITLE_HEIGHT`` with titles) high."""
    from PIL import Image, ImageDraw

    if not images:
        raise SampleError("sample_grid_png needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise SampleError(f"{len(images)} images but {len(titles)} titles")
    columns = max(1, min(columns, len(images)))
    n_rows = -(-len(images) // columns)
    strip = TITLE_HEIGHT if titles is not None else 0
    sheet = Image.new("RGB", (columns * cell, n_rows * (cell + strip)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
        picture = Image.fromarray(array).convert("RGB")
        inner = max(1, cell - 4)
        scale = inner / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.BILINEAR)
        x0, y0 = (i % columns) * cell, (i // columns) * (cell + strip)
        sheet.paste(picture, (x0 + (cell - picture.width) // 2, y0 + (cell - picture.height) // 2))
        if titles is not None:
            draw.text((x0 + 2, y0 + cell), str(titles[i])[: max(1, cell // 6)], fill=(0, 0, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())
    return Path(path)

