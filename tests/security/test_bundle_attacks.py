"""Every attack on a bundle is refused by a device that pins its publisher's
key, with an error that names the problem; a genuine update after a key
rotation is still accepted. The attacks themselves are in ``attacks.py``."""

from __future__ import annotations

import json
import stat

import pytest

from edgetailor.toolkit.signing import PUBLIC_KEY
from tests.conftest import run_cli
from tests.security.attacks import ATTACKS, Lab, genuine_update_after_rotation

# What each refusal must say (a word of it), so that a refusal for the wrong reason fails the test.
EXPECTED = {
    "unsigned": "not signed", "tampered file": "sha256", "tampered file (zip)": "sha256",
    "re-hashed file": "signature does not match", "edited field": "signature does not match",
    "stripped signature": "not signed", "signature of another bundle": "signature does not match",
    "mix and match": "sha256", "truncated file": "bytes, the manifest says", "truncated zip": "zip",
    "rollback": "rollback", "same version, other contents": "different bundle under that version",
    "expired": "expired", "unknown key": "does not trust", "endorsed by an untrusted key": "does not trust",
    "forged endorsement": "does not verify", "revoked key": "revoked", "replayed key set": "revoked",
    "damaged state": "not signed", "absolute path": "not a plain relative path",
    "zip slip": "not a plain relative path",
    "symlink member": "symbolic link", "symlink file": "symbolic link", "duplicate member": "twice",
    "zip bomb": "max_compression_ratio", "manifest bomb": "max_", "deep JSON": "max_json_depth",
}


@pytest.fixture(scope="module")
def lab(bundle_dir, tmp_path_factory):
    return Lab(tmp_path_factory.mktemp("lab"), bundle_dir)


def test_every_attack_has_its_expected_refusal():
    assert set(EXPECTED) == {a.name for a in ATTACKS}


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_refused(lab, attack):
    outcome = attack.run(lab)
    assert outcome.startswith("refused: "), f"{attack.name} ({attack.what}) was {outcome}"
    assert EXPECTED[attack.name] in outcome, outcome


def test_genuine_update_after_a_key_rotation_is_accepted(lab):
    assert genuine_update_after_rotation(lab) == "accepted"


def test_keys_and_signed_export_from_the_cli(lab, tmp_path):
    """The CLI flow a publisher and a device run: generate, sign, pin, refuse a stranger."""
    run_cli("keys", "generate", "--out", str(tmp_path / "keys"))
    private = tmp_path / "keys" / "signing.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    bundle = lab.publish(11, signed=False)
    run_cli("export", "sign", "--bundle", str(bundle), "--signing-key", str(private), "--version", "20")
    assert json.loads((bundle / "manifest.json").read_text())["release"]["version"] == 20
    state = tmp_path / "state"
    info = run_cli("device", "info", "--bundle", str(bundle), "--state", str(state), "--trusted-keys",
                   str(tmp_path / "keys" / PUBLIC_KEY), "--json")
    assert json.loads(info.stdout)["state"]["signed_by"]
    refused = run_cli("device", "info", "--bundle", str(lab.publish(21, key=lab.evil)), "--state", str(state),
                      check=False)
    assert refused.returncode == 2 and "does not trust" in refused.stderr and "Traceback" not in refused.stderr


def test_unsigned_bundle_in_a_state_without_keys_warns_on_every_command(lab, tmp_path):
    bundle = lab.publish(11, signed=False)
    proc = run_cli("device", "info", "--bundle", str(bundle), "--state", str(tmp_path / "s"))
    assert "not signed" in proc.stderr and "--trusted-keys" in proc.stderr
