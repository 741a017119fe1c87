"""Every way export writes LE's and GN's training programs, registered in one
place: ``TRAINING_EXPORTERS[(format, training kind)]``.

A format's default kind (``toolkit.formats``) is written into every bundle
that carries the format; the others only when ``export bundle
--extra-training`` asks for them.
"""

from __future__ import annotations

from edgetailor.export.legacy_training import LEGACY_EXPORTERS
from edgetailor.export.parts import TrainingExporter
from edgetailor.export.step_programs import STEP_EXPORTERS

TRAINING_EXPORTERS: dict[tuple[str, str], TrainingExporter] = {
    (e.format, e.kind): e for e in (*STEP_EXPORTERS.values(), *LEGACY_EXPORTERS)}
