"""Where server-side training runs: a ``TrainingEnv`` says which device,
which numeric precision, which process of how many, how many data-loading
workers, and where resumable training state goes. Every workflow (pretrain,
compress, learngene) hands one to ``training.fit`` through its data, so each
gains the same devices, torchrun and ``--resume`` without code of its own.

Many processes are PyTorch's own: torchrun starts them and sets RANK,
WORLD_SIZE and LOCAL_RANK; ``setup`` joins the process group (gloo on CPU,
NCCL on CUDA), ``fit`` wraps the model in DistributedDataParallel and shards
the data with DistributedSampler. Lightning Fabric or Accelerate would bring
a launcher, a config layer and their own checkpoint format for what is here
one ``init_process_group``, one DDP wrapper and one sampler; plain DDP keeps
checkpoints plain ``state_dict``s any PyTorch user can read.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from edgetailor.toolkit import atomic
from edgetailor.toolkit.errors import ConfigError, EdgetailorError
from edgetailor.server_side.resume import TrainingCheckpoints

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; under
    torchrun, ``auto`` and ``cuda`` take the process's own GPU (LOCAL_RANK)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            built = f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None \
                else "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
            raise ConfigError(f"--device {spec}: {built}", hint="use --device cpu, or --device auto to take a GPU "
                                                                "only when there is one")
        index = local_rank if spec == "cuda" else _gpu_index(spec)
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"--device {spec}: this machine has {count} CUDA device(s), 0..{count - 1}",
                              hint="pick one of them, or --device cuda for the first")
        return torch.device("cuda", index)
    raise ConfigError(f"--device {spec!r} is not a device", hint=f"use {DEVICE_CHOICES}")


def _gpu_index(spec: str) -> int:
    try:
        index = int(spec.split(":", 1)[1])
    except ValueError:
        raise ConfigError(f"--device {spec!r} is not a device", hint=f"use {DEVICE_CHOICES}") from None
    if index < 0:
        raise ConfigError(f"--device {spec!r}: a GPU index is >= 0", hint=f"use {DEVICE_CHOICES}")
    return index


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on GPUs that have it (fp16 with loss scaling
    on older ones), fp32 on the CPU, where bf16 autocast is slower than fp32
    on most build-server CPUs."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA device", hint="use bf16 or fp32 on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


@dataclass
class TrainingEnv:
    device: torch.device
    precision: str = "fp32"           # autocast dtype for training steps: fp32 (off), bf16 or fp16
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    workers: int = 0                  # DataLoader worker processes (decoding, augmentation)
    checkpoints: TrainingCheckpoints | None = None
    all_cores: list[int] = field(default_factory=list)   # the cores this process had before pinning (if pinned)

    @contextlib.contextmanager
    def unpinned(self) -> Iterator[None]:
        """All the cores the command had, for a while (data preparation, which
        one process per machine runs while the others wait)."""
        if not self.all_cores:
            yield
            return
        mine = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, self.all_cores)
        try:
            yield
        finally:
            os.sched_setaffinity(0, mine)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes outputs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self, precision: str | None = None) -> contextlib.AbstractContextManager:
        """Mixed precision for a training step; ``precision="fp32"`` for a
        stage whose numerics need it (quantization-aware training)."""
        precision = precision or self.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def begin_run(self, identity: dict[str, Any]) -> None:
        """Before any training: every process must be on the same data
        (``identity["data"]``, its sha256) and the same run (recipe, model,
        options), else all stop naming the ranks that differ; then the run's
        training state is started, or checked against a saved one (--resume)."""
        self.agree("the generic data (its sha256)", identity["data"],
                   hint="give every process the same --data file (same content on every machine)")
        self.agree("the run (recipe, model, options)", identity,
                   hint="start every process with the same command, recipe and model files")
        if self.checkpoints is not None:
            self.checkpoints.begin(identity, self.is_main, self.barrier)

    def write_once(self, out: Path, write: Callable[[Path], Any], overwrite: bool = False) -> Any:
        """Rank 0 alone writes the command's output: ``write(folder)`` into a
        staged folder renamed to ``out`` when whole. Every process then waits
        for it, and the run's training state, having served, is deleted.
        Returns what ``write`` returned (None on the other ranks)."""
        result = None
        if self.is_main:
            with atomic.staged_dir(out, overwrite=overwrite) as staging:
                result = write(staging)
        self.barrier()
        if self.checkpoints is not None:
            self.checkpoints.finish(self.is_main)
        return result

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def agree(self, what: str, value: Any, hint: str = "") -> None:
        """Every process must hold the same ``value`` (the data's hash, the
        recipe): otherwise all of them stop, naming the ranks that differ,
        before any training."""
        if not self.distributed:
            return
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            differ = [rank for rank, v in enumerate(values) if v != values[0]]
            raise ConfigError(f"the processes of this torchrun world disagree on {what}: rank(s) "
                              f"{', '.join(map(str, differ))} differ from rank 0 ({_short(values[0])} vs "
                              f"{_short(values[differ[0]])})",
                              hint=hint or "give every machine the same files and the same command")

    def smallest(self, value: int) -> int:
        """The smallest of every process's ``value`` (the checkpoint interval
        in steps: each process times its own steps, all save at the same one)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([int(value)], device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return int(tensor.item())

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records of where it was trained."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": str(self.device), "device_name": name, "precision": self.precision,
                "processes": self.world_size, "torch": torch.__version__}


