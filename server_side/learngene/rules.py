"""The learngene methods, registered in ``RULES``: how a learngene's
components make the layers of a model of any depth. Pure arithmetic on
names and weights (no torch), so recipes and the CLI can list the methods
without loading a model. Adding a method is one class here and its entry in
``RULES``."""

from __future__ import annotations

from typing import Protocol


class ExpansionRule(Protocol):
    """How a learngene's components make the layers of a model of some depth."""

    name: str

    def components(self, stages: int) -> list[str]:
        """The components a learngene of ``stages`` stages stores."""

    def mix(self, layer: int, depth: int, components: list[str]) -> list[tuple[str, float]]:
        """(component, weight) pairs for 0-based ``layer`` of a ``depth``-layer model."""


class LinearExpansion:
    """TLEG: θ_l = θ_A + (l−1)/(L−1)·θ_B (1-based l; a one-layer model is θ_A)."""

    name = "tleg"

    def components(self, stages: int) -> list[str]:
        return ["A", "B"]

    def mix(self, layer: int, depth: int, components: list[str]) -> list[tuple[str, float]]:
        return [("A", 1.0), ("B", layer / (depth - 1) if depth > 1 else 0.0)]


class StageSharing:
    """SWS: layer l takes the layer of the stage at its relative depth,
    ``floor((l + ½)·S / L)``; with L = S·k every stage gets k copies, with
    L < S the stages at the layers' relative positions are kept."""

    name = "sws"

    def components(self, stages: int) -> list[str]:
        return [f"stage{s}" for s in range(stages)]

    def mix(self, layer: int, depth: int, components: list[str]) -> list[tuple[str, float]]:
        stage = min(len(components) - 1, int((layer + 0.5) * len(components) / depth))
        return [(components[stage], 1.0)]


RULES: dict[str, ExpansionRule] = {rule.name: rule for rule in (LinearExpansion(), StageSharing())}
