import numpy as np

from edgetailor.toolkit.data import load_generic_digits, split_generic
from edgetailor.toolkit.imaging import center_of_mass, mnist_style, resize, thicken
from edgetailor.toolkit.users import UserStyle, simulate_user


def test_mnist_style_fits_box_and_centres_mass():
    image = np.zeros((100, 60), dtype=np.float32)
    image[10:90, 5:20] = 1.0  # a tall bar off to the left
    out = mnist_style(image)
    assert out.shape == (28, 28) and out.dtype == np.float32
    rows, cols = np.nonzero(out > 0.05)
    assert rows.max() - rows.min() + 1 <= 21 and cols.max() - cols.min() + 1 <= 21
    r, c = center_of_mass(out)
    assert abs(r - 13.5) <= 1.0 and abs(c - 13.5) <= 1.0


def test_resize_keeps_thin_strokes_when_shrinking():
    image = np.zeros((200, 200), dtype=np.float32)
    image[:, 100:102] = 1.0
    small = resize(image, 20, 20)
    assert small.max() > 0.05  # area averaging keeps the stroke; point sampling could skip it


def test_thicken_grows_and_thins_ink():
    image = np.zeros((28, 28), dtype=np.float32)
    image[10:18, 13:15] = 1.0
    assert thicken(image, 1.0).sum() > image.sum() > thicken(image, -1.0).sum()


def test_generic_digits_and_split():
    data = load_generic_digits()
    assert data.images.shape == (1797, 28, 28) and data.images.dtype == np.uint8
    split = split_generic(data, seed=0)
    assert len(split.train) + len(split.test) + len(split.user_pool) == 1797
    # stratified: every class in every part
    for part in (split.train, split.test, split.user_pool):
        assert set(np.unique(part.labels)) == set(range(10))
    # deterministic
    assert split_generic(data, seed=0).test.fingerprint() == split.test.fingerprint()
    assert split_generic(data, seed=1).test.fingerprint() != split.test.fingerprint()


def test_simulated_users_are_seeded_and_personal(generic_split):
    a = simulate_user(generic_split.user_pool, 0, seed=0)
    again = simulate_user(generic_split.user_pool, 0, seed=0)
    b = simulate_user(generic_split.user_pool, 1, seed=0)
    assert a.train.fingerprint() == again.train.fingerprint()
    assert a.style != b.style
    assert np.bincount(a.train.labels).tolist() == [10] * 10
    assert len(a.style.variants) == 3


def test_user_style_changes_the_glyph():
    rng = np.random.default_rng(0)
    style = UserStyle(rotation=12.0, shear=0.3, thickness=1.0, scale=0.9, variants=("crossed_7",))
    glyph = np.zeros((28, 28), dtype=np.float32)
    glyph[6:22, 12:16] = 1.0
    assert np.abs(style.apply(glyph, 7, rng) - glyph).sum() > 20
