"""The torch reference backend: the bundle's torch.export programs (``.pt2``,
written with ``export bundle --formats ...,torch``) run by torch, LE and GN
trained with autograd and ``torch.optim.AdamW`` at ONNX Runtime's settings.
What the other backends are checked against; no phone runs it."""

from __future__ import annotations

import os

import numpy as np

from edgetailor.device.backends.base import split_outputs, unpack_weights
from edgetailor.toolkit.bundle import Bundle

THREADS = min(2, os.cpu_count() or 1)

# Imported when the backend is created (get_backend), never by the device
# package itself: the device side must install and run without torch.
torch = F = None


def _import_torch() -> None:
    global torch, F
    if torch is None:
        import torch as torch_module
        import torch.nn.functional as functional

        torch, F = torch_module, functional


def _load(bundle: Bundle, file: str):
    torch.set_num_threads(THREADS)
    return torch.export.load(str(bundle.path(file))).module()


class TorchGlobalExpert:
    def __init__(self, bundle: Bundle):
        self.spec = bundle.manifest.global_expert
        self.module = _load(bundle, self.spec.files["torch"])

    def run(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with torch.no_grad():
            outputs = self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return split_outputs([o.numpy() for o in outputs], self.spec)


class TorchTrainer:
    def __init__(self, bundle: Bundle, part: str):
        self.module = _load(bundle, bundle.manifest.part(part).training["torch"]["program"])
        # ORT's training artifacts: AdamW, betas 0.9/0.999, eps 1e-6, no weight decay.
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0)

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, *inputs: np.ndarray) -> float:
        *x, target = (torch.from_numpy(np.ascontiguousarray(a)) for a in inputs)
        loss = F.cross_entropy(self.module(*x), target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def weights(self) -> dict[str, np.ndarray]:
        return {name: p.detach().numpy().copy() for name, p in self.module.named_parameters()}


class TorchTrainedPart:
    def __init__(self, bundle: Bundle, part: str, weights: dict[str, np.ndarray]):
        self.module = _load(bundle, bundle.manifest.part(part).training["torch"]["program"])
        self.module.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs)).numpy()


class TorchBackend:
    name = "torch"

    def __init__(self):
        _import_torch()

    def load_global_expert(self, bundle: Bundle) -> TorchGlobalExpert:
        return TorchGlobalExpert(bundle)

    def trainer(self, bundle: Bundle, part: str) -> TorchTrainer:
        return TorchTrainer(bundle, part)

    def load_trained(self, bundle: Bundle, part: str, blob: bytes) -> TorchTrainedPart:
        return TorchTrainedPart(bundle, part, unpack_weights(blob, bundle, part, self.name))
