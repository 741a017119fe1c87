"""How much memory this process has used at its peak: what the device
commands report (``--json``) and the benchmarks compare between runtimes."""

from __future__ import annotations

import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB. On Linux, VmHWM: ru_maxrss
    would carry over the parent's peak across fork+exec (a device process
    started by the demo would report the demo's torch-sized RSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # POSIX only; Windows has neither /proc nor resource

    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
