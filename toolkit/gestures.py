"""Simulated wrist gestures: the built-in time-series data, generic and per user.

No gesture dataset ships with the toolkit's dependencies, and nothing may be
downloaded, so the time-series modality is tested and benchmarked on
simulated 3-axis accelerometer windows (``(3, 64)`` float32, about 1.3 s at
50 Hz). Each of six gestures is a trajectory: a sum of a few smooth
oscillations and bumps per axis. A person performs it in their own style:

- tempo: faster or slower (the trajectory resampled);
- vigour: larger or smaller movements;
- how the watch sits on the wrist: the axes rotated;
- gravity's share on each axis, and sensor noise.

The generic pool comes from many people of ordinary style. A simulated user
(``simulate_gesture_user``) has a style outside it: a watch worn rotated by
40-80 degrees about the forearm (with a tempo 30 % off for every third
user), or tilted by 30-55 degrees. That is the gesture classifier
that "fails on one person's wrist" and personalization should fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgetailor.toolkit.data import LabeledImages

GESTURES = ["circle", "shake", "swipe-left", "swipe-right", "tap", "wave"]
LENGTH = 64
CHANNELS = 3


@dataclass(frozen=True)
class GestureStyle:
    tempo: float            # > 1: faster
    vigour: float           # movement amplitude
    rotation: tuple[float, float, float]   # wrist orientation, degrees about x, y, z
    noise: float


def _templates() -> np.ndarray:
    """(gestures, 3, 4 * LENGTH) trajectories over a longer span, so that tempo can resample them."""
    t = np.linspace(0.0, 4.0, 4 * LENGTH)
    bump = lambda centre, width: np.exp(-0.5 * ((t - centre) / width) ** 2)  # noqa: E731
    out = np.zeros((len(GESTURES), CHANNELS, t.size))
    out[0] = [np.sin(2 * np.pi * t), np.cos(2 * np.pi * t), 0.2 * np.sin(4 * np.pi * t)]          # circle
    out[1] = [np.sin(6 * np.pi * t), 0.3 * np.sin(6 * np.pi * t + 1.0), 0.1 * t]                # shake
    out[2] = [-1.5 * (bump(1.6, 0.25) - bump(2.4, 0.25)), 0.3 * bump(2.0, 0.4), 0.2 * np.sin(np.pi * t)]
    out[3] = [1.5 * (bump(1.6, 0.25) - bump(2.4, 0.25)), 0.3 * bump(2.0, 0.4), -0.2 * np.sin(np.pi * t)]
    out[4] = [0.2 * bump(2.0, 0.3), 0.1 * np.sin(np.pi * t), -2.0 * bump(1.8, 0.12) + 1.2 * bump(2.1, 0.12)]
    out[5] = [0.4 * np.sin(np.pi * t), np.sin(4 * np.pi * t) * bump(2.0, 0.8), 0.5 * np.sin(4 * np.pi * t + 0.7)]
    return out


TEMPLATES = _templates()


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def perform(labels: np.ndarray, style: GestureStyle, rng: np.random.Generator) -> np.ndarray:
    """Windows (N, 3, LENGTH) of the gestures ``labels``, performed in ``style``
    with a little variation from one repetition to the next."""
    n = len(labels)
    span = TEMPLATES.shape[2]
    tempo = style.tempo * rng.uniform(0.93, 1.07, n)
    # LENGTH samples of the template spaced by the tempo (4 template points a step at tempo 1: the whole
    # span), centred on the gesture's middle give or take a few steps.
    spacing = 4.0 * tempo
    centre = span / 2 + rng.uniform(-0.06, 0.06, n) * span
    where = (centre - (LENGTH - 1) / 2 * spacing)[:, None] + np.arange(LENGTH)[None, :] * spacing[:, None]
    where = np.clip(where, 0, span - 1)
    windows = np.empty((n, CHANNELS, LENGTH))
    grid = np.arange(span)
    for i, label in enumerate(labels):
        for c in range(CHANNELS):
            windows[i, c] = np.interp(where[i], grid, TEMPLATES[label, c])
    windows *= style.vigour * rng.uniform(0.9, 1.1, (n, 1, 1))
    wobble = [_rotation(tuple(np.asarray(style.rotation) + rng.normal(0, 4, 3))) for _ in range(n)]
    windows = np.einsum("nij,njt->nit", np.array(wobble), windows)
    gravity = _rotation(style.rotation) @ np.array([0.0, 0.0, 1.0])          # the watch's tilt
    windows += gravity[None, :, None]
    windows += rng.normal(0, style.noise, windows.shape)
    return windows.astype(np.float32)


def ordinary_style(rng: np.random.Generator) -> GestureStyle:
    return GestureStyle(tempo=float(rng.uniform(0.85, 1.15)), vigour=float(rng.uniform(0.8, 1.2)),
                        rotation=tuple(float(v) for v in rng.normal(0, 8, 3)), noise=float(rng.uniform(0.1, 0.3)))


def generic_gestures(people: int = 60, per_class: int = 8, seed: int = 0) -> LabeledImages:
    """The generic pool: ``people`` of ordinary style, ``per_class`` windows of each gesture."""
    rng = np.random.default_rng(seed)
    windows, labels = [], []
    for _ in range(people):
        style = ordinary_style(rng)
        y = np.repeat(np.arange(len(GESTURES)), per_class)
        windows.append(perform(y, style, rng))
        labels.append(y)
    return LabeledImages(np.concatenate(windows), np.concatenate(labels), list(GESTURES),
                         f"simulated wrist gestures ({people} people)")


@dataclass(frozen=True)
class GestureUser:
    user_id: int
    style: GestureStyle
    train: LabeledImages
    test: LabeledImages


def simulate_gesture_user(user_id: int, seed: int = 0, train_per_class: int = 10,
                          test_per_class: int = 20) -> GestureUser:
    """A person whose style the generic pool lacks: the watch rotated by
    40-80 degrees about the forearm, a tempo 30 % off, or both (by ``user_id``)."""
    rng = np.random.default_rng([seed, user_id, 17])
    kind = user_id % 3
    angle = float(rng.uniform(40, 80) * rng.choice([-1, 1]))
    rotation = (angle, 0.0, 0.0) if kind != 2 else (0.0, angle * 0.7, 0.0)   # about the forearm, or tilted
    tempo = float(rng.choice([0.7, 1.35])) if kind == 1 else float(rng.uniform(0.9, 1.1))
    style = GestureStyle(tempo=tempo, vigour=float(rng.uniform(0.8, 1.2)), rotation=rotation,
                         noise=float(rng.uniform(0.1, 0.3)))
    parts = []
    for count in (train_per_class, test_per_class):
        y = np.repeat(np.arange(len(GESTURES)), count)
        parts.append(LabeledImages(perform(y, style, rng), y, list(GESTURES), f"gesture user {user_id}"))
    return GestureUser(user_id, style, *parts)
