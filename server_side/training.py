"""Training on the generic data, the one loop every server-side workflow
shares: ``GenericData`` (the samples split the way pretraining split it, the
input normalisation, and the ``TrainingEnv`` to train in) and ``fit`` (Adam,
cosine decay, the pretraining augmentation, optional distillation from a
teacher). Pretraining trains GE with it, compression recovers with it, the
learngene distils its auxiliary model and fine-tunes expanded models with it.

``fit`` reads the samples a batch at a time (``server_side.samples``), on
the environment's device, in its processes (torchrun: DistributedDataParallel
with a DistributedSampler), with its mixed precision, and saves resumable
state as it goes. The learning rate is the recipe's for one process; with N
processes the global batch is N times the recipe's and the rate is scaled by
sqrt(N), the square-root rule for Adam (Malladi et al., 2022, "On the SDEs
and scaling rules for adaptive gradient algorithms"); the linear rule (Goyal
et al., 2017) is SGD's. Models go back to the CPU when ``fit`` returns, so a
checkpoint is the same file whichever device trained it.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgetailor.toolkit.config import PretrainConfig
from edgetailor.toolkit.data import LabeledImages, split_generic
from edgetailor.toolkit.input_spec import InputSpec
from edgetailor.server_side.environment import CPU, TrainingEnv
from edgetailor.server_side.samples import SampleStore, as_store

ProgressFn = Callable[[int, int], None]
_DDP_OPTIONS = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
TIMED_STEPS = 20      # steps timed to turn a checkpoint interval in seconds into steps


def handwriting_augment(x: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Another writer's hand on a normalised batch (background = its minimum):
    rotation, slant, size, aspect, a smooth elastic wobble and pen width.

    One grid_sample applies the affine part and the elastic field together, so
    a glyph is resampled once; the pen width is a 3x3 grey dilation or erosion
    afterwards, as a thicker or thinner pen would draw the same path.
    """
    n = x.shape[0]
    # drawn on the CPU generator, applied on x's device: every device augments alike
    u = lambda *shape: (torch.rand(*shape, generator=generator) * 2 - 1).to(x.device)  # noqa: E731
    angle = u(n) * np.deg2rad(cfg.augment_rotation_deg)
    scale_x = 1 + u(n) * cfg.augment_scale
    scale_y = scale_x * (1 + u(n) * cfg.augment_aspect)
    shear = u(n) * cfg.augment_shear
    shift = u(n, 2) * cfg.augment_shift * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    # rotation @ shear @ diag(scale): the grid maps output to input coordinates.
    linear = torch.stack([torch.stack([cos * scale_x, (cos * shear - sin) * scale_y], 1),
                          torch.stack([sin * scale_x, (sin * shear + cos) * scale_y], 1)], 1)
    theta = torch.cat([linear, shift[:, :, None]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if cfg.augment_elastic > 0:
        displacement = (torch.randn(n, 2, 7, 7, generator=generator) * cfg.augment_elastic).to(x.device)
        smooth = F.interpolate(displacement, size=x.shape[-2:], mode="bicubic", align_corners=False)
        grid = grid + smooth.permute(0, 2, 3, 1)
    background = x.amin()
    ink = F.grid_sample(x - background, grid, align_corners=False)
    if cfg.augment_thickness > 0:
        draw = torch.rand(n, generator=generator).to(x.device)[:, None, None, None]
        thicker = F.max_pool2d(ink, 3, 1, 1)
        thinner = -F.max_pool2d(-ink, 3, 1, 1)
        ink = torch.where(draw < cfg.augment_thickness / 2, thicker,
                          torch.where(draw > 1 - cfg.augment_thickness / 2, thinner, ink))
    return ink + background


@dataclass
class GenericData:
    """The generic data split as pretraining split it, with the input
    normalisation of the model being trained and the environment to train in."""

    train: SampleStore
    test: SampleStore
    spec: InputSpec
    augment: PretrainConfig
    env: TrainingEnv = field(default_factory=lambda: CPU)

    def normalize(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.spec.normalize(images))

    @property
    def example(self) -> torch.Tensor:
        """One normalised test sample, (1, 1, H, W): for tracing and counting operations."""
        return self.normalize(self.test.read(np.arange(1)))

    def calibration(self, n: int, seed: int = 0) -> np.ndarray:
        """A seeded, class-mixed subset of the training samples for calibration."""
        index = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:n].numpy()
        return self.normalize(self.train.read(index)).numpy()


def load_generic(input_spec: InputSpec, seed: int, augment: PretrainConfig,
                 data: LabeledImages | SampleStore | None = None, env: TrainingEnv = CPU) -> tuple[GenericData, Any]:
    """The generic data (default: the built-in digits) split with ``seed`` and
    normalised with a checkpoint's ``input`` spec, so that the test part is the
    one that model's accuracy was measured on."""
    store = as_store(data)
    split = split_generic(store, seed=seed)
    return GenericData(split.train, split.test, input_spec, augment, env), split


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss mixed with the hard-label loss; the T^2
    factor keeps the soft gradients' scale independent of the temperature."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The seed of one batch's random draws (augmentation, dropout): keyed by
    where the batch is, so a resumed run draws what an uninterrupted one drew,
    whichever worker process prepares it."""
    return int(np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1, np.uint64)[0] >> 1)


class _EpochBatches(torch.utils.data.Sampler):
    """This process's batches of one epoch: the shuffled shard that
    DistributedSampler gives this rank (the whole set with one process), cut
    into batches, from batch ``start`` on; each batch carries its seed."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world_size: int):
        self.sharding = torch.utils.data.DistributedSampler(range(size), num_replicas=world_size, rank=rank,
                                                            shuffle=True, seed=seed, drop_last=False)
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.sharding.num_samples / self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self):
        self.sharding.set_epoch(self.epoch)
        order = np.fromiter(iter(self.sharding), np.int64)
        for batch in range(self.start, self.batches_per_epoch):
            positions = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield positions, batch_seed(self.seed, self.epoch, batch, self.rank)