CPU = TrainingEnv(torch.device("cpu"))


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE or LOCAL_RANK is not a number",
                          hint="start many processes with torchrun, which sets them") from None


def setup(device: str = "auto", precision: str = "auto", workers: int = 0,
          checkpoints: TrainingCheckpoints | None = None) -> TrainingEnv:
    """The environment of this process: checks the device before any work,
    joins torchrun's process group when there is one, and makes results
    reproducible per device (deterministic kernels, where PyTorch has them)."""
    rank, world_size, local_rank = torchrun_world()
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and resolved.type == "cuda" and device.strip().lower().startswith("cuda:"):
        raise ConfigError(f"--device {device} under torchrun: each process takes its own GPU (LOCAL_RANK)",
                          hint="use --device cuda or auto with torchrun")
    env = TrainingEnv(resolved, resolve_precision(precision, resolved), rank, world_size, local_rank,
                      max(0, workers), checkpoints)
    # cuBLAS is deterministic only with a fixed workspace, set before CUDA starts
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
        # deterministic kernels where PyTorch has them (attention's backward, say); a warning, not a stop, where
        # it has none, so that a model with such an op still trains
        torch.use_deterministic_algorithms(True, warn_only=True)
    if world_size > 1 and resolved.type == "cpu":
        before = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if pin_to_own_cores(local_rank):
            env.all_cores = before
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        try:
            torch.distributed.init_process_group(backend, device_id=resolved if resolved.type == "cuda" else None,
                                                 timeout=datetime.timedelta(minutes=_wait_minutes()))
        except (RuntimeError, ValueError) as exc:
            raise EdgetailorError(f"cannot join the torchrun world ({backend}): {exc}",
                                  hint="start the command with torchrun --nproc-per-node N; "
                                       "on several machines, pass the same --rdzv-endpoint to each") from None
    return env


def _wait_minutes() -> float:
    """How long a process waits for the others at a barrier: longer than
    PyTorch's default (10 minutes with NCCL), because the others may be
    preparing a large --data or, on rank 0, exporting and measuring."""
    text = os.environ.get("EDGETAILOR_DIST_TIMEOUT_MINUTES", "180")
    try:
        minutes = float(text)
        if minutes <= 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"EDGETAILOR_DIST_TIMEOUT_MINUTES={text!r} is not a positive number of minutes") from None
    return minutes


def pin_to_own_cores(local_rank: int) -> list[int]:
    """Give each CPU process of this machine its own share of the cores it
    may run on (Linux; where the cores are fewer than the processes, or the
    platform cannot pin, nothing changes). Unpinned, the processes and their
    communication threads hop between the same cores and evict each other's
    caches: on 2 cores, 2 gloo processes trained 1.6x as fast as one, pinned
    1.8x (benchmarks/server_scale.py). ``EDGETAILOR_NO_PINNING=1`` turns it
    off, for a launcher that pins itself."""
    if os.environ.get("EDGETAILOR_NO_PINNING") or not hasattr(os, "sched_setaffinity"):
        return []
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 0))
    except ValueError:
        return []
    cores = sorted(os.sched_getaffinity(0))
    if local_world < 2 or len(cores) < local_world or not 0 <= local_rank < local_world:
        return []
    share = len(cores) // local_world
    mine = cores[local_rank * share:(local_rank + 1) * share]
    os.sched_setaffinity(0, mine)
    return mine


@contextlib.contextmanager
def session(env: TrainingEnv) -> Iterator[TrainingEnv]:
    """Leave the process group when the command ends, whatever happens."""
    try:
        yield env
    finally:
        if env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
