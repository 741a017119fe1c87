"""Which bundles this device runs: the keys it trusts, the keys it revoked, and
the newest version of each bundle it accepted, all remembered in the state.

Trust is pinned, never guessed: ``--trusted-keys`` (or ``trusted_keys=`` in the
API) stores public keys in the state, and from then on the state refuses any
bundle that none of its trusted keys signed, however it got there: unsigned,
tampered, re-hashed, assembled from two signed bundles, or signed by an
unknown or revoked key. A state that has never been given a key runs unsigned
bundles, and says so on every command.

Keys change over time through signed statements that bundles carry (see
``toolkit.signing``): a trusted key may endorse a new key (rotation) or revoke
one. Revocation is for good: a revoked key's signatures and statements are
refused from then on, so replaying an old bundle or an old key set cannot
bring it back. Statements by keys the state does not trust are ignored.

Rollback: the state remembers the highest ``release.version`` it accepted for
each ``release.name`` and refuses an older one; a signed bundle with the same
version but other contents is refused too. A bundle past its
``release.expires`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edgetailor.device.store import StateStore
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.errors import TrustError
from edgetailor.toolkit.manifest import Manifest
from edgetailor.toolkit.signing import BundleSignature, PublicKey, load_public_keys

UNSIGNED_WARNING = ("this bundle is not signed, and the state trusts no key, so anyone who can write the bundle "
                    "decides what runs; pin your publisher's key with --trusted-keys KEY.pub to refuse unsigned "
                    "bundles from now on")


def read_trusted_keys(paths: str | Path | list[str | Path] | tuple | None) -> list[PublicKey]:
    """Public keys from ``.pub`` files or folders of them."""
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return [key for path in paths for key in load_public_keys(path)]


@dataclass
class TrustPolicy:
    """The ``TrustCheck`` a state gives ``Bundle.open``: decides before anything is unpacked."""

    store: StateStore
    pinned: list[PublicKey] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    now: datetime | None = None          # tests move the clock

    def __post_init__(self) -> None:
        self.trusted: dict[str, bytes] = self.store.trusted_keys()
        self.revoked: set[str] = self.store.revoked_keys()
        for key in self.pinned:
            if key.id not in self.trusted:
                self.trusted[key.id] = key.raw
                self._persist(self.store.trust_key, key.id, key.raw, "pinned")

    def _persist(self, write, *args) -> None:
        """Remember it in the state; a read-only state (full disk, read-only medium) keeps it for this run only."""
        if self.store.read_only:
            return
        write(*args)

    @property
    def locked(self) -> bool:
        """Whether the state has ever trusted a key: then only signed bundles open."""
        return bool(self.trusted) or self.store.get_meta("trust_pinned") == "1"

    def __call__(self, manifest: Manifest, signature: BundleSignature | None, source: Path) -> None:
        if signature is not None:
            self._learn(signature)
        if self.locked:
            self._check_signer(signature, source)
        elif signature is None:
            self.warnings.append(f"{source}: {UNSIGNED_WARNING}")
        else:
            self.warnings.append(f"{source} is signed by key {signature.signer_id[:16]}, but this state trusts no "
                                 "key, so the signature protects nothing; pin the key with --trusted-keys")
        self._check_release(manifest, signature, source)

    def _learn(self, signature: BundleSignature) -> None:
        """Apply the statements that trusted, unrevoked keys made, until nothing changes (chains of rotations).
        In each round revocations go first, so that no statement order lets a revoked key endorse one more key.

        A revocation does not reach keys the revoked key endorsed earlier: in a
        rotation the old key endorses the new one and is then revoked, and the
        new key must stay. A publisher whose key was stolen revokes the keys
        the thief endorsed as well (``edgetailor keys revoke``)."""
        changed = True
        while changed:
            changed = False
            for kind in ("revoke", "endorse"):
                for statement in signature.statements:
                    if (statement.kind != kind or statement.issuer not in self.trusted
                            or statement.issuer in self.revoked):
                        continue
                    if kind == "revoke" and statement.subject not in self.revoked:
                        self.revoked.add(statement.subject)
                        self._persist(self.store.revoke_key, statement.subject, statement.issuer)
                        changed = True
                    elif (kind == "endorse" and statement.subject not in self.trusted
                          and statement.subject not in self.revoked):
                        self.trusted[statement.subject] = statement.key.raw
                        self._persist(self.store.trust_key, statement.subject, statement.key.raw,
                                      f"endorsed by {statement.issuer}")
                        changed = True

    def _check_signer(self, signature: BundleSignature | None, source: Path) -> None:
        ids = (", ".join(k[:16] for k in self.trusted if k not in self.revoked)
               or ("none left: all revoked" if self.trusted else "none it can read now; pass --trusted-keys"))
        if signature is None:
            raise TrustError(f"{source} is not signed, and this state only runs bundles signed by a key it trusts "
                             f"({ids})", hint="ask the publisher for the signed bundle (`edgetailor export bundle "
                                              "--signing-key KEY`)")
        signer = signature.signer_id
        if signer in self.revoked:
            raise TrustError(f"{source} is signed by key {signer[:16]}, which has been revoked",
                             hint="a revoked key stays revoked; get a bundle signed by a current key")
        if signer not in self.trusted:
            raise TrustError(f"{source} is signed by key {signer[:16]}, which this state does not trust "
                             f"(trusted: {ids})",
                             hint="if the publisher rotated keys, the bundle must carry the endorsement by the old "
                                  "key (`edgetailor keys rotate`); or pin the new key with --trusted-keys")

    def _check_release(self, manifest: Manifest, signature: BundleSignature | None, source: Path) -> None:
        release = manifest.release
        if release is None:
            if signature is not None and self.locked:
                raise TrustError(f"{source} is signed but names no release (name and version), so this state "
                                 "cannot tell it from an older one", hint="re-sign it with `edgetailor export sign "
                                                                           "--version N`")
            return
        if release.expired(self.now or datetime.now(timezone.utc)):
            raise TrustError(f"{source} ({release.name} version {release.version}) expired at {release.expires}",
                             hint="get the current bundle from its publisher")
        accepted = self.store.accepted_release(release.name)
        if accepted is None:
            return
        version, _ = accepted
        if release.version < version:
            raise TrustError(f"{source} is {release.name} version {release.version}, older than version {version} "
                             "which this state already accepted (a rollback)",
                             hint="use the newer bundle; a state never goes back to an older version")

    def accept(self, bundle: Bundle) -> None:
        """After every file checked out: remember the version (and refuse same-version, other-contents twins)."""
        release = bundle.manifest.release
        if release is None:
            return
        accepted = self.store.accepted_release(release.name)
        if (accepted is not None and accepted[0] == release.version and accepted[1] != bundle.manifest_digest
                and bundle.signature is not None):
            raise TrustError(f"{bundle.source} claims to be {release.name} version {release.version}, but this state "
                             "accepted a different bundle under that version",
                             hint="a publisher never reuses a version; get the bundle from its publisher again")
        self._persist(self.store.accept_release, release.name, release.version, bundle.manifest_digest)
