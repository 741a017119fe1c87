"""The device side installs from binary wheels on the platforms edge users
have: `pip install 'edgetailor[device]'` resolves, without building anything,
for CPython 3.10-3.13 on Linux x86_64 and aarch64, macOS arm64 and Windows
x86_64 (pip's own resolver, asked from here with --platform and
--python-version), and never pulls torch or onnxruntime-training."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.conftest import ROOT

PYTHONS = ("3.10", "3.11", "3.12", "3.13")
# pip takes each acceptable platform tag explicitly; glibc 2.17-2.31 covers the
# Linux boards in use (Raspberry Pi OS / Debian 11 has 2.31, Jetson's Ubuntu 20.04 too).
LINUX = [f"manylinux_2_{minor}" for minor in range(31, 16, -1)] + ["manylinux2014"]
PLATFORMS = {
    "linux-x86_64": [f"{tag}_x86_64" for tag in LINUX],
    "linux-aarch64": [f"{tag}_aarch64" for tag in LINUX],
    "macos-arm64": [f"macosx_{major}_0_arm64" for major in range(14, 10, -1)],
    "windows-x86_64": ["win_amd64"],
}


def device_requirements(python: str) -> list[str]:
    """The base dependencies and the [device] extra, with markers evaluated
    for ``python`` (pip evaluates them for the interpreter it runs in)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    environment = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    wanted = []
    for line in [*project["dependencies"], *project["optional-dependencies"]["device"]]:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            requirement.marker = None
            wanted.append(str(requirement))
    return wanted


def resolve(platform: str, python: str, tmp: Path) -> tuple[int, str, list[str]]:
    report = tmp / f"{platform}-{python}.json"
    tags = [arg for tag in PLATFORMS[platform] for arg in ("--platform", tag)]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--only-binary=:all:", *tags,
                           "--python-version", python, "--target", str(tmp / "target"), "--quiet", "--report",
                           str(report), "--disable-pip-version-check", *device_requirements(python)],
                          capture_output=True, text=True, timeout=300)
    names = [i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]] \
        if proc.returncode == 0 else []
    return proc.returncode, proc.stderr, names


def registry_reachable(tmp: Path) -> bool:
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest",
                           str(tmp / "probe"), "--quiet", "--disable-pip-version-check", "six"],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode == 0


def test_device_requirements_are_light():
    for python in PYTHONS:
        names = [Requirement(r).name for r in device_requirements(python)]
        assert "onnxruntime" in names and "pillow" in names
        assert not {"torch", "onnxruntime-training", "executorch"} & set(names)
    assert "tomli" in [Requirement(r).name for r in device_requirements("3.10")]
    assert "tomli" not in [Requirement(r).name for r in device_requirements("3.11")]


def test_device_extra_resolves_to_wheels_everywhere(tmp_path):
    if not registry_reachable(tmp_path):
        pytest.skip("the package registry (PyPI) cannot be reached: cannot check which wheels exist")
    jobs = [(platform, python) for platform in PLATFORMS for python in PYTHONS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(jobs, pool.map(lambda job: resolve(*job, tmp_path), jobs)))
    failed = {f"{p} py{v}": err.strip().splitlines()[-3:] for (p, v), (rc, err, _) in results.items() if rc != 0}
    assert not failed, failed
    for job, (_, _, names) in results.items():
        assert "onnxruntime" in names and not {"torch", "onnxruntime-training"} & set(names), (job, names)


def test_only_the_parity_extra_pulls_onnxruntime_training():
    """onnxruntime-training and onnxruntime install the same module: no extra but its own may bring it."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, requirements in extras.items():
        names = {Requirement(r).name for r in requirements}
        if extra == "ort-training":
            assert names == {"onnxruntime-training"}
        else:
            assert "onnxruntime-training" not in names, extra
