"""The state never locks the user out and never loses a sample: damaged rows
and pages, a full disk, a read-only folder, a killed process, concurrent
processes. Each test runs the real device (SQLite on disk, the CLI in its own
process where a user would run it)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgetailor.device import DeviceRuntime
from edgetailor.device.store import DB_NAME, repair_state
from edgetailor.toolkit.loaders import save_npz
from tests.conftest import ROOT, run_cli
from tests.security.state_moments import concurrent_personalizes, kill_at

FAST = {"le_epochs": 5, "gn_steps": 20}


@pytest.fixture(scope="module")
def personalized(bundle_dir, user, tmp_path_factory):
    """A state with the user's 100 samples and a personalization of them."""
    state = tmp_path_factory.mktemp("personalized") / "state"
    with DeviceRuntime.open(bundle_dir, state) as rt:
        rt.add_dataset(user.train)
        rt.personalize(FAST)
    return state


@pytest.fixture
def state(personalized, tmp_path):
    copy = tmp_path / "state"
    shutil.copytree(personalized, copy)
    return copy


@pytest.fixture(scope="module")
def samples_npz(user, tmp_path_factory):
    path = tmp_path_factory.mktemp("npz") / "test.npz"
    save_npz(user.test, path)
    return path


def _db(state) -> sqlite3.Connection:
    return sqlite3.connect(state / DB_NAME, isolation_level=None)


def test_damaged_personalization_falls_back_to_ge_and_every_command_works(bundle_dir, state, samples_npz, user):
    _db(state).execute("UPDATE personalizations SET le_model = zeroblob(length(le_model))")
    proc = run_cli("device", "evaluate", "--bundle", str(bundle_dir), "--state", str(state), "--samples",
                   str(samples_npz))
    assert "GE only" in proc.stdout and "damaged" in proc.stderr, proc.stderr
    with DeviceRuntime.open(bundle_dir, state) as rt:
        assert not rt.personalized and "damaged" in rt.personalization_problem
        assert rt.sample_count() == 100
        rt.personalize(FAST)                      # personalizing again replaces it
        assert rt.personalized
    _db(state).execute("UPDATE personalizations SET gn_model = x'00'")
    run_cli("device", "reset", "--bundle", str(bundle_dir), "--state", str(state))
    with DeviceRuntime.open(bundle_dir, state) as rt:
        assert not rt.personalized and rt.personalization_problem is None and rt.sample_count() == 100


def test_damaged_sample_rows_are_skipped_and_repair_drops_only_them(bundle_dir, state):
    _db(state).execute("UPDATE samples SET image = zeroblob(784) WHERE id IN (3, 7)")
    with DeviceRuntime.open(bundle_dir, state) as rt:
        report = rt.personalize(FAST)
    assert report["damaged_samples_skipped"] == 2 and report["n_samples"] == 98
    result = repair_state(state)
    assert (result.samples_kept, result.samples_lost) == (98, 2) and result.backup.exists()
    with DeviceRuntime.open(bundle_dir, state) as rt:
        assert rt.sample_count() == 98 and rt.personalized


def _damage_pages(path, first: int, count: int) -> None:
    """Overwrite whole database pages with noise, as a failing flash chip would."""
    page = 4096
    noise = np.random.default_rng(0).integers(0, 256, page * count, dtype=np.uint8).tobytes()
    with open(path, "r+b") as handle:
        handle.seek(first * page)
        handle.write(noise)


