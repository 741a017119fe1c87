"""``edgetailor demo --task keywords``: bring your own model, for spoken keywords.

The loop a keyword-spotting team runs, on data made offline by the speech
synthesizers Debian ships (``toolkit.speech``):
1. synthesize "zero" to "nine" by generic English speakers;
2. train their own DS-CNN (``KeywordDSCNN`` below, written as any torch
   user writes one, beginning with edgetailor's log-mel front-end);
3. bring it in with ``export.bundle_from_model`` (automatic taps), signed;
4. personalize it for accent users, voices the GE never heard, each in its
   own torch-free device process from a folder of WAV files;
5. compare with fine-tuning all of GE or its last layer on the same samples.
Prints the table of the handwriting demo; writes report.json and report.png.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import wave
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgetailor.toolkit import atomic
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.manifest import Manifest
from edgetailor.toolkit.signing import PRIVATE_KEY, PUBLIC_KEY, generate_key

REPLAY_PER_WORD = 30


def keyword_personalize_config():
    """The device's defaults this bundle ships: more replay in each LE batch
    (0.6 of the user's rows, against 0.3 for glyphs) in smaller batches. The
    GE reads generic speakers almost perfectly, so what LE must above all do
    is agree with it on generic input; on 16 accent users this kept generic
    accuracy within 0.5 points (the glyph defaults lost 0.6) at 0.79 of
    fine-tuning's gain (benchmarks/keywords.py)."""
    from edgetailor.toolkit.config import PersonalizeConfig

    return PersonalizeConfig(replay_weight=0.6, batch_size=96)


class SeparableBlock(nn.Module):
    """A depthwise 3x3 conv and a pointwise 1x1 conv, each with BatchNorm and ReLU (MobileNet's block)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(channels_in, channels_in, 3, stride=stride, padding=1, groups=channels_in,
                                   bias=False)
        self.bn1 = nn.BatchNorm2d(channels_in)
        self.pointwise = nn.Conv2d(channels_in, channels_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.pointwise(F.relu(self.bn1(self.depthwise(x))))))


class KeywordDSCNN(nn.Module):
    """A keyword spotter in the DS-CNN design of "Hello Edge" (Zhang et al.
    2017) on edgetailor's log-mel front-end, so that the exported GE hears
    raw clips: (N, 1, 16000) at 16 kHz -> 40 mels x 99 frames (16 ms windows,
    10 ms hop) -> a strided conv, four depthwise-separable blocks (96 maps of
    10 x 25), pooled over frequency into 5 time steps, a linear classifier. ``body`` is everything after the
    front-end, which a training script can run on precomputed features."""

    def __init__(self, num_classes: int = 10, width: int = 96):
        super().__init__()
        from edgetailor.server_side.frontends import LogMel

        self.frontend = LogMel(window=256, n_mels=40)
        self.body = nn.Sequential(
            nn.BatchNorm2d(1),
            nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            SeparableBlock(width, width, stride=2), SeparableBlock(width, width), SeparableBlock(width, width),
            SeparableBlock(width, width), nn.AvgPool2d((10, 5)), nn.Flatten(),
            nn.Linear(width * 5, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.frontend(x))


def keyword_data(seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """Generic training clips, and clips of a quarter of the generic speakers held out as the generic test set."""
    from edgetailor.toolkit.speech import generic_speakers, spoken_digits

    speakers = generic_speakers()
    held_out = set(np.random.default_rng(seed).permutation(len(speakers))[: len(speakers) // 4].tolist())
    train = spoken_digits([s for i, s in enumerate(speakers) if i not in held_out], seed=seed,
                          source="spoken digits, generic training speakers")
    test = spoken_digits([s for i, s in enumerate(speakers) if i in held_out], seed=seed + 1,
                         source="spoken digits, held-out generic speakers")
    return train, test


def train_keyword_ge(train: LabeledImages, epochs: int = 30, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> KeywordDSCNN:
    """The owner's training script: the front-end's features computed once,
    the body trained on them with Adam, one-cycle rates and random time shifts."""
    torch.manual_seed(seed)
    model = KeywordDSCNN().eval()
    with torch.no_grad():
        x = torch.cat([model.frontend(torch.from_numpy(train.images[i:i + 256])) for i in range(0, len(train), 256)])
    y = torch.from_numpy(train.labels)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.body.parameters(), lr=3e-3)
    steps = epochs * -(-len(x) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    model.body.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            rows = order[start:start + 64]
            shift = int(torch.randint(-8, 9, (1,), generator=generator))
            loss = F.cross_entropy(model.body(torch.roll(x[rows], shift, dims=3)), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if progress is not None:
            progress(epoch + 1, epochs)
    return model.eval()


def accuracy(model: nn.Module, data: LabeledImages) -> float:
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(data.images[i:i + 256])) for i in range(0, len(data), 256)])
    return float((logits.argmax(1).numpy() == data.labels).mean())


def save_wav_folder(data: LabeledImages, root: Path) -> Path:
    """Clips as a user's device records them: one 16-bit WAV per clip, a folder per word."""
    if root.exists():
        shutil.rmtree(root)
    for i, (clip, label) in enumerate(zip(data.images[:, 0], data.labels)):
        folder = root / data.label_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        with wave.open(str(folder / f"{i:04d}.wav"), "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(16000)
            writer.writeframes((np.clip(clip, -1, 1) * 32767).round().astype("<i2").tobytes())
    return root


def run_keyword_demo(out: str | Path, n_users: int = 6, samples_per_word: int = 10, epochs: int = 30,
                     seed: int = 0, echo: Callable[[str], None] = print, formats: tuple[str, ...] = ("onnx",),
                     test_per_word: int = 10) -> dict:
    """The keyword loop (module doc); returns the report it writes."""
    import click

    from edgetailor.app.demo import compare_on_user, overhead_of, plot_report, summarize
    from edgetailor.export import bundle_from_model
    from edgetailor.server_side.finetune import finetune
    from edgetailor.server_side.tapped import TappedModel, probe_taps
    from edgetailor.toolkit.input_spec import InputSpec
    from edgetailor.toolkit.speech import WORDS, accent_speakers, accent_user

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    echo("[1/5] synthesizing 'zero' to 'nine' by generic English speakers (espeak-ng), each in a room")
    train, test = keyword_data(seed)
    echo(f"  {len(train)} training clips, {len(test)} clips of held-out speakers")
    echo(f"[2/5] training the keyword spotter (DS-CNN on log-mel, {epochs} epochs), as its owner would")
    with click.progressbar(length=epochs, label="  train", file=sys.stderr) as bar:
        model = train_keyword_ge(train, epochs, seed, progress=lambda e, n: bar.update(1))
    echo(f"  generic accuracy on held-out speakers {accuracy(model, test):.4f}")

    echo("[3/5] bringing it in: bundle_from_model with automatic taps, signed")
    key_dir = out / "keys"
    if not (key_dir / PRIVATE_KEY).exists():
        generate_key(key_dir)
    rng = np.random.default_rng(seed)
    replay = train.subset(np.sort(np.concatenate([rng.permutation(np.flatnonzero(train.labels == c))[:REPLAY_PER_WORD]
                                                  for c in range(len(WORDS))])))
    example = torch.from_numpy(train.images[:4])
    bundle_dir = bundle_from_model(model, example, WORDS, replay, out / "bundle", input_spec=InputSpec.for_audio(),
                                   generic_test=test, formats=list(formats), overwrite=True, seed=seed,
                                   personalize=keyword_personalize_config(),
                                   signing_key=key_dir / PRIVATE_KEY, progress=lambda msg: echo(f"  {msg}"))
    bundle_zip = bundle_dir.with_name(bundle_dir.name + ".zip")
    trusted = key_dir / PUBLIC_KEY
    manifest = Manifest.from_json((bundle_dir / "manifest.json").read_text())
    ge_m, le_m, gn_m = manifest.global_expert, manifest.local_expert, manifest.gating_network
    overhead = overhead_of(manifest)
    tapped = TappedModel(model, probe_taps(model, example, len(WORDS)), le_m.feature_tap, gn_m.feature_tap)

    speakers = accent_speakers(seed)
    chosen = [speakers[i] for i in np.linspace(0, len(speakers) - 1, min(n_users, len(speakers))).round().astype(int)]
    echo(f"[4/5] synthesizing {len(chosen)} accent users ({samples_per_word} samples per word each): voices the GE "
         "never heard")
    users = [accent_user(s, samples_per_word, test_per_word, seed) for s in chosen]

    echo("[5/5] personalizing each user from a folder of WAV files in a device process, and the baselines")
    rows = []
    with click.progressbar(users, label="  users", file=sys.stderr) as bar:
        for k, user in enumerate(bar):
            folder = save_wav_folder(user.train, out / "users" / f"user{k}")
            x, y = torch.from_numpy(user.train.images), torch.from_numpy(user.train.labels)
            baselines = {f"FT {mode}": partial(accuracy, finetune(tapped, x, y, mode, seed=seed))
                         for mode in ("all", "last")}
            voice = user.speaker.voice if user.speaker.engine == "espeak-ng" else f"flite {user.speaker.voice}"
            rows.append({"user": voice, "speaker": user.speaker.describe(), "n_train": len(user.train),
                         "n_test": len(user.test),
                         **compare_on_user(bundle_zip, trusted, out / "state" / f"user{k}", folder, user.test, test,
                                           baselines)})
    mean, table = summarize(rows)
    report = {"task": "keywords", "arch": ge_m.arch, "seed": seed, "samples_per_word": samples_per_word,
              "generic_train_n": len(train), "generic_test_n": len(test), "users": rows, "mean": mean,
              "overhead": overhead, "bundle": str(bundle_dir), "le": {"kind": le_m.kind, "tap": le_m.feature_tap},
              "gn": {"tap": gn_m.feature_tap}, "wall_seconds": round(time.perf_counter() - started, 1)}
    atomic.write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    plot_report(report, out / "report.png", ylim=(0.0, 1.0))
    echo("")
    echo(table)
    echo("")
    echo(f"LE+GN overhead: {overhead['le_gn_params']:,} params ({overhead['params_pct']:.2f} % of GE's "
         f"{overhead['ge_params']:,}), {overhead['le_gn_macs']:,} MACs ({overhead['macs_pct']:.2f} % of GE's "
         f"{overhead['ge_macs']:,}, its log-mel front-end included); device peak RSS {mean['peak RSS MB']:.0f} MB")
    echo(f"report: {out / 'report.json'}, plot: {out / 'report.png'} ({report['wall_seconds']:.0f}s in all)")
    return report
