"""The C firmware (firmware_examples/) against the Python device runtime, on
the same bundle, samples and seed: the host build, the sanitizer build, and
the Cortex-M4 image under QEMU.

Each toolchain is optional on a developer's machine: the tests that need it
skip with what to install. CI installs them all (.ci/run). The benchmark
(benchmarks/firmware.py) measures the issue's targets on more users; these
tests check the same things on one, with fewer epochs to stay quick."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "firmware_examples" / "scripts"))
import parity  # noqa: E402  (firmware_examples/scripts/parity.py)

QUICK = {"le_epochs": 40, "gn_steps": 100}          # both sides train with these
QUICK_ARGS = ["--le-epochs", "40", "--gn-steps", "100"]
REPLAY = 50                                         # what a 128 KB microcontroller bundle ships


def need(tool: str, install: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed: {install}")


def need_cc() -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: install gcc or clang (Debian/Ubuntu: apt-get install build-essential)")


def need_arm() -> None:
    need("arm-none-eabi-gcc", "apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi")


def make(project: Path, *targets: str, check: bool = True, **variables: str) -> subprocess.CompletedProcess:
    cmd = ["make", "-s", "--no-print-directory", "-C", str(project), *targets,
           *(f"{k}={v}" for k, v in variables.items())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def fp32_bundle(ge_dir, tmp_path_factory):
    from edgetailor.export.bundle import export_bundle

    return export_bundle(ge_dir, tmp_path_factory.mktemp("fw-fp32") / "bundle", formats=["onnx"],
                         replay_size=REPLAY, make_zip=False)


@pytest.fixture(scope="module")
def int8_bundle(ge_dir, tmp_path_factory):
    """`server compress` int8 (ONNX only), then a bundle of it."""
    from edgetailor.app.compress import compress
    from edgetailor.export.bundle import export_bundle
    from edgetailor.server_side.compress.recipe import load_compress_recipe

    work = tmp_path_factory.mktemp("fw-int8")
    recipe = work / "int8-onnx.toml"
    recipe.write_text('[[stage]]\nkind = "quantize"\nweight_bits = 8\nrounding = "nearest"\n'
                      'calibration_samples = 256\n\n[export]\nformats = ["onnx"]\n')
    compress(ge_dir, load_compress_recipe(str(recipe)), work / "ge", n_users=0)
    return export_bundle(work / "ge", work / "bundle", formats=["onnx"], replay_size=REPLAY, make_zip=False)


def project_for(bundle: Path, out: Path) -> Path:
    from edgetailor.export.firmware import export_firmware

    if not out.exists():
        export_firmware(bundle, out)
    return out


@pytest.fixture(scope="module")
def fp32_project(fp32_bundle, tmp_path_factory):
    return project_for(fp32_bundle, tmp_path_factory.mktemp("fw-project") / "fp32")


@pytest.fixture(scope="module")
def int8_project(int8_bundle, tmp_path_factory):
    return project_for(int8_bundle, tmp_path_factory.mktemp("fw-project") / "int8")


@pytest.fixture(scope="module")
def samples(user, fp32_bundle, tmp_path_factory):
    """Three samples of each label to personalize on, the user's 150 test samples to evaluate (both bundles
    share GE's preprocessing)."""
    out = tmp_path_factory.mktemp("fw-samples")
    pick = np.concatenate([np.flatnonzero(user.train.labels == c)[:3] for c in range(10)])
    train_x, train_y = user.train.images[pick], user.train.labels[pick]
    return {"train": parity.write_samples(out / "train.etsm", fp32_bundle, train_x, train_y),
            "test": parity.write_samples(out / "test.etsm", fp32_bundle, user.test.images, user.test.labels),
            "train_x": train_x, "train_y": train_y, "test_x": user.test.images, "test_y": user.test.labels}


def reference(bundle: Path, samples: dict) -> dict:
    return parity.python_reference(bundle, samples["train_x"], samples["train_y"], samples["test_x"], QUICK)


# ------------------------------------------------------------------ the library alone

def test_rng_matches_numpy(tmp_path):
    """PCG64, SeedSequence, uniform, Lemire integers and permutation: NumPy's streams, draw for draw."""
    need_cc()
    src = ROOT / "firmware_examples" / "libedgetailor"
    exe = tmp_path / "rng_streams"
    subprocess.run(["cc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{src / 'include'}",
                    str(src / "tests" / "rng_streams.c"), str(src / "src" / "et_rng.c"), str(src / "src" / "et_util.c"),
                    "-o", str(exe)], check=True)
    for seed in (0, 7, 2**40 + 3, 2**64 - 1):
        got = subprocess.run([str(exe), str(seed)], capture_output=True, text=True, check=True).stdout.split()
        rng = np.random.default_rng(seed)
        want = ([f"{v:.17g}" for v in rng.uniform(-6, 6, 5)] + [str(v) for v in rng.integers(0, 300, 7)]
                + [str(v) for v in rng.permutation(37)] + [str(v) for v in rng.integers(0, 2**31, 5)]
                + [f"{v:.17g}" for v in rng.uniform(0.95, 1.05, 3)])
        assert got == want, f"seed {seed}"


