"""Model definitions (torch): the Global Expert architectures, registered by name.

Every GE returns its logits and the intermediate features that the Local
Expert and Gating Network read on the device (``forward_with_features``), so
that LE and GN cost a few hundred multiply-adds instead of a second network.
Two families: LeNet-5 (convolutional, fixed depth; widths are its size knob)
and a small vision transformer (depth is its size knob, which is what the
learngene workflow expands). Server and export side only: the device never
imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
from torch import nn
import torch.nn.functional as F

from edgetailor.toolkit.errors import ConfigError


@dataclass(frozen=True)
class FeatureTap:
    """A named intermediate activation that GE exposes to LE and GN."""

    name: str
    dim: int
    # > 0: the feature is this many maps of dim // channels positions each,
    # channel-major (a spatial feature a channel-mix LE can read); 0: a vector.
    channels: int = 0


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 greyscale input (padding 2 on the first conv, as the
    classic 32x32 version sees it), ReLU and max-pooling as in modern reimplementations.

    ``widths`` (conv1, conv2, fc1, fc2) default to the classic 6/16/120/84;
    structured pruning makes them smaller, and a checkpoint records them so
    that the pruned model can be rebuilt."""

    arch = "lenet5"
    default_widths = (6, 16, 120, 84)
    # The features LE and GN read unless the recipe names others.
    default_taps = {"le_feature_tap": "conv", "gn_feature_tap": "conv"}
    # `server compress` may remove channels: the checkpoint records the new widths.
    structured_pruning = True

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] | None = None, depth: int | None = None):
        super().__init__()
        if depth not in (None, 0, 5):
            raise ConfigError(f"lenet5 has a fixed depth of 5 layers (got depth {depth}); its size knob is widths")
        if widths is not None and len(widths) != 4:
            raise ConfigError(f"lenet5 takes 4 widths (conv1, conv2, fc1, fc2), got {list(widths)}")
        c1, c2, f1, f2 = widths or self.default_widths
        self.conv1 = nn.Conv2d(1, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, num_classes)
        self.num_classes = num_classes

    def widths(self) -> list[int]:
        """The current widths, read off the layers (pruning changes them in place)."""
        return [self.conv1.out_channels, self.conv2.out_channels, self.fc1.out_features, self.fc2.out_features]

    @property
    def feature_taps(self) -> tuple[FeatureTap, ...]:
        """Taps in the order forward_with_features returns them. "conv" is the
        pooled conv2 output, flattened: the last spatial features."""
        return (FeatureTap("conv", self.fc1.in_features, self.conv2.out_channels),
                FeatureTap("fc1", self.fc1.out_features),
                FeatureTap("fc2", self.fc2.out_features))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        conv = torch.flatten(x, 1)
        h1 = F.relu(self.fc1(conv))
        h2 = F.relu(self.fc2(h1))
        return self.fc3(h2), {"conv": conv, "fc1": h1, "fc2": h2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def head(self) -> nn.Linear:
        """The last layer, which the last-layer fine-tuning baseline retrains."""
        return self.fc3


class TransformerBlock(nn.Module):
    """A pre-norm transformer encoder layer (multi-head self-attention, then a
    GELU MLP, each with a residual). Attention is written out rather than
    taken from ``nn.MultiheadAttention`` so that it exports to ONNX, ExecuTorch
    and TFLite as plain MatMul/Softmax, and so that every block has the same
    parameter names and shapes, which the learngene expansion relies on."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"the embedding width {dim} must be a multiple of the {heads} attention heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(d // self.heads)), dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def matmul_macs(self, output: torch.Tensor) -> int:
        """Multiply-adds of the two parameter-free matmuls (q·kᵀ and attention·v),
        which a Linear/Conv hook cannot see."""
        n, d = output.shape[-2], output.shape[-1]
        return 2 * n * n * d


class ViT(nn.Module):
    """A small vision transformer for 28x28 greyscale input: 4x4 patches (49
    tokens plus a class token), learned position embeddings, ``depth`` pre-norm
    blocks, and a linear head on the final class token.

    ``widths`` are (embedding width, MLP width), default 64/128, with 4 heads:
    about 33 k parameters per block, so depth 2..8 spans 72 k..272 k. Depth is
    the size knob that ``edgetailor server learngene expand`` turns."""

    arch = "vit"
    default_widths = (64, 128)
    default_depth = 6
    heads = 4
    patch = 4
    image_size = 28
    # All 49 patch tokens for LE (a channel mix, as on LeNet's maps), their 3x3 pooled grid for GN:
    # on real writers the mean token left LE 12 points behind fine-tuning all of GE (docs/DESIGN.md).
    default_taps = {"le_feature_tap": "patches", "gn_feature_tap": "grid"}
    structured_pruning = False  # blocks share one width; see server_side/compress/pipeline.preflight

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] | None = None, depth: int | None = None):
        super().__init__()
        if widths is not None and len(widths) != 2:
            raise ConfigError(f"vit takes 2 widths (embedding, mlp), got {list(widths)}")
        depth = self.default_depth if depth is None else depth
        if depth < 0:
            raise ConfigError(f"vit depth must be >= 1, got {depth}")
        dim, mlp_dim = widths or self.default_widths
        tokens = (self.image_size // self.patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, self.patch, stride=self.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        # depth 0 is the "shell" (embedding and head without blocks) that a learngene carries
        self.blocks = nn.ModuleList(TransformerBlock(dim, self.heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        self.num_classes = num_classes
        self.mlp_dim = mlp_dim
        self.tokens = tokens
        self.apply(_init_transformer)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def widths(self) -> list[int]:
        return [self.classifier.in_features, self.mlp_dim]

    @property
    def feature_taps(self) -> tuple[FeatureTap, ...]:
        """"patches": the 49 final patch tokens, channel-major (dim maps of
        7x7, as LeNet's "conv"), which the channel-mix LE reads; "grid": the
        same averaged over 3x3 windows with stride 2 (dim maps of 3x3), which
        GN reads; "tokens": their mean; "cls": the class token the head reads."""
        dim = self.classifier.in_features
        side = self.image_size // self.patch
        pooled = (side - 3) // 2 + 1
        return (FeatureTap("tokens", dim), FeatureTap("cls", dim), FeatureTap("patches", dim * side * side, dim),
                FeatureTap("grid", dim * pooled * pooled, dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 1, 28, 28) -> tokens (N, 50, dim): patches, class token, positions."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def readout(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Final tokens -> logits and the feature taps."""
        x = self.norm(x)
        cls = x[:, 0]
        side = self.image_size // self.patch
        patches = x[:, 1:].transpose(1, 2)                                       # (N, dim, 49)
        grid = F.avg_pool2d(patches.unflatten(2, (side, side)), 3, stride=2)     # (N, dim, 3, 3)
        return self.classifier(cls), {"tokens": x[:, 1:].mean(dim=1), "cls": cls, "patches": patches.flatten(1),
                                      "grid": grid.flatten(1)}

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.readout(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def head(self) -> nn.Linear:
        """The last layer, which the last-layer fine-tuning baseline retrains."""
        return self.classifier


def _init_transformer(module: nn.Module) -> None:
    """Truncated-normal(0.02) linear weights and zero biases, as ViT/DeiT
    initialise; torch's default (Kaiming-uniform) trains transformers worse."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


ARCHITECTURES: dict[str, type[nn.Module]] = {LeNet5.arch: LeNet5, ViT.arch: ViT}


def build_model(arch: str, num_classes: int, widths: list[int] | None = None, depth: int | None = None) -> nn.Module:
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return cls(num_classes=num_classes, widths=tuple(widths) if widths else None, depth=depth or None)


def model_depth(model: nn.Module) -> int | None:
    """The depth a checkpoint records: the block count for depth-scalable families, None otherwise."""
    return getattr(model, "depth", None) if not isinstance(model, LeNet5) else None


class WithFeatures(nn.Module):
    """Wraps a GE so that a plain forward returns (logits, features...) for ONNX export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        logits, feats = self.model.forward_with_features(x)
        return (logits, *(feats[t.name] for t in self.model.feature_taps))