def test_page_damage_never_locks_the_user_out(bundle_dir, state, samples_npz):
    pages = _db(state).execute("PRAGMA page_count").fetchone()[0]
    _damage_pages(state / DB_NAME, pages // 3, 2)
    # answering commands still answer (GE alone if need be), and say why
    proc = run_cli("device", "evaluate", "--bundle", str(bundle_dir), "--state", str(state), "--samples",
                   str(samples_npz), "--json")
    assert json.loads(proc.stdout)["accuracy"] > 0.5
    run_cli("device", "predict", "--bundle", str(bundle_dir), "--state", str(state), "--samples", str(samples_npz))
    # reset repairs the state first and keeps every readable sample
    proc = run_cli("device", "reset", "--bundle", str(bundle_dir), "--state", str(state))
    kept = int(proc.stdout.split(" samples kept")[0].rsplit(" ", 1)[-1])
    assert 80 <= kept <= 100, proc.stdout
    with DeviceRuntime.open(bundle_dir, state) as rt:
        assert rt.sample_count() == kept and not rt.personalized
        assert rt.store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_repair_command_salvages_a_damaged_database(bundle_dir, state):
    pages = _db(state).execute("PRAGMA page_count").fetchone()[0]
    _damage_pages(state / DB_NAME, pages // 2, 1)
    proc = run_cli("device", "repair", "--state", str(state))
    assert "samples" in proc.stdout and "damaged database is kept" in proc.stdout
    with DeviceRuntime.open(bundle_dir, state) as rt:
        assert rt.sample_count() >= 90


def test_samples_changed_while_training_are_trained_on_again(bundle_dir, user, tmp_path):
    """Compare-and-swap: another process adds samples while this one trains; the stale model is never committed."""
    state = tmp_path / "state"
    with DeviceRuntime.open(bundle_dir, state) as rt:
        rt.add_dataset(user.train.subset(np.flatnonzero(user.train.labels < 5)))
        added = []

        def other_process_adds(stage, done, total):
            if not added:
                added.append(True)
                with DeviceRuntime.open(bundle_dir, state) as other:
                    other.add_dataset(user.train)
        report = rt.personalize(FAST, other_process_adds)
        assert report["attempts"] == 2 and report["n_samples"] == 100
        saved = rt.store.active_personalization()
        assert saved.samples_generation == rt.store.samples_generation() and saved.n_samples == 100


def test_concurrent_personalizes_all_succeed_and_the_newest_samples_win(bundle_dir, user, tmp_path):
    result = concurrent_personalizes(bundle_dir, tmp_path, user.train, processes=3, epochs=5)
    assert result["errors"] == [], result["errors"]
    assert result["newest_samples_won"], result


def _full_disk():
    """This process may not grow any file: what a full disk looks like to SQLite and to every writer."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_answers_on_a_full_disk_and_refuses_to_store_clearly(bundle_dir, state, samples_npz):
    zipped = bundle_dir.with_name(bundle_dir.name + ".zip")
    run_cli("device", "evaluate", "--bundle", str(zipped), "--state", str(state), "--samples",
            str(samples_npz))      # the .zip is unpacked into the state's cache, as any earlier command would
    before = _db(state).execute("SELECT count(*) FROM samples").fetchone()[0]
    for bundle in (bundle_dir, zipped):
        proc = run_cli("device", "evaluate", "--bundle", str(bundle), "--state", str(state), "--samples",
                       str(samples_npz), "--json", preexec_fn=_full_disk)
        assert json.loads(proc.stdout)["n"] == len(np.load(samples_npz)["y"])
        run_cli("device", "predict", "--bundle", str(bundle), "--state", str(state), "--samples",
                str(samples_npz), preexec_fn=_full_disk)
    proc = run_cli("device", "personalize", "--bundle", str(bundle_dir), "--state", str(state), "--samples",
                   str(samples_npz), check=False, preexec_fn=_full_disk)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert _db(state).execute("SELECT count(*) FROM samples").fetchone()[0] == before


@pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "getuid"), reason="POSIX permissions")
def test_answers_from_a_read_only_state(bundle_dir, state, samples_npz):
    # Root ignores permissions, so as root the device runs as an unprivileged user, as an app would; its files
    # go where that user can read them.
    place = Path(tempfile.mkdtemp(prefix="edgetailor-ro-"))
    mounted = []
    try:
        place.chmod(0o755)
        bundle, samples, ro_state = place / "bundle", place / "test.npz", place / "state"
        shutil.copytree(bundle_dir, bundle)
        shutil.copy(samples_npz, samples)
        shutil.copytree(state, ro_state)
        for path in [place, *place.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        for path in [ro_state, *ro_state.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        preexec = None
        if os.getuid() == 0:
            view = place / "read-only-view"
            view.mkdir()
            if _mount_read_only(ro_state, view):        # a read-only medium, which root cannot write either
                mounted.append(view)
                ro_state = view
            elif _runnable_by_others():
                preexec = lambda: os.setuid(65534)  # noqa: E731
            else:
                pytest.skip("as root, needs `mount --bind` or a checkout an unprivileged user can read")
        proc = run_cli("device", "evaluate", "--bundle", str(bundle), "--state", str(ro_state), "--samples",
                       str(samples), "--json", preexec_fn=preexec, check=False)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["personalized"] is True and "read-only" in proc.stderr
    finally:
        for view in mounted:
            subprocess.run(["umount", str(view)], check=False)
        for path in [place, *place.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(place, ignore_errors=True)


def _mount_read_only(source: Path, view: Path) -> bool:
    bind = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True)
    if bind.returncode != 0:
        return False
    if subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True).returncode != 0:
        subprocess.run(["umount", str(view)], check=False)
        return False
    return True


def _runnable_by_others() -> bool:
    import stat as st

    for path in (Path(sys.executable).resolve(), ROOT / "edgetailor" / "__init__.py", Path(sys.prefix)):
        for parent in [path, *path.parents]:
            if not parent.stat().st_mode & st.S_IROTH:
                return False
            if parent.is_dir() and not parent.stat().st_mode & st.S_IXOTH:
                return False
    return True


def test_kill_at_any_moment_loses_nothing(bundle_dir, state, user, tmp_path):
    outcomes = kill_at(bundle_dir, state, user.train, tmp_path, delays=[0.2, 0.8, 1.5, 2.5, 4.0])
    for outcome in outcomes:
        assert outcome["samples_lost"] == 0, outcome
        assert outcome["personalization_ok"], outcome
    assert not list((state / "bundles").glob(".partial-*")), "a killed unpack was left behind"
