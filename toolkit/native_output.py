"""Silence what native runtimes print straight to the process's stdout and
stderr (file descriptors 1 and 2, not Python's sys.stdout): ExecuTorch's CPU
probing, LiteRT's delegate banner, converter logs, onnxruntime-training's
graph passes. Keeps them off the user's terminal; Python-level output inside
the block is flushed first. With ``replay_on_error`` the native stderr is
kept and shown if the block fails, since then it is the clue."""

from __future__ import annotations

import os
import sys
import tempfile


class quiet_native_output:
    def __init__(self, replay_on_error: bool = False):
        self.replay_on_error = replay_on_error

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = [os.dup(1), os.dup(2)]
        self.null = os.open(os.devnull, os.O_WRONLY)
        self.capture = tempfile.TemporaryFile() if self.replay_on_error else None
        os.dup2(self.null, 1)
        os.dup2(self.capture.fileno() if self.capture else self.null, 2)
        return self

    def __exit__(self, exc_type, *exc):
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in (*self.saved, self.null):
            os.close(fd)
        if self.capture is not None:
            if exc_type is not None:
                self.capture.seek(0)
                sys.stderr.write(self.capture.read().decode(errors="replace")[-4000:])
            self.capture.close()
