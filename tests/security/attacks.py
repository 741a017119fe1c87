"""The attacks a device must refuse, each a real bundle on disk built from a
genuine one: the TUF-style list (tamper, truncation, rollback, expiry,
mix-and-match, wrong key, revoked key, replayed key set) plus unsafe paths and
resource bombs. ``tests/security/test_bundle_attacks.py`` runs each one, and
``benchmarks/security.py`` counts them.

Every attack starts from a device state that pinned the publisher's key and
accepted version 10 of the bundle: the state a deployed device is in.
"""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from edgetailor.toolkit.bundle import sign_bundle, write_manifest, zip_bundle
from edgetailor.toolkit.manifest import Manifest
from edgetailor.toolkit.signing import PUBLIC_KEY, generate_key, load_signing_key, rotate_key, sign_bundle_dir

NAME = "edgetailor-digits"


class Lab:
    """A publisher (keys, a genuine bundle to start from) and a device state to attack."""

    def __init__(self, root: Path, genuine: Path):
        self.root, self.genuine = Path(root), Path(genuine)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = self.root / "k1"
        self.evil = self.root / "evil"
        generate_key(self.key)
        generate_key(self.evil)
        self.count = 0
        self.base_state = self.root / "base-state"
        v10 = self.publish(10)
        self.open(v10, self.base_state, trusted_keys=self.key / PUBLIC_KEY)

    def publish(self, version: int, key: Path | None = None, edit: Callable[[Path], None] | None = None,
                expires: datetime | None = None, name: str = NAME, signed: bool = True) -> Path:
        """A copy of the genuine bundle, edited by ``edit`` before signing, signed by ``key`` (default the
        publisher's) as ``name`` version ``version``."""
        self.count += 1
        out = self.root / f"bundle{self.count}-v{version}"
        shutil.copytree(self.genuine, out)
        (out / "signature.json").unlink(missing_ok=True)
        if edit:
            edit(out)
            manifest = Manifest.from_json((out / "manifest.json").read_text())
            write_manifest(out, manifest)     # as export does: the edited files are what the publisher ships
        if signed:
            sign_bundle(out, key or self.key, name=name, version=version, expires=expires)
        return out

    def fresh_state(self) -> Path:
        self.count += 1
        state = self.root / f"state{self.count}"
        shutil.copytree(self.base_state, state)
        return state

    @staticmethod
    def open(bundle: Path, state: Path, **kwargs) -> str:
        """"accepted", or the first line of the refusal. Any exception that is not the project's fails."""
        from edgetailor.device.runtime import DeviceRuntime
        from edgetailor.toolkit.errors import EdgetailorError

        try:
            with DeviceRuntime.open(bundle, state, "ort", **kwargs):
                return "accepted"
        except EdgetailorError as exc:
            return "refused: " + str(exc).splitlines()[0]


# ------------------------------------------------------------------ edits
def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def rehash(bundle: Path, name: str) -> None:
    """What an attacker who can write the bundle does after editing a file: fix its hash and size."""
    from edgetailor.toolkit.bundle import sha256_file

    def change(data: dict) -> None:
        data["files"][name] = sha256_file(bundle / name)
        data.setdefault("sizes", {})[name] = (bundle / name).stat().st_size
        for entry in data["formats"].values():
            if name in entry["files"]:
                entry["files"][name] = data["files"][name]
    edit_manifest(bundle, change)


