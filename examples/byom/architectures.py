"""Models a user might bring, unlike edgetailor's own LeNet-5 and ViT.

They are ordinary torch code, written without edgetailor in mind: the tests,
``benchmarks/user_models.py`` and docs/BRING_YOUR_OWN_MODEL.md use them as a
user's models, through ``edgetailor.export.bundle_from_model`` and
``export bundle --model-factory examples.byom.architectures:resnet``.

- ``ResNet``: residual blocks with BatchNorm, a strided stage, global
  average pooling; ``resnet()`` builds it for 28x28 greyscale digits.
- ``DSCNN``: depthwise-separable convolutions (MobileNet's), the design of
  small keyword spotters, with a 1x1 pointwise conv per block.
- ``RowGRU``: a GRU reading the glyph row by row, features last.
- ``RowAttention``: a transformer encoder layer over the glyph's rows.
- ``KeywordDSCNN``: the keyword demo's spotter (``edgetailor/app/keywords.py``),
  on edgetailor's log-mel front-end.
- ``GestureCNN``: 1-D convolutions over 3-axis accelerometer windows
  (``toolkit/gestures.py``), a time-series model.
- ``train_classifier``: a plain training loop, as a user would have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgetailor.app.keywords import KeywordDSCNN, SeparableBlock   # the keyword demo's spotter, and its block


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = ResidualBlock(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.stage2 = ResidualBlock(2 * width)
        self.pool = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(2 * width, 2 * width, 1), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stage2(self.down(self.stage1(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))


class DSCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            SeparableBlock(width, width), SeparableBlock(width, width, stride=2), SeparableBlock(width, width))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1),
                                        nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class RowGRU(nn.Module):
    """A recurrent reader: the glyph's 28 rows are a sequence of 28-value
    steps, read by a GRU; the classifier reads its last state. Its features
    are (N, steps, hidden): features last, unlike a convolution's maps."""

    def __init__(self, num_classes: int = 10, hidden: int = 64):
        super().__init__()
        self.gru = nn.GRU(28, hidden, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x[:, 0])
        return self.fc(self.norm(out[:, -1]))


class RowAttention(nn.Module):
    """A transformer encoder layer over the glyph's rows (28 tokens of 28
    values, a learned position embedding), mean-pooled into the classifier:
    attention, as a format must carry it."""

    def __init__(self, num_classes: int = 10, dim: int = 32):
        super().__init__()
        self.embed = nn.Linear(28, dim)
        self.position = nn.Parameter(torch.zeros(1, 28, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(self.embed(x[:, 0]) + self.position).mean(dim=1))


class GestureCNN(nn.Module):
    """A 1-D convolutional gesture classifier for 3-axis accelerometer
    windows (N, 3, 64): three conv blocks, global average pooling."""

    def __init__(self, num_classes: int = 6, width: int = 32):
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Conv1d(3, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 5, stride=2, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm1d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(x).mean(dim=2))


def resnet() -> nn.Module:
    return ResNet()


def dscnn() -> nn.Module:
    return DSCNN()


def row_gru() -> nn.Module:
    return RowGRU()


def gesture_cnn() -> nn.Module:
    return GestureCNN()


def keyword_dscnn() -> nn.Module:
    return KeywordDSCNN()


ARCHITECTURES = {"resnet": resnet, "dscnn": dscnn, "row_gru": row_gru, "gesture_cnn": gesture_cnn,
                 "keyword_dscnn": keyword_dscnn}


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 15, batch: int = 64,
                     lr: float = 3e-3, seed: int = 0, shift_dims: tuple[int, ...] | None = None) -> nn.Module:
    """Adam with light shift augmentation (along ``shift_dims``, by default
    every axis after the channels): what a user's own training script does."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * -(-len(x) // batch))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            rows = order[start:start + batch]
            dims = shift_dims or tuple(range(2, x.ndim))      # image rows and columns, or a window's steps
            shift = torch.randint(-2, 3, (len(dims),), generator=generator).tolist()
            inputs = torch.roll(x[rows], shifts=shift, dims=dims)
            loss = F.cross_entropy(model(inputs), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
