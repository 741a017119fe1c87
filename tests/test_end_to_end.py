"""The loop a user runs, through the real CLI in fresh processes:
pretrain -> export -> personalize -> evaluate, and the demo in its fast mode."""

import json

import numpy as np

from tests.conftest import run_cli
from edgetailor.toolkit.loaders import save_npz


def test_cli_loop(tmp_path, user, generic_split):
    ge, bundle, state = tmp_path / "ge", tmp_path / "bundle", tmp_path / "state"
    out = run_cli("server", "pretrain", "--out", str(ge), "--recipe", "fast", "--epochs", "6").stdout
    assert "generic test accuracy" in out
    out = run_cli("export", "bundle", "--model", str(ge), "--out", str(bundle)).stdout
    assert "LE+GN" in out and (tmp_path / "bundle.zip").exists()
    save_npz(user.train, tmp_path / "train.npz")
    save_npz(user.test, tmp_path / "test.npz")
    zipped = str(tmp_path / "bundle.zip")

    before = json.loads(run_cli("device", "evaluate", "--bundle", zipped, "--state", str(state),
                                "--samples", str(tmp_path / "test.npz"), "--json").stdout)
    assert before["personalized"] is False and before["experts"] == {"GE": before["n"], "LE": 0}

    report = json.loads(run_cli("device", "personalize", "--bundle", zipped, "--state", str(state),
                                "--samples", str(tmp_path / "train.npz"), "--json").stdout)
    assert report["added"] == 100 and report["torch_imported"] is False

    after = json.loads(run_cli("device", "evaluate", "--bundle", zipped, "--state", str(state),
                               "--samples", str(tmp_path / "test.npz"), "--json").stdout)
    assert after["personalized"] and after["n"] == len(user.test)
    assert after["accuracy"] > before["accuracy"]
    assert after["experts"]["GE"] + after["experts"]["LE"] == after["n"]

    lines = run_cli("device", "predict", "--bundle", zipped, "--state", str(state),
                    "--samples", str(tmp_path / "test.npz")).stdout.strip().splitlines()
    assert len(lines) == len(user.test) and json.loads(lines[0])["expert"] in ("GE", "LE")


def test_cli_errors_are_clear(tmp_path, bundle_dir, user):
    proc = run_cli("device", "evaluate", "--bundle", str(tmp_path), "--state", str(tmp_path / "s"),
                   "--samples", str(tmp_path), check=False)
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "letters.npz"
    np.savez(bad, x=user.train.images[:2], y=np.array(["A", "B"]))
    proc = run_cli("device", "personalize", "--bundle", str(bundle_dir), "--state", str(tmp_path / "s2"),
                   "--samples", str(bad), check=False)
    assert proc.returncode == 2 and "'A'" in proc.stderr and "bundle knows" in proc.stderr
    proc = run_cli("server", "pretrain", "--out", str(tmp_path / "x"), "--recipe", "nope", check=False)
    assert proc.returncode == 2 and "no recipe" in proc.stderr


def test_help_explains_commands():
    out = run_cli("--help").stdout
    for command in ("server", "export", "device", "demo"):
        assert command in out
    assert "--samples" in run_cli("device", "personalize", "--help").stdout


def test_demo_fast_mode(tmp_path):
    out = run_cli("demo", "--fast", "--users", "2", "--out", str(tmp_path / "demo")).stdout
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert len(report["users"]) == 2 and (tmp_path / "demo" / "report.png").stat().st_size > 10_000
    for key in ("GE user", "GE+LE+GN user", "FT all user", "FT last user", "GE generic", "GE+LE+GN generic",
                "personalize s", "peak RSS MB"):
        assert key in report["mean"]
    assert report["overhead"]["params_pct"] < 2.5
    assert "GE+LE+GN user" in out and "mean" in out