class _TrainingSamples(torch.utils.data.Dataset):
    """A batch of training samples by (positions, seed): read, normalised,
    and (when ``augment_here``, i.e. training on the CPU) augmented, in the
    DataLoader's worker processes when there are any."""

    def __init__(self, data: GenericData, augment_here: bool):
        self.store, self.spec, self.augment, self.augment_here = data.train, data.spec, data.augment, augment_here
        self.labels = data.train.labels     # once: on a view of a store, each ``.labels`` gathers all of them

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: tuple[np.ndarray, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        positions, seed = key
        x = torch.from_numpy(self.spec.normalize(self.store.read(positions)))
        y = torch.from_numpy(self.labels[positions])
        if self.augment_here:
            x = handwriting_augment(x, self.augment, torch.Generator().manual_seed(seed))
        return x, y, seed


@dataclass
class FitReport:
    """What one ``fit`` did: throughput and, when asked, test accuracy along the way."""

    images: int = 0                       # training images seen, all processes together
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)   # per evaluated epoch
    resumed_at: str = ""

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 1), "history": self.history,
                **({"resumed_at": self.resumed_at} if self.resumed_at else {})}


def _rng_states(device: torch.device) -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":          # this process's GPU only: a CPU run leaves CUDA alone
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def fit(model: nn.Module, data: GenericData, epochs: int, learning_rate: float, batch_size: int,
        teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.7, seed: int = 0,
        progress: ProgressFn | None = None, precision: str | None = None, evaluate_every: int = 0,
        report: FitReport | None = None) -> nn.Module:
    """Adam with cosine decay and the pretraining augmentation; ``teacher``
    switches on distillation. Parametrizations already on the model (masks,
    fake quantization) are trained through, not removed.

    ``progress(images, total)`` follows the images trained (this process's
    share times the processes); ``precision="fp32"`` turns mixed precision
    off for a stage whose numerics need it; ``evaluate_every`` epochs the
    test accuracy is measured into ``report.history``."""
    if epochs <= 0:
        return model
    env, report = data.env, report if report is not None else FitReport()
    precision = precision or env.precision
    identity = {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size, "seed": seed,
                "teacher": teacher is not None, "temperature": temperature, "alpha": alpha,
                "parameters": {k: list(v.shape) for k, v in model.state_dict().items()},
                "train": [len(data.train), data.train.fingerprint()], "processes": env.world_size,
                "precision": precision}
    slot = env.checkpoints.slot() if env.checkpoints is not None else None
    saved = slot.load(identity) if slot is not None else None
    if saved is not None and saved.get("done"):
        model.load_state_dict(saved["model"])
        report.images, report.seconds, report.history = saved["images"], saved["seconds"], saved["history"]
        report.resumed_at = "finished before"
        return model.eval()

    device = env.device
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    torch.manual_seed(seed)
    scaled_rate = learning_rate * math.sqrt(env.world_size)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=scaled_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    batches = _EpochBatches(len(data.train), batch_size, seed, env.rank, env.world_size)
    start_epoch = 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        _restore_rng(saved["rng"], device)
        start_epoch, batches.start = saved["epoch"], saved["batch"]
        report.images, report.seconds, report.history = saved["images"], saved["seconds"], saved["history"]
        report.resumed_at = f"epoch {start_epoch + 1}, batch {batches.start}"
    net = model
    if env.distributed:
        # buffers (pruning masks) are equal on every rank and never change: no broadcast each step
        # (torch 2.13 renamed the option; older ones, which pyproject allows, know only the first name)
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_OPTIONS
                   else {"broadcast_buffers": False})
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                  gradient_as_bucket_view=True, **no_sync)
    augment_here = device.type == "cpu"
    loader = torch.utils.data.DataLoader(_TrainingSamples(data, augment_here), sampler=batches, batch_size=None,
                                         num_workers=env.workers, persistent_workers=env.workers > 0,
                                         pin_memory=device.type == "cuda")
    total_images = epochs * batches.batches_per_epoch * batch_size * env.world_size
    checkpoints = env.checkpoints
    # A time interval becomes a number of steps, timed over the first ones, so
    # that every process saves at the same step without talking at every step.
    interval = checkpoints.every_steps if checkpoints is not None and checkpoints.every_steps > 0 else 0
    last_report, started = 0.0, time.perf_counter() - report.seconds
    steps_run, timing_from = 0, time.perf_counter()

    def save(epoch: int, batch: int, done: bool) -> None:
        if slot is None:
            return
        if env.is_main:
            slot.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                       "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                       "scaler": scaler.state_dict(), "rng": _rng_states(device), "epoch": epoch, "batch": batch,
                       "done": done, "images": report.images, "seconds": time.perf_counter() - started,
                       "history": report.history}, identity)
        env.barrier()

    for epoch in range(start_epoch, epochs):
        batches.epoch = epoch
        net.train()
        for x, y, step_seed in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            torch.manual_seed(step_seed)
            if not augment_here:
                x = handwriting_augment(x, data.augment, torch.Generator().manual_seed(step_seed))
            with env.autocast(precision):
                logits = net(x)
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(x)
                    loss = distillation_loss(logits.float(), target.float(), y, temperature, alpha)
                else:
                    loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            batches.start += 1
            report.images += len(y) * env.world_size
            steps_run += 1
            now = time.perf_counter()
            if progress and env.is_main and now - last_report > 0.1:
                progress(min(report.images, total_images), total_images)
                last_report = now
            if checkpoints is None:
                continue
            if not interval and steps_run == TIMED_STEPS:
                per_step = (now - timing_from) / TIMED_STEPS
                interval = env.smallest(max(1, int(checkpoints.every_seconds / per_step)))
            if interval and steps_run % interval == 0:
                save(epoch, batches.start, done=False)   # batch == batches_per_epoch: the next epoch's start
        schedule.step()
        batches.start = 0
        report.seconds = time.perf_counter() - started
        if evaluate_every and ((epoch + 1) % evaluate_every == 0 or epoch + 1 == epochs):
            paused = time.perf_counter()
            report.history.append({"epoch": epoch + 1, "seconds": round(report.seconds, 3),
                                   "images": report.images, "accuracy": test_accuracy(model, data)})
            started += time.perf_counter() - paused     # evaluation is not training time
        if progress and env.is_main:
            progress(min(report.images, total_images), total_images)
    report.seconds = time.perf_counter() - started
    model.to("cpu")
    if teacher is not None:
        teacher.to("cpu")
    save(epochs, 0, done=True)
    return model.eval()


def accuracy(model: nn.Module, data: GenericData, store: SampleStore) -> float:
    """``model``'s accuracy on ``store``, in batches on the environment's
    device (every process measures all of it, so none waits for another)."""
    device = data.env.device
    was = next(model.parameters()).device
    model.to(device).eval()
    correct = 0
    with torch.no_grad():
        for images, labels in store.chunks(1024):
            logits = model(data.normalize(images).to(device))
            correct += int((logits.argmax(1).cpu() == torch.from_numpy(labels)).sum())
    model.to(was)
    return correct / max(1, len(store))


def test_accuracy(model: nn.Module, data: GenericData) -> float:
    return accuracy(model, data, data.test)
