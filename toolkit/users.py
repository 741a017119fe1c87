"""Simulated users: the same digits, written by someone with a consistent hand.

A real user differs from the generic data in ways that stay the same from one
sample to the next: a slant, a tilt, a pen width, a size, and personal glyph
variants (a crossed 7, a slashed 0, a 1 with a base and flag, a flat-topped 3).
Each simulated user draws one such style from a seed and applies it, with a
little per-sample jitter, to generic glyphs that GE never trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import SampleError
from edgetailor.toolkit.imaging import affine, draw_line, thicken
from edgetailor.toolkit.preprocess import DEFAULT, prepare_images

# Personal glyph variants: label -> strokes in MNIST 28x28 coordinates (row, col).
GLYPH_VARIANTS: dict[str, tuple[int, list[tuple[tuple[float, float], tuple[float, float]]]]] = {
    "crossed_7": (7, [((14.0, 9.0), (14.0, 19.0))]),
    "slashed_0": (0, [((21.0, 9.0), (7.0, 19.0))]),
    "serif_1": (1, [((23.0, 9.0), (23.0, 19.0)), ((4.5, 13.5), (8.5, 9.5))]),
    "flat_top_3": (3, [((4.5, 8.0), (4.5, 20.0))]),
    "barred_2": (2, [((14.0, 8.0), (14.0, 20.0))]),
    "tailed_9": (9, [((23.0, 14.0), (21.0, 9.0))]),
}


@dataclass(frozen=True)
class UserStyle:
    """One person's hand. Angles in degrees, shear as x-shift per unit height."""

    rotation: float
    shear: float
    thickness: float
    scale: float
    variants: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def random(cls, rng: np.random.Generator) -> "UserStyle":
        sign = lambda: rng.choice([-1.0, 1.0])  # noqa: E731 - tiny local helper
        return cls(
            rotation=float(sign() * rng.uniform(5.0, 15.0)),
            shear=float(sign() * rng.uniform(0.1, 0.3)),
            thickness=float(rng.choice([-0.4, 0.8, 1.4]) * rng.uniform(0.7, 1.0)),
            scale=float(rng.uniform(0.8, 1.05)),
            variants=tuple(sorted(rng.choice(sorted(GLYPH_VARIANTS), size=3, replace=False).tolist())),
        )

    def apply(self, image: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
        """Render a generic glyph (float 28x28) in this user's hand, with a
        little per-sample jitter so no two samples are identical. Returns the
        raw drawing; ``_render`` prepares it as a device would."""
        glyph = image.astype(np.float32)
        for name in self.variants:
            variant_label, strokes = GLYPH_VARIANTS[name]
            if variant_label == label:
                for start, end in strokes:
                    glyph = draw_line(glyph, start, end, width=1.0)
        glyph = thicken(glyph, self.thickness + rng.normal(0.0, 0.15))
        glyph = affine(glyph, rotation_deg=self.rotation + rng.normal(0.0, 2.0),
                       shear=self.shear + rng.normal(0.0, 0.04),
                       scale=self.scale * rng.uniform(0.97, 1.03))
        # Prepared again the way a device would (in ``_render``): the user's size
        # survives only as stroke width relative to glyph size, as with real MNIST.
        return np.clip(glyph, 0.0, 1.0)


@dataclass
class SimulatedUser:
    user_id: int
    style: UserStyle
    train: LabeledImages
    test: LabeledImages

    def describe(self) -> dict:
        return {"user_id": self.user_id, **asdict(self.style)}


def _render(pool: LabeledImages, index: np.ndarray, style: UserStyle, rng: np.random.Generator,
            name: str) -> LabeledImages:
    drawings = np.stack([style.apply(pool.images[i] / 255.0, int(pool.labels[i]), rng) for i in index])
    images = prepare_images(drawings.astype(np.float64), DEFAULT).images
    return LabeledImages(images, pool.labels[index], list(pool.label_names), name, DEFAULT.to_dict())


def simulate_user(pool: LabeledImages, user_id: int, seed: int = 0, train_per_class: int = 10,
                  test_per_class: int = 20) -> SimulatedUser:
    """One user: a style from (seed, user_id), a per-class train/test split of
    the pool rendered in that style. Train and test never share a base glyph."""
    rng = np.random.default_rng([seed, user_id])
    style = UserStyle.random(rng)
    train_idx, test_idx = [], []
    for label in range(len(pool.label_names)):
        idx = rng.permutation(np.flatnonzero(pool.labels == label))
        if len(idx) < train_per_class + 1:
            raise SampleError(f"the user pool holds only {len(idx)} samples of class "
                              f"{pool.label_names[label]!r}; need more than {train_per_class}",
                              hint="ask for fewer samples per class, or simulate from a larger pool")
        train_idx.extend(idx[:train_per_class])
        test_idx.extend(idx[train_per_class:train_per_class + test_per_class])
    train = _render(pool, np.array(train_idx), style, rng, f"simulated user {user_id} (train)")
    test = _render(pool, np.array(test_idx), style, rng, f"simulated user {user_id} (test)")
    return SimulatedUser(user_id, style, train, test)


def render_in_style(pool: LabeledImages, style: UserStyle, per_class: int, seed: int = 0) -> LabeledImages:
    """``per_class`` samples of every class in ``style``, base glyphs drawn
    with replacement (each rendering differs): as many samples as a test of
    scale needs, more than the pool holds."""
    rng = np.random.default_rng(seed)
    index = np.concatenate([rng.choice(np.flatnonzero(pool.labels == label), per_class)
                            for label in range(len(pool.label_names))])
    return _render(pool, index, style, rng, f"{per_class} per class in one style")


def simulate_users(pool: LabeledImages, n_users: int, seed: int = 0, train_per_class: int = 10,
                   test_per_class: int = 20) -> list[SimulatedUser]:
    return [simulate_user(pool, u, seed, train_per_class, test_per_class) for u in range(n_users)]
