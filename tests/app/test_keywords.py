"""The spoken-keyword loop: synthesized speech, a DS-CNN with the log-mel
front-end in its program, brought in as a user's model, personalized from a
folder of WAV files in a device process on two runtimes alike."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def keyword_bundle(tmp_path_factory):
    from edgetailor.app.keywords import keyword_personalize_config, train_keyword_ge
    from edgetailor.export import bundle_from_model
    from edgetailor.toolkit.input_spec import InputSpec
    from edgetailor.toolkit.speech import WORDS, generic_speakers, spoken_digits, synthesizers_missing

    why = synthesizers_missing()
    if why:
        pytest.skip(f"the keyword example needs offline speech synthesis: {why}")
    speakers = generic_speakers()[::8]                          # 24 speakers: a small GE, quickly
    train = spoken_digits(speakers, seed=0)
    torch.set_num_threads(2)
    model = train_keyword_ge(train, epochs=10)
    out = tmp_path_factory.mktemp("keywords") / "bundle"
    bundle_from_model(model, torch.from_numpy(train.images[:4]), WORDS, train, out,
                      input_spec=InputSpec.for_audio(16000), formats=["onnx", "tflite"], replay_size=100,
                      personalize=keyword_personalize_config())
    return out, model, train


def test_the_bundle_hears_raw_clips_with_its_front_end_recorded(keyword_bundle):
    out, model, train = keyword_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    spec = manifest["input"]
    assert manifest["schema_version"] == 3 and spec["modality"] == "audio" and spec["shape"] == [1, 16000]
    frontend = spec["preprocess"]["frontend"]
    assert frontend["name"] == "log-mel-v1" and frontend["in"] == "global_expert" and frontend["window"] == 256
    ge = manifest["global_expert"]
    assert ge["macs"] > 6_000_000           # the front-end's STFT is counted: it runs in GE's program
    le, gn = manifest["local_expert"], manifest["gating_network"]
    assert (le["params"] + gn["params"]) / ge["params"] <= 0.025


def test_an_accent_user_personalizes_from_wav_files_alike_on_two_runtimes(keyword_bundle, tmp_path):
    from edgetailor.app.keywords import save_wav_folder
    from edgetailor.device import DeviceRuntime
    from edgetailor.toolkit.speech import accent_speakers, accent_user

    out, _, _ = keyword_bundle
    user = accent_user(accent_speakers()[0], train_per_word=5, test_per_word=5)
    folder = save_wav_folder(user.train, tmp_path / "mine")
    results = {}
    for backend in ("ort", "litert"):
        state = tmp_path / f"state-{backend}"
        proc = run_cli("device", "personalize", "--bundle", str(out), "--state", str(state), "--samples", str(folder),
                       "--backend", backend, "--json")
        report = json.loads(proc.stdout)
        assert report["n_samples"] == 50 and not report["torch_imported"]
        with DeviceRuntime.open(out, state, backend) as runtime:
            result = runtime.evaluate_dataset(user.test)
            results[backend] = (result["ge_only_accuracy"], result["accuracy"])
    assert abs(results["ort"][1] - results["litert"][1]) <= 0.005, results
    before, after = results["ort"]
    assert after > before + 0.1, results

    with wave.open(str(folder / "one" / "bad.wav"), "wb") as writer:   # a clip recorded at 8 kHz
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(8000)
        writer.writeframes((np.sin(np.arange(4000) / 5) * 8000).astype("<i2").tobytes())
    bad = run_cli("device", "personalize", "--bundle", str(out), "--state", str(tmp_path / "state-ort"),
                  "--samples", str(folder), check=False)
    assert bad.returncode == 2 and "bad.wav is sampled at 8000 Hz; the bundle's model hears 16000 Hz" in bad.stderr
