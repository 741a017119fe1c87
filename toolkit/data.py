"""The labelled-image container every side passes around, and the built-in
generic dataset.

The generic data is scikit-learn's bundled handwritten digits (1,797 real 8x8
samples from 43 writers), rescaled MNIST-style to 28x28 so that the same
models and bundles work on real MNIST/EMNIST files later. Nothing is
downloaded: the digits ship inside scikit-learn.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from edgetailor.toolkit.errors import SampleError

DIGIT_LABELS = [str(d) for d in range(10)]


@dataclass
class LabeledImages:
    """Images (N, H, W) uint8, white ink on black, with integer labels that
    index ``label_names``."""

    images: np.ndarray
    labels: np.ndarray
    label_names: list[str] = field(default_factory=lambda: list(DIGIT_LABELS))
    source: str = ""
    # The preprocessing (toolkit.preprocess, its to_dict()) that made these
    # images samples; None for raw images that a consumer must still prepare.
    prepared_with: dict | None = None
    # Inputs a loader left out (skip_bad) or ignored, one line each, for the user to see.
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.images.ndim != 3:
            raise SampleError(f"images must have shape (N, H, W), got {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise SampleError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "LabeledImages":
        return LabeledImages(self.images[index], self.labels[index], list(self.label_names), self.source,
                             self.prepared_with)

    def fingerprint(self) -> str:
        """sha256 over images and labels: recorded in checkpoints so a model says what it saw."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.label_names))
        return {name: int(c) for name, c in zip(self.label_names, counts)}


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def load_generic_digits() -> LabeledImages:
    """scikit-learn's digits, each 8x8 glyph (values 0..16) made a sample by
    the same preprocessing as every user input (toolkit.preprocess)."""
    from sklearn.datasets import load_digits  # server-side dependency, bundled data

    from edgetailor.toolkit.preprocess import DEFAULT, prepare_images

    digits = load_digits()
    images = prepare_images(digits.images / 16.0, DEFAULT).images
    return LabeledImages(images, digits.target.astype(np.int64), list(DIGIT_LABELS),
                         f"sklearn.datasets.load_digits ({DEFAULT.name} 28x28)", DEFAULT.to_dict())


@dataclass(frozen=True)
class GenericSplit:
    """The generic data cut three ways: what GE trains on, what measures it,
    and a pool held out from both that the user simulator draws from (so a
    simulated user's glyphs were never seen by GE)."""

    train: LabeledImages
    test: LabeledImages
    user_pool: LabeledImages


def split_generic(data: LabeledImages, seed: int = 0, test_fraction: float = 0.2,
                  user_pool_fraction: float = 0.25) -> GenericSplit:
    """Stratified split, deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx, pool_idx = [], [], []
    for label in np.unique(data.labels):
        idx = rng.permutation(np.flatnonzero(data.labels == label))
        n_test = int(round(len(idx) * test_fraction))
        n_pool = int(round(len(idx) * user_pool_fraction))
        test_idx.extend(idx[:n_test])
        pool_idx.extend(idx[n_test:n_test + n_pool])
        train_idx.extend(idx[n_test + n_pool:])
    return GenericSplit(*(data.subset(np.sort(np.array(i))) for i in (train_idx, test_idx, pool_idx)))


def provenance(data: LabeledImages, split: GenericSplit) -> dict:
    """What a model's metadata records about the data it was trained on."""
    return {"source": data.source, "sha256": data.fingerprint(), "n_train": len(split.train),
            "n_test": len(split.test), "n_user_pool": len(split.user_pool)}
