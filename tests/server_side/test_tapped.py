"""TappedModel: a user's classifier's feature taps, found by name or by the
built-in families' rules, on architectures unlike LeNet-5 and the ViT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetailor.server_side.models import LeNet5, WithFeatures
from edgetailor.server_side.tapped import TappedModel, auto_taps, probe_taps, resolve_taps
from edgetailor.toolkit.errors import ModelError
from examples.byom.architectures import DSCNN, ResNet

EXAMPLE = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


class RowGRU(nn.Module):
    """Reads a glyph row by row: the GRU's output is (N, rows, hidden), features last."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(28, 12, batch_first=True)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        out, _ = self.gru(x[:, 0])
        return self.fc(out[:, -1])


class ColumnConv1d(nn.Module):
    """A 1-D convolution over the glyph's columns, rows as channels: (N, C, L), channels first."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(28, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.conv(x[:, 0]).amax(dim=2))


def test_auto_taps_read_the_last_spatial_block_for_le_and_the_classifier_input_for_gn():
    assert auto_taps(probe_taps(ResNet().eval(), EXAMPLE, 10)) == ("pool", "head:input")
    assert auto_taps(probe_taps(DSCNN().eval(), EXAMPLE, 10)) == ("features", "classifier.3:input")
    assert auto_taps(probe_taps(ColumnConv1d().eval(), EXAMPLE, 10)) == ("conv", "fc:input")
    assert auto_taps(probe_taps(RowGRU().eval(), EXAMPLE, 10)) == ("gru", "fc:input")


def test_tapped_features_are_channel_major_whatever_the_layout():
    gru = RowGRU().eval()
    probe = probe_taps(gru, EXAMPLE, 10)
    tap = probe.candidates["gru"]
    assert tap.channels_last and tap.shape == (28, 12) and tap.channels == 12
    tapped = TappedModel(gru, probe, "gru", "fc:input")
    logits, features = tapped.forward_with_features(EXAMPLE)
    out, _ = gru.gru(EXAMPLE[:, 0])
    torch.testing.assert_close(features["gru"], out.transpose(1, 2).flatten(1))   # 12 maps of 28 positions
    torch.testing.assert_close(features["fc:input"], out[:, -1])
    torch.testing.assert_close(logits, gru(EXAMPLE))
    conv = ColumnConv1d().eval()
    probe = probe_taps(conv, EXAMPLE, 10)
    assert not probe.candidates["conv"].channels_last and probe.candidates["conv"].channels == 16
    assert [t.name for t in TappedModel(conv, probe, "conv", "conv").feature_taps] == ["conv"]


def test_the_wrapped_model_exports_like_a_builtin_ge():
    """WithFeatures (what every exporter wraps) returns logits, then LE's tap, then GN's."""
    model = ResNet().eval()
    tapped = TappedModel(model, probe_taps(model, EXAMPLE, 10), "stage2", "head:input")
    logits, le, gn = WithFeatures(tapped)(EXAMPLE)
    assert le.shape == (3, 32 * 14 * 14) and gn.shape == (3, 32)
    assert [(t.name, t.dim, t.channels) for t in tapped.feature_taps] == [("stage2", 6272, 32), ("head:input", 32, 0)]
    torch.testing.assert_close(tapped.head().weight, model.head.weight)


def test_named_taps_and_an_unknown_name_lists_the_candidates():
    probe = probe_taps(DSCNN().eval(), EXAMPLE, 10)
    assert resolve_taps(probe, "features.4") == ("features.4", "features.4")
    assert resolve_taps(probe, ["features.4", "classifier.1"]) == ("features.4", "classifier.1")
    assert resolve_taps(probe, {"gn": "classifier.1"}) == ("features", "classifier.1")
    with pytest.raises(ModelError, match="no tap 'features.9'") as caught:
        resolve_taps(probe, ["features.9", "auto"])
    assert "features.5 (SeparableBlock, 64x7x7)" in caught.value.hint
    assert "classifier.3:input (Linear, 64)" in caught.value.hint
    with pytest.raises(ModelError, match="give two"):
        resolve_taps(probe, ["features", "classifier.1", "classifier.3"])


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Flatten()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h), h


class NoBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)).mean(0)


@pytest.mark.parametrize("model, message", [
    (TwoHeads(), "returns a tuple, not a logits tensor"),
    (NoBatch(), r"returns shape \(10,\) for a batch of 3"),
    (nn.Sequential(nn.Flatten(), nn.Linear(784, 7)), r"returns shape \(3, 7\).*\(3, 10\)"),
])
def test_a_model_that_does_not_return_n_by_classes_logits_is_refused(model, message):
    with pytest.raises(ModelError, match=message):
        probe_taps(model.eval(), EXAMPLE, 10)


def test_an_input_the_model_cannot_take_is_named():
    with pytest.raises(ModelError, match=r"failed on the example input of shape \(3, 1, 32, 32\)"):
        probe_taps(LeNet5().eval(), torch.zeros(3, 1, 32, 32), 10)


class TokenMLP(nn.Module):
    """A Linear then a ReLU over row tokens: the ReLU's output keeps the Linear's features-last layout."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(28, 16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.mlp(x[:, 0]).mean(1))


class SqueezeExcite(nn.Module):
    """A Conv1d block gated by a Linear registered after it: the block's maps stay channels-first."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(28, 8, 3, padding=1), nn.ReLU())
        self.gate = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.block(x[:, 0])
        return self.fc((h * torch.sigmoid(self.gate(h.mean(2)))[:, :, None]).mean(2))


class SharedPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.fc = nn.Linear(49, 10)

    def forward(self, x):
        return self.fc(self.pool(self.pool(x)).flatten(1))


def test_a_features_layout_is_that_of_the_layer_that_made_it_and_shared_modules_are_no_taps():
    assert probe_taps(TokenMLP().eval(), EXAMPLE, 10).candidates["mlp"].channels_last
    assert not probe_taps(SqueezeExcite().eval(), EXAMPLE, 10).candidates["block"].channels_last
    probe = probe_taps(SharedPool().eval(), EXAMPLE, 10)
    assert "pool" not in probe.candidates
    with pytest.raises(ModelError, match="'pool' runs 2 times in one forward pass"):
        resolve_taps(probe, "pool")
