"""Progress bars on the terminal for the API's progress callbacks, with the
rate (images/s while training) where the stage counts images."""

from __future__ import annotations

import sys
import time

import click

# Stages whose counts are not images (everything else that reports progress trains on images).
COUNTED_IN = {"flexround layers": "layers", "depths": "depths", "prepare data": "images", "simulate": "images"}


class ProgressBars:
    """A click progress bar per stage, fed by ``(stage, done, total)``
    callbacks; off on every torchrun process but rank 0 (``enabled``)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.stage: str | None = None
        self.done = 0
        self._since = (0.0, 0)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage, self.done = stage, 0
            self._since = (time.perf_counter(), 0)
            unit = COUNTED_IN.get(stage, "images")
            self.bar = click.progressbar(length=total, label=f"{stage:>16}", file=sys.stderr, show_eta=True,
                                         item_show_func=lambda _: self._rate(unit))
            self.bar.__enter__()
        self.bar.update(done - self.done, current_item=done)
        self.done = done

    def _rate(self, unit: str) -> str:
        started, first = self._since
        seconds = time.perf_counter() - started
        if seconds < 0.5 or self.done <= first:
            return ""
        return f"{(self.done - first) / seconds:,.0f} {unit}/s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
            self.stage = None
