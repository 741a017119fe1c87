"""The simulated generic set: seeded, every class, ink in every image, and
written as an IDX pair that the loaders read back unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from edgetailor.toolkit.errors import ConfigError
from edgetailor.toolkit.loaders import load_idx_pair
from edgetailor.toolkit.many_writers import generic_chunks, simulate_generic


def test_chunks_are_seeded_and_every_image_is_drawn_anew(generic_split):
    pool = generic_split.train
    first = list(generic_chunks(pool, 1000, seed=3, chunk=300))
    again = list(generic_chunks(pool, 1000, seed=3, chunk=300))
    other = list(generic_chunks(pool, 1000, seed=4, chunk=300))
    assert [len(y) for _, y in first] == [300, 300, 300, 100]
    for (a, ya), (b, yb) in zip(first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(first[0][0], other[0][0])
    images = np.concatenate([x for x, _ in first])
    labels = np.concatenate([y for _, y in first])
    assert images.dtype == np.uint8 and images.shape == (1000, 28, 28)
    assert set(labels) == set(range(10))
    assert (images.reshape(1000, -1).max(1) > 128).all()                 # ink in every image
    # no image is a copy of its base glyph or of another image: each writer draws anew
    assert len({img.tobytes() for img in images}) == 1000
    with pytest.raises(ConfigError, match="at least one image"):
        next(generic_chunks(pool, 0))


def test_the_written_pair_reads_back(tmp_path, generic_split):
    path = simulate_generic(tmp_path / "sim", 700, pool=generic_split.train, seed=1)
    data = load_idx_pair(path)
    expected = np.concatenate([x for x, _ in generic_chunks(generic_split.train, 700, seed=1)])
    assert len(data) == 700
    labels = np.concatenate([y for _, y in generic_chunks(generic_split.train, 700, seed=1)])
    np.testing.assert_array_equal(data.labels, labels)
    # the loader prepares what it reads: the same glyphs, centred again
    assert data.images.shape == expected.shape
    with pytest.raises(FileExistsError):
        simulate_generic(tmp_path / "sim", 10, pool=generic_split.train)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"]        # nothing half-written beside it