def ge_file(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["global_expert"]["files"]["onnx"]


def make_zip(bundle: Path) -> Path:
    return zip_bundle(bundle, bundle.with_name(bundle.name + ".zip"))


def zip_with(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info, data in members:
            archive.writestr(info, data)
    return path


def zip_members(bundle: Path) -> list[tuple[str, bytes]]:
    return [(p.relative_to(bundle).as_posix(), p.read_bytes()) for p in sorted(bundle.rglob("*")) if p.is_file()]


# ---------------------------------------------------------------- attacks
@dataclass
class Attack:
    name: str
    what: str
    run: Callable[[Lab], str]      # the outcome: "accepted" or "refused: ..."


def _tampered(lab: Lab) -> str:
    bundle = lab.publish(11)
    flip_byte(bundle / ge_file(bundle))
    return lab.open(bundle, lab.fresh_state())


def _tampered_zip(lab: Lab) -> str:
    bundle = lab.publish(11)
    flip_byte(bundle / ge_file(bundle))
    return lab.open(make_zip(bundle), lab.fresh_state())


def _rehashed(lab: Lab) -> str:
    bundle = lab.publish(11)
    flip_byte(bundle / ge_file(bundle))
    rehash(bundle, ge_file(bundle))
    return lab.open(bundle, lab.fresh_state())


def _edited_field(lab: Lab) -> str:
    bundle = lab.publish(11)
    edit_manifest(bundle, lambda d: d["input"].update(mean=0.9))
    return lab.open(bundle, lab.fresh_state())


def _unsigned(lab: Lab) -> str:
    return lab.open(lab.publish(11, signed=False), lab.fresh_state())


def _stripped(lab: Lab) -> str:
    bundle = lab.publish(11)
    (bundle / "signature.json").unlink()
    return lab.open(bundle, lab.fresh_state())


def _other_signature(lab: Lab) -> str:
    one, two = lab.publish(11), lab.publish(12)
    shutil.copy(two / "signature.json", one / "signature.json")
    return lab.open(one, lab.fresh_state())


def _mix_and_match(lab: Lab) -> str:
    """Files from two genuinely signed bundles combined into one."""
    def other_weights(bundle: Path) -> None:
        path = bundle / "gn" / "initial.npy"
        np.save(path, np.load(path) + 0.5)
    one, two = lab.publish(11, edit=other_weights), lab.publish(12)
    shutil.copy(one / "gn" / "initial.npy", two / "gn" / "initial.npy")
    return lab.open(two, lab.fresh_state())


def _truncated_file(lab: Lab) -> str:
    bundle = lab.publish(11)
    path = bundle / ge_file(bundle)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return lab.open(bundle, lab.fresh_state())


def _truncated_zip(lab: Lab) -> str:
    path = make_zip(lab.publish(11))
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    return lab.open(path, lab.fresh_state())


def _rollback(lab: Lab) -> str:
    return lab.open(lab.publish(9), lab.fresh_state())


def _same_version_other_contents(lab: Lab) -> str:
    bundle = lab.publish(10, edit=lambda b: edit_manifest(b, lambda d: d["personalize"].update(max_seconds=5.0)))
    return lab.open(bundle, lab.fresh_state())


def _expired(lab: Lab) -> str:
    return lab.open(lab.publish(11, expires=datetime.now(timezone.utc) - timedelta(minutes=1)), lab.fresh_state())


def _unknown_key(lab: Lab) -> str:
    return lab.open(lab.publish(11, key=lab.evil), lab.fresh_state())


def _endorsed_by_untrusted(lab: Lab) -> str:
    """An attacker's key 'rotated' from another attacker key: the endorsement is genuine but its issuer is not
    trusted."""
    rotated = lab.root / f"evil-rotated{lab.count}"
    rotate_key(lab.evil, rotated)
    return lab.open(lab.publish(11, key=rotated), lab.fresh_state())


def _forged_endorsement(lab: Lab) -> str:
    """The publisher's endorsement of its new key, re-pointed at the attacker's key."""
    good = lab.root / f"k2-{lab.count}"
    rotate_key(lab.key, good)
    statements = json.loads((good / "statements.json").read_text())
    evil_pub = (lab.evil / PUBLIC_KEY).read_bytes()
    from edgetailor.toolkit.signing import parse_public_key

    evil = parse_public_key(evil_pub, "evil")
    import base64

    statements["statements"][-1]["statement"].update(key=base64.b64encode(evil.raw).decode(), keyid=evil.id)
    forged = lab.root / f"evil-forged{lab.count}"
    shutil.copytree(lab.evil, forged)
    (forged / "statements.json").write_text(json.dumps(statements))
    bundle = lab.publish(11, key=lab.evil)
    sign_bundle_dir(bundle, load_signing_key(forged))    # export would refuse to carry a forged statement
    return lab.open(bundle, lab.fresh_state())


def _revoked_key(lab: Lab) -> str:
    """The publisher rotates to k2 and revokes k1; the device sees that; then a k1-signed bundle arrives."""
    state = lab.fresh_state()
    new = lab.root / f"k2-{lab.count}"
    rotate_key(lab.key, new, revoke_old=True)
    first = lab.open(lab.publish(11, key=new), state)
    if first != "accepted":
        return f"genuine rotated bundle {first}"
    return lab.open(lab.publish(12, key=lab.key), state)


def _replayed_key_set(lab: Lab) -> str:
    """After k1 is revoked, a bundle signed by k1 that carries the key set from before the revocation
    (k1 endorsing k2, no revocation) and a newer version."""
    state = lab.fresh_state()
    old_set = lab.root / f"k2-old-{lab.count}"
    rotate_key(lab.key, old_set)
    replay_signer = lab.root / f"k1-replay-{lab.count}"
    shutil.copytree(lab.key, replay_signer)
    shutil.copy(old_set / "statements.json", replay_signer / "statements.json")
    new = lab.root / f"k2-{lab.count}"
    rotate_key(lab.key, new, revoke_old=True)
    first = lab.open(lab.publish(11, key=new), state)
    if first != "accepted":
        return f"genuine rotated bundle {first}"
    return lab.open(lab.publish(13, key=replay_signer), state)


def _absolute_path(lab: Lab) -> str:
    def point_away(bundle: Path) -> None:
        ge = ge_file(bundle)
        outside = lab.root / f"outside{lab.count}.onnx"
        shutil.copy(bundle / ge, outside)

        def change(d: dict) -> None:
            d["global_expert"]["files"]["onnx"] = str(outside)
            d["files"][str(outside)] = d["files"][ge]
            d["formats"]["onnx"]["files"][str(outside)] = d["files"][ge]
        edit_manifest(bundle, change)
    bundle = lab.publish(11)
    point_away(bundle)
    sign_bundle_dir(bundle, load_signing_key(lab.key))   # signed by the trusted key: the path check must refuse it
    return lab.open(bundle, lab.fresh_state())


def _dotdot_member(lab: Lab) -> str:
    bundle = lab.publish(11)
    path = zip_with(lab.root / f"slip{lab.count}.zip", [*zip_members(bundle), ("../escaped.txt", b"x")])
    return lab.open(path, lab.fresh_state())


def _symlink_member(lab: Lab) -> str:
    bundle = lab.publish(11)
    link = zipfile.ZipInfo("le/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    path = zip_with(lab.root / f"link{lab.count}.zip", [*zip_members(bundle), (link, b"/etc/passwd")])
    return lab.open(path, lab.fresh_state())


def _symlink_file(lab: Lab) -> str:
    bundle = lab.publish(11)
    ge = bundle / ge_file(bundle)
    real = lab.root / f"real{lab.count}.onnx"
    shutil.move(ge, real)
    ge.symlink_to(real)
    return lab.open(bundle, lab.fresh_state())


def _duplicate_member(lab: Lab) -> str:
    bundle = lab.publish(11)
    members = zip_members(bundle)
    evil_manifest = (bundle / "manifest.json").read_bytes().replace(b'"mean"', b'"mean" ')
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # zipfile warns about the duplicate name: that is the attack
        path = zip_with(lab.root / f"dup{lab.count}.zip", [*members, ("manifest.json", evil_manifest)])
    return lab.open(path, lab.fresh_state())


def _zip_bomb(lab: Lab) -> str:
    """A member that inflates 64 MiB from a few kB (the test keeps it small; the benchmark uses 1 GiB)."""
    return lab.open(zip_bomb(lab.root / f"bomb{lab.count}.zip", lab.publish(11), 64 << 20), lab.fresh_state())


def _manifest_bomb(lab: Lab) -> str:
    bundle = lab.publish(11)
    members = [(n, d) for n, d in zip_members(bundle) if n != "manifest.json"]
    padded = b"{" + b" " * (16 << 20) + (bundle / "manifest.json").read_bytes()[1:]
    return lab.open(zip_with(lab.root / f"mbomb{lab.count}.zip", [("manifest.json", padded), *members]),
                    lab.fresh_state())


def _deep_manifest(lab: Lab) -> str:
    bundle = lab.publish(11, signed=False)    # unsigned, so that the parser meets it (a signature is checked first)
    (bundle / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    return lab.open(bundle, lab.fresh_state())


def _damaged_state(lab: Lab) -> str:
    """The state's database damaged (its header overwritten) so that it cannot say which keys it trusts; an
    answering command falls back to an in-memory state, which must stay locked."""
    state = lab.fresh_state()
    with open(state / "state.sqlite", "r+b") as handle:
        handle.write(b"\xff" * 100)
    return lab.open(lab.publish(11, signed=False), state, read_only=True)


def zip_bomb(path: Path, bundle: Path, size: int) -> Path:
    """The bundle's members plus one that inflates to ``size`` bytes of zeros, written in chunks."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in zip_members(bundle):
            archive.writestr(name, data)
        with archive.open("le/padding.bin", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(size >> 20):
                member.write(chunk)
    return path


ATTACKS = [
    Attack("unsigned", "an unsigned bundle on a device that pins a key", _unsigned),
    Attack("tampered file", "a byte of GE changed after signing", _tampered),
    Attack("tampered file (zip)", "the same, as a .zip", _tampered_zip),
    Attack("re-hashed file", "GE changed and its sha256 and size fixed in the manifest", _rehashed),
    Attack("edited field", "input.mean changed in the signed manifest", _edited_field),
    Attack("stripped signature", "signature.json deleted from a signed bundle", _stripped),
    Attack("signature of another bundle", "a genuine signature.json from another version", _other_signature),
    Attack("mix and match", "a file from another genuinely signed bundle swapped in", _mix_and_match),
    Attack("truncated file", "GE cut in half", _truncated_file),
    Attack("truncated zip", "the .zip cut at 60 %", _truncated_zip),
    Attack("rollback", "a genuine, older version (9 after 10)", _rollback),
    Attack("same version, other contents", "version 10 again, signed, with other settings",
           _same_version_other_contents),
    Attack("expired", "a genuine bundle past its expiry", _expired),
    Attack("unknown key", "signed by a key the device never trusted", _unknown_key),
    Attack("endorsed by an untrusted key", "a key rotation issued by the attacker's own key", _endorsed_by_untrusted),
    Attack("forged endorsement", "the publisher's endorsement re-pointed at the attacker's key", _forged_endorsement),
    Attack("revoked key", "signed by the key the publisher revoked", _revoked_key),
    Attack("replayed key set", "the revoked key with the key set from before its revocation", _replayed_key_set),
    Attack("damaged state", "the state's database damaged, then an unsigned bundle", _damaged_state),
    Attack("absolute path", "the manifest points GE at a file outside the bundle", _absolute_path),
    Attack("zip slip", "a member named ../escaped.txt", _dotdot_member),
    Attack("symlink member", "a zip member that is a symbolic link", _symlink_member),
    Attack("symlink file", "GE in a bundle directory is a symbolic link", _symlink_file),
    Attack("duplicate member", "a second manifest.json in the zip", _duplicate_member),
    Attack("zip bomb", "a member that inflates 64 MiB from kilobytes", _zip_bomb),
    Attack("manifest bomb", "a 16 MiB manifest", _manifest_bomb),
    Attack("deep JSON", "a manifest nested 100,000 deep", _deep_manifest),
]


def genuine_update_after_rotation(lab: Lab) -> str:
    """Not an attack: the publisher rotates keys and ships version 11 with the new key. Must be accepted."""
    new = lab.root / f"k2-genuine-{lab.count}"
    rotate_key(lab.key, new)
    return lab.open(lab.publish(11, key=new), lab.fresh_state())
