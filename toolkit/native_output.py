"""Silence what native runtimes print straight to the process's stdout and
stderr (file descriptors 1 and 2, not Python's sys.stdout): ExecuTorch's CPU
probing, LiteRT's delegate banner, converter logs. Keeps them off the user's
terminal; Python-level output inside the block is flushed first."""

from __future__ import annotations

import os
import sys


class quiet_native_output:
    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = [os.dup(1), os.dup(2)]
        self.null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 1)
        os.dup2(self.null, 2)

    def __exit__(self, *exc):
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in (*self.saved, self.null):
            os.close(fd)
