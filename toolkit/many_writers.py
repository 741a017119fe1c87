"""Generic handwriting at any size: the built-in digits redrawn by many
simulated writers, written as an MNIST-style IDX pair.

The toolkit ships 1,797 generic digits and may download nothing, yet the
build server must be tested on EMNIST-sized sets (hundreds of thousands of
images) for throughput, memory and resuming. ``simulate_generic`` makes such
a set: every image is one of the base glyphs drawn by its own writer (a
rotation, a size, an offset and a pen width, each drawn per image), so no
two images are the same and a model must still generalise across writers.
It is generated a chunk at a time and streamed to disk, so a set of any
size costs one chunk of memory.

These are generic writers of ordinary style, not users: a simulated user
(``toolkit.users``) has a consistent hand outside the generic one.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgetailor.toolkit import atomic
from edgetailor.toolkit.data import LabeledImages, to_uint8
from edgetailor.toolkit.errors import ConfigError
from edgetailor.toolkit.imaging import affine_batch

CHUNK = 8192
IMAGES_FILE = "train-images-idx3-ubyte"
LABELS_FILE = "train-labels-idx1-ubyte"


def _pen(images: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """A thicker (amount > 0) or thinner (< 0) pen for each image: grey-level
    dilation or erosion by a 3x3 cross, blended by |amount| (at most 1), as
    ``imaging.thicken`` does for one image."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    neighbours = np.stack([padded[:, 1:-1, 1:-1], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1],
                           padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]])
    morphed = np.where(amount[:, None, None] > 0, neighbours.max(0), neighbours.min(0))
    blend = np.minimum(np.abs(amount), 1.0)[:, None, None].astype(np.float32)
    return (1 - blend) * images + blend * morphed


def generic_chunks(pool: LabeledImages, count: int, seed: int = 0,
                   chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images (k, 28, 28), int64 labels) ``chunk`` at a time, ``count``
    in all; the same (pool, count, seed, chunk) give the same images."""
    if count < 1:
        raise ConfigError(f"a simulated set needs at least one image, got {count}")
    base = pool.images.astype(np.float32) / 255.0
    for first in range(0, count, chunk):
        rng = np.random.default_rng([seed, first])
        k = min(chunk, count - first)
        pick = rng.integers(len(pool), size=k)
        drawn = _pen(base[pick], rng.uniform(-0.6, 1.0, k))
        drawn = affine_batch(drawn, rng.normal(0.0, 10.0, k), rng.uniform(0.8, 1.1, k),
                             rng.normal(0.0, 1.0, (k, 2)))
        yield to_uint8(np.clip(drawn, 0.0, 1.0)), pool.labels[pick].astype(np.int64)


def simulate_generic(out: str | Path, count: int, pool: LabeledImages | None = None, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None, overwrite: bool = False) -> Path:
    """Write ``count`` simulated generic digits to the folder ``out`` as
    ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (the folder
    appears whole or not at all); returns the images file, which
    ``server pretrain --data`` reads."""
    if pool is None:
        from edgetailor.toolkit.data import load_generic_digits  # scikit-learn's digits (server side)

        pool = load_generic_digits()
    out = Path(out)
    with atomic.staged_dir(out, overwrite=overwrite) as staging:
        with open(staging / IMAGES_FILE, "wb") as images, open(staging / LABELS_FILE, "wb") as labels:
            # IDX: two zero bytes, the type (08: unsigned byte), the number of dimensions, then each as >u4
            images.write(struct.pack(">BBBBIII", 0, 0, 0x08, 3, count, *pool.images.shape[1:]))
            labels.write(struct.pack(">BBBBI", 0, 0, 0x08, 1, count))
            done = 0
            for chunk_images, chunk_labels in generic_chunks(pool, count, seed):
                images.write(chunk_images.tobytes())
                labels.write(chunk_labels.astype(np.uint8).tobytes())
                done += len(chunk_labels)
                if progress:
                    progress(done, count)
            for handle in (images, labels):
                handle.flush()
                os.fsync(handle.fileno())
    return out / IMAGES_FILE