def test_library_checks_under_sanitizers(fp32_project):
    """Bad sample files, cut and failing storage, arenas too small, broken models: each its error code (make check)."""
    need_cc()
    proc = make(fp32_project, "check")
    assert re.search(r"all \d+ checks passed", proc.stdout), proc.stdout


def test_lint(fp32_project):
    need("cppcheck", "apt-get install cppcheck")
    make(fp32_project, "lint")


# ------------------------------------------------------------------ host against Python

def test_fp32_host_matches_python(fp32_project, fp32_bundle, samples, tmp_path):
    need_cc()
    make(fp32_project, "host")
    c = parity.run_example(fp32_project, samples["train"], samples["test"], tmp_path, options=QUICK_ARGS)
    py = reference(fp32_bundle, samples)
    figures = parity.compare(py, c, samples["test_y"])
    assert figures["logits_max_abs_diff"] <= 1e-4, figures
    assert figures["ge_top1_agreement"] == 1.0, figures
    assert figures["agreement"] >= 0.95, figures
    assert figures["threshold_gap"] <= 0.02, figures
    assert c["le_steps"] == py["le_steps"] and c["n"] == 150 and c["n_train"] == 30
    assert c["experts"]["GE"] + c["experts"]["LE"] == 150
    assert c["accuracy_after"] > c["accuracy_before"], c   # user 2 is one GE reads poorly


def test_int8_host_matches_python(int8_project, int8_bundle, samples, tmp_path):
    """The int8 kernels run the compressed GE's own integers: the same answers as ONNX Runtime's int8 GE
    (the benchmark shows its logits equal to the bit here)."""
    need_cc()
    make(int8_project, "host")
    c = parity.run_example(int8_project, samples["train"], samples["test"], tmp_path, options=QUICK_ARGS)
    py = reference(int8_bundle, samples)
    figures = parity.compare(py, c, samples["test_y"])
    assert json.loads((int8_project / "model" / "model.json").read_text())["quantized"] is True
    assert figures["ge_top1_agreement"] >= 0.99, figures
    assert figures["agreement"] >= 0.95, figures
    assert c["quantized"] is True


def test_sanitized_example_refuses_bad_input(fp32_project, samples, tmp_path):
    """ASan + UBSan build: wrong magic, a truncated file, a label out of range, a missing file; then a real run."""
    need_cc()
    make(fp32_project, "sanitize")
    exe = fp32_project / "example-host-asan"
    good = samples["train"].read_bytes()
    cases = {"magic": b"XXXX" + good[4:], "size": good[:-7], "label": None, "missing": None}
    records = bytearray(good)
    records[24] = 12   # the first sample's label, past the bundle's ten
    import zlib
    records[16:20] = zlib.crc32(bytes(records[24:])).to_bytes(4, "little")
    cases["label"] = bytes(records)
    for what, data in cases.items():
        path = tmp_path / f"{what}.etsm"
        if data is not None:
            path.write_bytes(data)
        proc = subprocess.run([str(exe), str(path), str(samples["test"]), "--quiet"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 1, (what, proc.stderr)
        assert "runtime error" not in proc.stderr and "AddressSanitizer" not in proc.stderr, proc.stderr
        assert {"magic": "magic", "size": "size", "label": "label", "missing": "cannot open"}[what] in proc.stderr
    proc = subprocess.run([str(exe), str(samples["train"]), str(samples["test"]), "--quiet", "--le-epochs", "2",
                           "--gn-steps", "10"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0 and "runtime error" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["n"] == 150


# ------------------------------------------------------------------ Cortex-M4

def test_cortex_m4_image_fits_the_budget_and_matches_host(int8_project, samples, tmp_path):
    """The int8 image links within 128 KB of flash and 64 KB of RAM, and under QEMU answers as the host build."""
    need_cc()
    need_arm()
    need("qemu-system-arm", "apt-get install qemu-system-arm")
    make(int8_project, "host")
    make(int8_project, "cortex-m4", FLASH_KB="128", RAM_KB="64")
    host = parity.run_example(int8_project, samples["train"], samples["test"], tmp_path / "host", options=QUICK_ARGS)
    board = parity.run_example(int8_project, samples["train"], samples["test"], tmp_path / "qemu", qemu=True,
                               options=QUICK_ARGS)
    assert board["platform"] == "cortex-m4" and host["platform"] == "host"
    assert np.array_equal(board["dump"]["ge_logits"], host["dump"]["ge_logits"])   # the same integers
    assert (board["dump"]["after"] == host["dump"]["after"]).mean() >= 0.98
    assert abs(board["accuracy_after"] - host["accuracy_after"]) <= 0.02
    assert board["static_ram_bytes"] + board["stack_peak_bytes"] <= 64 * 1024, board
    assert board["instructions"]["per_inference_ge"] > 100_000 and board["instructions"]["personalize"] > 0


def test_cortex_m4_link_fails_over_budget(fp32_project):
    """An fp32 LeNet-5 (247 KB of weights) does not fit 128 KB: the link says so instead of building."""
    need_arm()
    proc = make(fp32_project, "cortex-m4", check=False, FLASH_KB="128")
    assert proc.returncode != 0
    assert "flash" in (proc.stdout + proc.stderr).lower()
