"""One preprocessing for every input: whatever the container, the same image
becomes the same 28x28 sample, bit for bit.

GE was trained on glyphs normalised one way (ink found, fitted into a 20x20
box, centred by mass on a 28x28 canvas). A user's samples arrive as `.npz`
arrays, IDX files, phone photos, scans or arrays passed to the API; if any
of those paths normalised differently, the samples LE trains on would no
longer look like what the device sees at prediction time. So every path
calls ``Preprocessing.prepare``, and the bundle's input spec names the
preprocessing and its parameters (``to_dict``), so that the mobile SDK and
the firmware can apply it identically (golden vectors:
``tests/fixtures/preprocess/``).

Real captures have noise, uneven light, JPEG artefacts and dark ink on light
paper. ``glyph-v1`` therefore finds the ink robustly (steps in
``GlyphPreprocessing.prepare``): polarity from the histogram, background
removed with a grey opening, a noise floor from the background's own spread,
an Otsu threshold, speckles and border smudges dropped by connected-component
size, then the MNIST box, centring and a contrast stretch. It is written in
numpy alone because the device side has no scipy or OpenCV.

``mnist-style-v0`` is what bundles before 0.2 did (28x28 arrays as they
are, other sizes boxed with a fixed 0.05 ink threshold), kept so that those
bundles answer exactly as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np

from edgetailor.toolkit.errors import SampleError
from edgetailor.toolkit.imaging import BOX, CANVAS, mnist_style, resize


class BlankImageError(ValueError):
    """An image with no ink to find (blank, uniform, or contrast too low)."""


class Preprocessing(Protocol):
    name: str

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """One grey image (H, W), float in [0, 1], either polarity -> uint8 (28, 28), white ink on black."""

    def prepare_batch(self, grey: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """N images of one size -> uint8 (N, 28, 28) and, per image, why it is blank ("" if not)."""

    def to_dict(self) -> dict[str, Any]: ...


def as_grey_float(image: Any) -> np.ndarray:
    """Images as a person sees them, float64 in [0, 1]: uint8, uint16 and
    float (0-1) greys; RGB(A) by luminance (ITU-R 601, as Pillow's "L"), alpha
    composited onto white. One image (H, W[, C]) or a batch (N, H, W[, C]):
    a last axis of 3 or 4 is colour."""
    array = np.asarray(image)
    if array.ndim == 0 or array.size == 0:
        raise SampleError(f"an image must be (H, W) grey or (H, W, 3|4) colour, got shape {array.shape}")
    colour = array.ndim >= 3 and array.shape[-1] in (3, 4)
    if array.ndim - colour not in (2, 3):
        raise SampleError(f"an image must be (H, W) grey or (H, W, 3|4) colour, got shape {array.shape}")
    if array.dtype == np.uint8:
        values = array.astype(np.float64) / 255.0
    elif array.dtype == np.uint16:
        values = array.astype(np.float64) / 65535.0
    elif array.dtype == np.bool_:
        values = array.astype(np.float64)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise SampleError("the images contain NaN or infinite values", hint="drop or repair those images")
        if array.min() < 0.0 or array.max() > 1.0:
            raise SampleError(f"float images must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]",
                              hint="divide 0-255 images by 255, or pass them as uint8")
        values = array.astype(np.float64)
    else:
        raise SampleError(f"images must be uint8, uint16 or float in [0, 1], got dtype {array.dtype}",
                          hint="convert with images.astype(np.uint8) if the values are 0-255")
    if not colour:
        return values
    grey = values[..., :3] @ np.array([0.299, 0.587, 0.114])
    if array.shape[-1] == 4:
        alpha = values[..., 3]
        grey = grey * alpha + (1.0 - alpha)
    return grey


# numpy building blocks ------------------------------------------------------

def _filter(images: np.ndarray, size: int, reduce) -> np.ndarray:
    """Separable ``size`` x ``size`` min or max filter (``reduce`` is
    np.minimum or np.maximum) over the last two axes, edges replicated.
    Windows are built by doubling (van Herk's idea, simplified): log2(size)
    whole-array operations instead of a strided reduction per window."""
    half = size // 2
    out = images
    for _ in range(2):  # the last axis, then (after the swap) the one before it
        out = np.swapaxes(out, -1, -2)
        padded = np.concatenate([np.repeat(out[..., :1], half, axis=-1), out,
                                 np.repeat(out[..., -1:], size - 1 - half, axis=-1)], axis=-1)
        length, span = out.shape[-1], 1
        while span * 2 <= size:  # padded[..., i] now reduces the window [i, i + span)
            padded = reduce(padded[..., :-span], padded[..., span:])
            span *= 2
        out = reduce(padded[..., :length], padded[..., size - span:size - span + length])
    return out


def otsu_thresholds(images: np.ndarray, bins: int = 256) -> np.ndarray:
    """Per image (N, ...) with values in [0, 1], the threshold between two
    classes that maximises the between-class variance (Otsu 1979)."""
    n = len(images)
    binned = np.minimum((images.reshape(n, -1) * bins).astype(np.int64), bins - 1)
    hist = np.bincount((binned + np.arange(n)[:, None] * bins).ravel(), minlength=n * bins)
    hist = hist.reshape(n, bins).astype(np.float64)
    centres = (np.arange(bins) + 0.5) / bins
    weight0 = np.cumsum(hist, axis=1)
    weight1 = weight0[:, -1:] - weight0
    mass0 = np.cumsum(hist * centres, axis=1)
    mean0 = mass0 / np.maximum(weight0, 1e-12)
    mean1 = (mass0[:, -1:] - mass0) / np.maximum(weight1, 1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return (np.argmax(between[:, :-1], axis=1) + 1) / bins


def row_median(values: np.ndarray) -> np.ndarray:
    """Median of each row, ignoring NaN (NaN for an all-NaN row). Sorting all
    rows at once: np.nanmedian loops over rows in Python."""
    ordered = np.sort(values, axis=1)  # NaN sorts last
    count = (~np.isnan(values)).sum(axis=1)
    rows = np.arange(len(values))
    low = ordered[rows, np.maximum((count - 1) // 2, 0)]
    high = ordered[rows, np.maximum(count // 2, 0)]
    return np.where(count > 0, (low + high) / 2.0, np.nan)


def row_quantile_higher(values: np.ndarray, q: float) -> np.ndarray:
    """``np.quantile(row, q, method="higher")`` of each row, ignoring NaN."""
    ordered = np.sort(values, axis=1)
    count = (~np.isnan(values)).sum(axis=1)
    index = np.ceil(q * np.maximum(count - 1, 0)).astype(np.int64)
    return np.where(count > 0, ordered[np.arange(len(values)), index], np.nan)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of boolean masks (N, H, W), each image its own
    graph: labels (N, H, W), -1 outside the mask, else the flat index of the
    component's root; and the size of each root's component. Vectorised
    union-find (hooking and pointer jumping) over the whole batch, because a
    per-pixel flood fill in Python costs milliseconds per image."""
    n, h, w = mask.shape
    index = np.arange(n * h * w).reshape(n, h, w)
    sources, targets = [], []
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        r1, c0, c1 = h - dr, max(0, -dc), w - max(0, dc)
        both = mask[:, :r1, c0:c1] & mask[:, dr:r1 + dr, c0 + dc:c1 + dc]
        sources.append(index[:, :r1, c0:c1][both])
        targets.append(index[:, dr:r1 + dr, c0 + dc:c1 + dc][both])
    u, v = np.concatenate(sources), np.concatenate(targets)
    parent = np.arange(n * h * w)
    while u.size:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            break
        u, v, pu, pv = u[differ], v[differ], pu[differ], pv[differ]
        low = np.minimum(pu, pv)
        np.minimum.at(parent, pu, low)
        np.minimum.at(parent, pv, low)
        while True:  # pointer jumping: every pixel points at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    flat = mask.ravel()
    return np.where(flat, parent, -1).reshape(n, h, w), np.bincount(parent[flat], minlength=n * h * w)


# the glyph preprocessing ---------------------------------------------------

@dataclass(frozen=True)
class GlyphPreprocessing:
    """``glyph-v1``: a handwritten glyph in any capture -> an MNIST-style sample.

    Every parameter is in the bundle, so that another client reproduces the
    steps exactly; the defaults were chosen on clean, noisy and photographed
    digits (benchmarks/real_inputs.py)."""

    name: ClassVar[str] = "glyph-v1"
    canvas: int = CANVAS              # output side
    box: int = BOX                    # the ink's bounding box is fitted into box x box
    working_size: int = 112           # larger captures are area-averaged to at most this side first
    min_contrast: float = 0.08        # p99.9 - p0.1 below this: no ink, the image is refused as blank
    background_window: float = 1 / 2  # the opening that estimates the paper spans this share of the side
    noise_sigmas: float = 4.0         # the noise floor: background median + this many robust sigmas
    min_component: float = 0.04       # ink components under this share of the ink are speckles
    border_keep: float = 0.5          # a component touching the border is a smudge unless it holds this share
    keep_radius: float = 1 / 7        # pixels within this share of the side of kept ink stay (anti-aliasing)
    stretch_quantile: float = 0.9     # this quantile of the inked pixels becomes full white

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    def prepare(self, image: np.ndarray) -> np.ndarray:
        out, blank = self.prepare_batch(np.asarray(image, dtype=np.float64)[None])
        if blank[0]:
            raise BlankImageError(blank[0])
        return out[0]

    def prepare_batch(self, grey: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """``prepare`` of N images of one size at once, vectorised: a Python
        loop per image cost 2.5 ms, this about 175 µs for a 28x28 image. Returns uint8 (N, 28, 28)
        and, per image, why it is blank ("" for a good one; its output is zeros).
        Every step is per image: an image's result never depends on the batch."""
        if grey.ndim != 3 or min(grey.shape[1:]) < 2:
            raise SampleError(f"an image must be 2-D and at least 2x2, got shape {grey.shape[1:]}")
        n = len(grey)
        why = [""] * n
        # 1. Working size: a 4000-pixel photo holds no more glyph than 112 pixels do.
        #    A side shorter than the factor (a 4000x12 strip) becomes one pixel, not none.
        factor = -(-max(grey.shape[1:]) // self.working_size)
        if factor > 1:
            fh, fw = min(factor, grey.shape[1]), min(factor, grey.shape[2])
            h, w = (grey.shape[1] // fh) * fh, (grey.shape[2] // fw) * fw
            grey = grey[:, :h, :w].reshape(n, h // fh, fh, w // fw, fw).mean(axis=(2, 4))
        _, h, w = grey.shape
        flat = grey.reshape(n, -1)
        # 2. Polarity: the paper is the majority of pixels; ink is the minority far from it.
        # (0.1 % tails: a small glyph in a large frame is well under 1 % of its pixels)
        low, median, high = np.percentile(flat, [0.1, 50, 99.9], axis=1)
        faint = high - low < self.min_contrast
        invert = (median - low > high - median)[:, None, None]
        grey = np.where(invert, 1.0 - grey, grey)
        # 3. Background: a grey opening wider than any stroke keeps only the
        #    slowly varying paper (lighting gradients, shadows); subtract it.
        window = max(3, int(round(min(h, w) * self.background_window)) | 1)
        ink = np.clip(grey - _filter(_filter(grey, window, np.minimum), window, np.maximum), 0.0, None)
        # 4. Otsu's threshold on each image's ink, then a noise floor from the
        #    background's own spread (median + k robust sigmas) under it.
        peak = np.maximum(ink.reshape(n, -1).max(axis=1), 1e-12)[:, None, None]
        threshold = otsu_thresholds(ink / peak)[:, None, None] * peak
        paper = np.where(ink < threshold, ink, np.nan).reshape(n, -1)
        centre = row_median(paper)
        spread = row_median(np.abs(paper - centre[:, None]))
        floor = np.nan_to_num(centre + self.noise_sigmas * 1.4826 * spread)[:, None, None]
        ink = np.clip(ink - floor, 0.0, None)
        # 5. Ink components: drop speckles and smudges touching the border.
        mask = (ink >= threshold - floor) & (ink > 0) & ~faint[:, None, None]
        labels, sizes = connected_components(mask)
        owner = np.arange(sizes.size) // (h * w)                  # the image a component root lies in
        total = np.bincount(owner, weights=sizes, minlength=n)
        on_border = np.zeros(sizes.size, bool)
        edge = np.concatenate([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], axis=1).ravel()
        on_border[edge[edge >= 0]] = True
        interior = np.bincount(owner, weights=sizes * ~on_border, minlength=n)
        # A smudge touches the border beside a glyph that does not; a tightly
        # cropped glyph touches it everywhere, and stays.
        smudges = on_border & (interior >= self.border_keep * total)[owner] & (sizes < self.border_keep * total[owner])
        keep = (sizes >= np.maximum(2.0, self.min_component * total[owner])) & ~smudges
        kept = np.where(labels >= 0, keep[np.maximum(labels, 0)], False)
        radius = max(1, int(round(min(h, w) * self.keep_radius)))
        near = _filter(kept.astype(np.uint8), 2 * radius + 1, np.maximum) > 0
        ink = np.where(near, ink, 0.0)
        # 6. The MNIST box: the ink's bounding box fitted into box x box, aspect kept.
        rows, cols = ink.any(axis=2), ink.any(axis=1)
        r0, c0 = rows.argmax(axis=1), cols.argmax(axis=1)
        r1, c1 = h - rows[:, ::-1].argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
        mass = ink.sum(axis=(1, 2))
        # the centre of mass within the box, for the glyphs that need no resizing
        com_r = np.einsum("nh,h->n", ink.sum(axis=2), np.arange(h, dtype=np.float64)) / np.maximum(mass, 1e-300) - r0
        com_c = np.einsum("nw,w->n", ink.sum(axis=1), np.arange(w, dtype=np.float64)) / np.maximum(mass, 1e-300) - c0
        canvas = np.zeros((n, self.canvas, self.canvas))
        middle = (self.canvas - 1) / 2.0
        for i in range(n):
            if faint[i]:
                why[i] = f"no ink: contrast {high[i] - low[i]:.3f} < {self.min_contrast}"
                continue
            if mass[i] <= 0:
                why[i] = "only speckles or border smudges, no glyph" if total[i] else "no ink above the noise"
                continue
            glyph = ink[i, r0[i]:r1[i], c0[i]:c1[i]]
            gh, gw = glyph.shape
            scale = self.box / max(gh, gw)
            nh, nw = max(1, int(round(gh * scale))), max(1, int(round(gw * scale)))
            cr, cc = com_r[i], com_c[i]
            if (nh, nw) != (gh, gw):
                glyph = resize(glyph.astype(np.float32), nh, nw).astype(np.float64)
                weight = glyph.sum()
                cr = (glyph.sum(axis=1) @ np.arange(nh, dtype=np.float64)) / weight
                cc = (glyph.sum(axis=0) @ np.arange(nw, dtype=np.float64)) / weight
            # 7. The centre of mass at the canvas centre, the glyph kept whole on the canvas.
            top = min(max(int(round(middle - cr)), 0), self.canvas - nh)
            left = min(max(int(round(middle - cc)), 0), self.canvas - nw)
            canvas[i, top:top + nh, left:left + nw] = glyph
        # 8. Contrast: the stroke's typical brightness becomes white, whatever the pen and light.
        inked = np.where(canvas > 0.5 / 255.0, canvas, np.nan).reshape(n, -1)
        level = row_quantile_higher(inked, self.stretch_quantile)
        canvas = np.minimum(canvas / np.where(np.isnan(level), 1.0, level)[:, None, None], 1.0)
        return np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8), why


@dataclass(frozen=True)
class MnistStyleV0:
    """What bundles before 0.2 did: 28x28 arrays taken as they are, other
    sizes boxed MNIST-style with a fixed 0.05 ink threshold, no polarity check."""

    name: ClassVar[str] = "mnist-style-v0"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def prepare(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image, dtype=np.float64)
        if image.shape == (CANVAS, CANVAS):
            out = image
        else:
            out = mnist_style(image.astype(np.float32))
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)

    def prepare_batch(self, grey: np.ndarray) -> tuple[np.ndarray, list[str]]:
        return np.stack([self.prepare(image) for image in grey]), [""] * len(grey)


PREPROCESSINGS: dict[str, type] = {GlyphPreprocessing.name: GlyphPreprocessing, MnistStyleV0.name: MnistStyleV0}
DEFAULT = GlyphPreprocessing()


def from_spec(spec: dict[str, Any] | str | None) -> Preprocessing:
    """The preprocessing a bundle's ``input.preprocess`` describes; a string
    (or nothing) is a bundle from before 0.2."""
    if not isinstance(spec, dict):
        return MnistStyleV0()
    name = spec.get("name")
    if name not in PREPROCESSINGS:
        raise SampleError(f"the bundle asks for preprocessing {name!r}, which this edgetailor does not know",
                          hint=f"known: {', '.join(PREPROCESSINGS)}; upgrade edgetailor")
    cls = PREPROCESSINGS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in spec.items() if k in known})


@dataclass
class PreparedImages:
    """Samples after preprocessing, and the inputs that could not be used (index, why)."""

    images: np.ndarray
    kept: np.ndarray                       # indices of the inputs that became ``images``
    refused: list[tuple[int, str]]


PREPARE_CHUNK = 512         # images prepared at once: bounds the temporaries (~50 MB for 28x28)
PREPARE_PIXELS = 1 << 22    # ...and at most this many input values at once, so that large images
                            # (a 1 GiB uint8 array becomes 8 GiB as float64) are prepared a few at a time


def prepare_images(images: Sequence[Any] | np.ndarray, preprocessing: Preprocessing = DEFAULT,
                   names: Sequence[str] | None = None, skip_bad: bool = False) -> PreparedImages:
    """Run ``preprocessing`` on each image: a (N, H, W[, C]) array, or a list
    of arrays of any sizes. Blank images are refused, all of them counted in
    one error, unless ``skip_bad`` leaves them out and lists them."""
    if isinstance(images, np.ndarray):
        colour = images.ndim >= 3 and images.shape[-1] in (3, 4)
        if images.ndim - colour == 2:
            images = images[None]   # one image
        elif images.ndim == 4 and images.shape[1] == 1:
            images = images[:, 0]   # (N, 1, H, W), as GE's input
        if images.ndim - (images.ndim >= 3 and images.shape[-1] in (3, 4)) != 3:
            raise SampleError(f"images must be (N, H, W) grey or (N, H, W, 3|4) colour, got shape {images.shape}")
    n = len(images)
    if n == 0:
        raise SampleError("no images given (an empty sample set)", hint="give at least one image")
    out = np.zeros((n, CANVAS, CANVAS), np.uint8)
    why = [""] * n
    if isinstance(images, np.ndarray):
        groups = {images.shape[1:]: np.arange(n)}  # one size: batches straight from the array
    else:
        shapes = [np.shape(image) for image in images]
        groups = {shape: np.array([i for i, s in enumerate(shapes) if s == shape]) for shape in dict.fromkeys(shapes)}
    for shape, members in groups.items():
        step = max(1, min(PREPARE_CHUNK, PREPARE_PIXELS // max(1, int(np.prod(shape)))))
        for start in range(0, len(members), step):
            chunk = members[start:start + step]
            if isinstance(images, np.ndarray):
                grey = as_grey_float(images[chunk])
            else:
                grey = np.stack([as_grey_float(images[i]) for i in chunk])
            prepared, reasons = preprocessing.prepare_batch(grey)
            out[chunk] = prepared
            for i, reason in zip(chunk, reasons):
                why[i] = reason
    refused = [(i, reason) for i, reason in enumerate(why) if reason]
    if refused and not skip_bad:
        raise_refused(refused, n, names)
    kept = np.array([i for i, reason in enumerate(why) if not reason], dtype=np.int64)
    return PreparedImages(out[kept], kept, refused)


def raise_refused(refused: list[tuple[int, str]], total: int, names: Sequence[str] | None = None) -> None:
    where = [names[i] if names is not None else f"image {i}" for i, _ in refused[:5]]
    more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
    raise SampleError(f"{len(refused)} of {total} images have no usable ink (blank or too faint): "
                      f"{', '.join(where)}{more} ({refused[0][1]})",
                      hint="remove or retake them, or skip them (skip_bad=True, --skip-bad on the CLI)")
