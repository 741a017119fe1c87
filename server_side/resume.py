"""Training state that survives a killed process: ``TrainingCheckpoints``.

A run (``server pretrain``, ``server compress``, a learngene command) keeps
its state in a folder beside its output (``OUT.training/``): ``run.json``
says what run it is (recipe, model, data hash, toolkit version, processes),
and each ``training.fit`` call of the run has a file ``fit-NN.pt`` holding
the model, the optimizer, the schedule, the RNG states and the position in
the epoch. Every file is written to a temporary name, fsynced and renamed,
so a kill -9 leaves the previous state whole.

``--resume`` checks ``run.json`` against the run being started, before any
training, and each ``fit`` continues from its file: a finished fit hands
back its final weights, an unfinished one continues at the next batch. The
steps between fits (pruning, quantization) are deterministic and simply run
again. Every random draw of a training step is keyed by (seed, epoch,
batch, rank), so the continued run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from edgetailor.toolkit import atomic
from edgetailor.toolkit.errors import CheckpointError

STATE_FORMAT = 1


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for each entry that differs, dotted paths for nested ones."""
    a, b = _flatten(saved), _flatten(now)
    return [f"{key}: {a.get(key, '(none)')!r} -> {b.get(key, '(none)')!r}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


class TrainingCheckpoints:
    """The training state of one run in ``folder``; ``every_steps`` (>0) or
    ``every_seconds`` says how often a fit saves (one interval of work is
    the most a kill can lose)."""

    def __init__(self, folder: str | Path, every_steps: int = 0, every_seconds: float = 120.0,
                 resume: bool = False):
        self.folder = Path(folder)
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.resume = resume
        self._next = 0
        self.resumed_from: list[str] = []    # what each resumed fit continued from, for the summary

    def begin(self, identity: dict[str, Any], is_main: bool, barrier: Callable[[], None] = lambda: None) -> None:
        """Start the run (or, with ``resume``, check that the saved one is
        this run). Fails before any training on a mismatch. ``barrier``
        (torchrun's) keeps every process from looking for ``run.json`` after
        rank 0 has written a new one."""
        self.check_start()
        run_file = self.folder / "run.json"
        if self.resume:
            try:
                saved = json.loads(run_file.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{run_file} is damaged: {exc}",
                                      hint=f"delete {self.folder} and start again without --resume") from None
            changed = differences(saved.get("identity", {}), _jsonable(identity))
            if changed:
                more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
                raise CheckpointError(f"the training state in {self.folder} is from another run: "
                                      f"{'; '.join(changed[:4])}{more}",
                                      hint="resume with the same recipe, model, data and toolkit, or "
                                           f"delete {self.folder} to start over")
            return
        barrier()
        if is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
            atomic.write_text(run_file, json.dumps({"format": STATE_FORMAT, "identity": _jsonable(identity)},
                                                   indent=1, sort_keys=True) + "\n")
        barrier()

    def check_start(self) -> None:
        """What can be told from the folder alone, so a command can say it
        before it prepares any data: nothing to resume, or an unfinished run
        that is neither resumed nor overwritten."""
        run_file = self.folder / "run.json"
        if self.resume and not run_file.exists():
            raise CheckpointError(f"nothing to resume: {self.folder} holds no training state",
                                  hint="run the command without --resume to start")
        if not self.resume and run_file.exists():
            raise CheckpointError(f"{self.folder} holds the training state of an unfinished run",
                                  hint="pass --resume to continue it, or delete the folder (or --overwrite) "
                                       "to start over")

    def slot(self) -> "FitSlot":
        """The state file of the next ``fit`` call of this run."""
        path = self.folder / f"fit-{self._next:02d}.pt"
        self._next += 1
        return FitSlot(self, path)

    def finish(self, is_main: bool) -> None:
        """The run's output is written: its training state has served."""
        if is_main:
            shutil.rmtree(self.folder, ignore_errors=True)


class FitSlot:
    def __init__(self, owner: TrainingCheckpoints, path: Path):
        self.owner, self.path = owner, path

    def load(self, identity: dict[str, Any]) -> dict[str, Any] | None:
        """The saved state of this fit when resuming, after checking it is this fit's."""
        if not self.owner.resume or not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch.load raises many types on a damaged file
            raise CheckpointError(f"{self.path} is damaged: {type(exc).__name__}: {str(exc)[:200]}",
                                  hint=f"delete {self.owner.folder} and start again without --resume") from None
        changed = differences(state.get("identity", {}), _jsonable(identity))
        if changed:
            raise CheckpointError(f"{self.path} is the state of another training: {'; '.join(changed[:4])}",
                                  hint=f"delete {self.owner.folder} and start again without --resume")
        self.owner.resumed_from.append(f"{self.path.name}: epoch {state['epoch'] + 1}, batch {state['batch']}"
                                       + (" (finished)" if state.get("done") else ""))
        return state

    def save(self, state: dict[str, Any], identity: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({**state, "identity": _jsonable(identity), "format": STATE_FORMAT}, buffer)
        atomic.write_bytes(self.path, buffer.getvalue())


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, sort_keys=True, default=str))
