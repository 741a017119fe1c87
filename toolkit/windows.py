"""Reading labelled sensor windows: the loaders of the ``timeseries`` modality.

A window is ``(channels, length)`` float values, one recording cut to the
length the model reads. Three containers:
- an ``.npz`` with ``x`` (N, channels, length), or (N, length) for one
  channel, and ``y`` (N,), plus ``label_names`` optionally, as the glyph
  loader reads it;
- a folder with one sub-folder per label, holding one window per file:
  ``.npy`` arrays of (channels, length) or (length,), or ``.csv`` files with
  one row per step and one column per channel (a header row is skipped);
- for prediction, the same without labels: an ``.npz`` with ``x``, or a
  folder of window files.

Every window must already have the bundle's shape. A window of another
length is refused (or left out with ``skip_bad``), with the file and the
shape named, never cut or padded: that would change what it means. NaN and
infinite values are refused the same way. Sizes are checked against
``toolkit.limits`` before arrays are read.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from edgetailor.toolkit.arrayfiles import NpzArchive
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import DataFormatError, SampleError
from edgetailor.toolkit.limits import Limits, current_limits
from edgetailor.toolkit.loaders import UNLABELLED, labelled_files, read_each, read_labelled_npz, relabel

WINDOW_SUFFIXES = {".npy", ".csv"}
FORMATS_HINT = ("give an .npz with x (N, channels, length) and y, or a folder with one sub-folder per label "
                "holding .npy or .csv windows (one row per step, one column per channel)")


def load_windows(path: str | Path, shape: tuple[int, int], label_names: list[str] | None = None,
                 skip_bad: bool = False, limits: Limits | None = None, labelled: bool = True) -> LabeledImages:
    """The windows at ``path`` as float32 samples (N, channels, length)
    labelled by ``label_names`` (the bundle's order), or all labelled 0 when
    not ``labelled``."""
    path, limits = Path(path), current_limits(limits)
    if not path.exists():
        raise DataFormatError(f"no such file or folder: {path}", hint="check the --samples path")
    if path.is_dir():
        data = _load_folder(path, tuple(shape), skip_bad, limits, labelled)
    elif path.suffix == ".npz":
        data = _load_npz(path, tuple(shape), skip_bad, limits, labelled)
    elif path.suffix.lower() in WINDOW_SUFFIXES and not labelled:
        window = _window_file(path, tuple(shape), limits)
        data = LabeledImages(window[None], np.zeros(1, np.int64), list(UNLABELLED), str(path))
    else:
        raise DataFormatError(f"cannot read labelled windows from {path}", hint=FORMATS_HINT)
    if labelled and label_names is not None:
        data = relabel(data, label_names)
    return data


def _load_npz(path: Path, shape: tuple[int, int], skip_bad: bool, limits: Limits, labelled: bool) -> LabeledImages:
    def check_x(header) -> int:
        if len(header.shape) not in (2, 3) or header.dtype.kind not in "fiu":
            raise DataFormatError(f"{path}: x must be numbers of shape (N, channels, length) or (N, length), got "
                                  f"{header.dtype} {header.shape}", hint=FORMATS_HINT)
        limits.check("max_samples", header.shape[0], f"{path}: the number of windows")
        return header.shape[0]

    with NpzArchive(path, limits) as npz:
        x, y, names = read_labelled_npz(npz, path, labelled, "window", check_x, limits)
    n = len(x)
    windows, kept, notes = _check_windows(x, shape, [f"{path} window {i}" for i in range(n)], skip_bad)
    return LabeledImages(windows, y[kept], names, str(path), notes=notes)


def _load_folder(root: Path, shape: tuple[int, int], skip_bad: bool, limits: Limits,
                 labelled: bool) -> LabeledImages:
    files, names, notes = labelled_files(root, WINDOW_SUFFIXES, labelled, limits, ".npy or .csv windows")
    windows, labels, left_out = read_each(files, root, lambda file: _window_file(file, shape, limits), skip_bad,
                                          "windows", FORMATS_HINT)
    return LabeledImages(windows, labels, names, str(root), notes=notes + left_out)


def _window_file(path: Path, shape: tuple[int, int], limits: Limits) -> np.ndarray:
    """One window from a .npy or .csv file, checked."""
    size = path.stat().st_size
    limits.check("max_sample_bytes", size, f"{path}: the file's size")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataFormatError(f"{path} is not a readable .npy array: {exc}") from None
    else:
        array = _read_csv(path)
    windows, _, _ = _check_windows(array[None] if array.ndim < 3 else array, shape, [str(path)], skip_bad=False,
                                   csv=path.suffix.lower() == ".csv")
    return windows[0]


def _read_csv(path: Path) -> np.ndarray:
    """Rows are steps, columns are channels; a first row that is not numbers is a header."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SampleError(f"{path} is empty", hint="a window file holds one row per step")
    try:
        float(lines[0].split(",")[0])
    except ValueError:
        lines = lines[1:]           # a header row
    try:
        array = np.loadtxt(io.StringIO("\n".join(lines)), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise DataFormatError(f"{path} is not a CSV of numbers: {exc}",
                              hint="one row per step, one comma-separated column per channel") from None
    return array.T                  # (channels, steps)


def _check_windows(array: Any, shape: tuple[int, int], where: list[str], skip_bad: bool,
                   csv: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(N, channels, length) float32 windows, those of another shape or with NaN refused or left out."""
    channels, length = shape
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        raise DataFormatError(f"{where[0]}: windows must hold numbers, got {array.dtype}")
    if array.ndim == 2 and channels == 1:
        array = array[:, None, :]
    if array.ndim != 3 or array.shape[1:] != (channels, length):
        got = tuple(array.shape[1:]) if array.ndim == 3 else tuple(array.shape)
        layout = f"{got[1]} rows x {got[0]} columns" if csv and len(got) == 2 else f"shape {got}"
        message = f"{where[0]}: a window must be {channels} channel(s) x {length} steps, got {layout}"
        raise SampleError(message, hint=f"cut the recording into windows of exactly {length} steps"
                                        + (" (one row per step, one column per channel)" if csv else ""))
    array = array.astype(np.float32)
    finite = np.isfinite(array).all(axis=(1, 2))
    notes = [f"left out {where[i]}: NaN or infinite values" for i in np.flatnonzero(~finite)]
    if notes and not skip_bad:
        first = where[int(np.argmin(finite))]
        raise SampleError(f"{len(notes)} window(s) hold NaN or infinite values, the first {first}",
                          hint="drop or repair them (skip_bad=True, --skip-bad on the CLI, leaves them out)")
    return array[finite], np.flatnonzero(finite), notes
