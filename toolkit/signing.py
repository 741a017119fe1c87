"""Ed25519 signatures over bundle manifests, and the signed statements that rotate and revoke keys.

A bundle's ``manifest.json`` names every file with its sha256 and size, so
one signature over the manifest covers the whole bundle. The signature lives
beside it in ``signature.json``: the signer's public key, the signature over
the manifest's exact bytes (export writes the manifest in one canonical form,
sorted keys and two-space indents, and the device parses the very bytes it
verified, so a client in any language checks the file as it is, with no JSON
re-serialisation to reproduce), and the key statements the publisher carries
along:

- an **endorsement**: key A vouches for key B (a key rotation: a device that
  trusts A learns to trust B);
- a **revocation**: key A says key C must no longer be trusted.

Each statement is itself signed by its issuer. Deciding *whether* to trust a
signer needs the device's memory of pinned and revoked keys, so it is the
device's job (``edgetailor.device.trust``); this module only checks that the
signatures are genuine. It uses ``cryptography`` (well kept, wheels for every
platform the device supports) rather than hand-written crypto.

A key is a directory: ``signing.key`` (PKCS#8 PEM, mode 0600),
``signing.pub`` (SubjectPublicKeyInfo PEM) and, after a rotation or a
revocation, ``statements.json``, which export puts into every bundle the
key signs.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgetailor.toolkit import atomic
from edgetailor.toolkit.errors import BundleError, SigningKeyError

SIGNATURE = "signature.json"
PRIVATE_KEY = "signing.key"
PUBLIC_KEY = "signing.pub"
STATEMENTS = "statements.json"
# Domain separation: a manifest signature can never be replayed as a key statement, or the reverse.
MANIFEST_CONTEXT = b"edgetailor-manifest-v1\n"
STATEMENT_CONTEXT = b"edgetailor-key-statement-v1\n"


def canonical_json(data: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def keyid(public_raw: bytes) -> str:
    """A key's name: the sha256 of its 32 raw bytes, in hex."""
    return hashlib.sha256(public_raw).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except (ValueError, TypeError):
        raise BundleError(f"{what} is not base64") from None


def _ed25519():
    from cryptography.hazmat.primitives.asymmetric import ed25519  # imported when a key is used

    return ed25519


def _raw_public(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    @property
    def id(self) -> str:
        return keyid(self.raw)

    def verify(self, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            _ed25519().Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
            return True
        except (InvalidSignature, ValueError):
            return False

    def to_pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        key = _ed25519().Ed25519PublicKey.from_public_bytes(self.raw)
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass
class SigningKey:
    """A private key, with the statements its directory carries."""

    private: Any
    path: Path
    statements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def public(self) -> PublicKey:
        return PublicKey(_raw_public(self.private.public_key()))

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


# ------------------------------------------------------------------ key files
def generate_key(out_dir: str | Path, overwrite: bool = False) -> PublicKey:
    """Write ``out_dir/signing.key`` (mode 0600) and ``signing.pub``."""
    from cryptography.hazmat.primitives import serialization

    out_dir = Path(out_dir)
    private_path = out_dir / PRIVATE_KEY
    if private_path.exists() and not overwrite:
        raise SigningKeyError(f"{private_path} already exists; refusing to overwrite a signing key",
                        hint="choose another --out, or move the old key away first (bundles it signed stay valid "
                             "only on devices that trust it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    private = _ed25519().Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    atomic.write_bytes(private_path, pem, mode=0o600)
    public = PublicKey(_raw_public(private.public_key()))
    atomic.write_text(out_dir / PUBLIC_KEY, public.to_pem())
    return public


def load_signing_key(path: str | Path) -> SigningKey:
    """A ``signing.key`` (or the directory holding it), with the directory's ``statements.json``."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    if path.is_dir():
        path = path / PRIVATE_KEY
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SigningKeyError(f"no signing key at {path}") from None
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not a readable unencrypted PEM private key: {exc}") from None
    if not isinstance(private, _ed25519().Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 key", hint="edgetailor signs with Ed25519; make one with "
                                                               "`edgetailor keys generate --out DIR`")
    statements_path = path.parent / STATEMENTS
    statements = []
    if statements_path.exists():
        try:
            statements = json.loads(statements_path.read_text())["statements"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SigningKeyError(f"{statements_path} is unreadable: {exc}",
                            hint="restore it from the key's backup, or make it again with `edgetailor keys rotate`"
                            ) from None
    return SigningKey(private, path, statements)


# An Ed25519 SubjectPublicKeyInfo is always these 12 DER bytes and then the 32-byte key (RFC 8410).
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def parse_public_key(data: bytes, where: str) -> PublicKey:
    """A PEM public key. An Ed25519 key's DER is a fixed prefix and the raw key,
    so it is read here directly: loading ``cryptography``'s serialization
    module costs 25-45 ms, which every device command that pins a key would
    pay. Anything else goes to ``cryptography`` for a precise error."""
    text = data.decode("ascii", errors="replace").strip()
    lines = text.splitlines()
    if (len(lines) >= 3 and lines[0] == "-----BEGIN PUBLIC KEY-----" and lines[-1] == "-----END PUBLIC KEY-----"):
        try:
            der = base64.b64decode("".join(lines[1:-1]), validate=True)
        except ValueError:
            der = b""
        if len(der) == 44 and der.startswith(_ED25519_SPKI_PREFIX):
            return PublicKey(der[12:])
    from cryptography.hazmat.primitives import serialization

    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{where} is not a PEM public key: {exc}",
                              hint="give the signing.pub written by `edgetailor keys generate`") from None
    if not isinstance(public, _ed25519().Ed25519PublicKey):
        raise SigningKeyError(f"{where} is not an Ed25519 public key")
    return PublicKey(_raw_public(public))


def load_public_keys(path: str | Path) -> list[PublicKey]:
    """A ``.pub`` file, or every ``*.pub`` in a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.pub"))
        if not files:
            raise SigningKeyError(f"{path} holds no .pub files", hint="give a signing.pub or a folder of them")
    elif path.is_file():
        files = [path]
    else:
        raise SigningKeyError(f"no public key at {path}", hint="give a signing.pub or a folder of them")
    keys = []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read {file}: {exc}") from None
        keys.append(parse_public_key(data, str(file)))
    return keys


# ------------------------------------------------------------- key statements
def make_statement(issuer: SigningKey, kind: str, subject: PublicKey | str) -> dict[str, Any]:
    """An endorsement (``kind="endorse"``, subject a PublicKey) or a revocation (``"revoke"``, subject a key id)."""
    if kind == "endorse":
        body = {"type": "endorse", "key": _b64(subject.raw), "keyid": subject.id}
    elif kind == "revoke":
        body = {"type": "revoke", "keyid": subject if isinstance(subject, str) else subject.id}
    else:
        raise ValueError(f"unknown statement kind {kind!r}")
    body["issued"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"statement": body, "issuer": _b64(issuer.public.raw),
            "signature": _b64(issuer.sign(STATEMENT_CONTEXT + canonical_json(body)))}


def write_statements(key_dir: Path, statements: list[dict[str, Any]]) -> None:
    atomic.write_text(key_dir / STATEMENTS, json.dumps({"statements": statements}, indent=2, sort_keys=True) + "\n")


def rotate_key(old_key_path: str | Path, out_dir: str | Path, revoke_old: bool = False) -> PublicKey:
    """A new key in ``out_dir``, endorsed by the old one (and the old one revoked, if asked):
    bundles signed by the new key carry the chain, so devices that trust the old key accept them."""
    old = load_signing_key(old_key_path)
    new_public = generate_key(out_dir)
    new = load_signing_key(out_dir)
    statements = [*old.statements, make_statement(old, "endorse", new_public)]
    if revoke_old:
        statements.append(make_statement(new, "revoke", old.public.id))
    write_statements(Path(out_dir), statements)
    return new_public


def revoke_key(signing_key_path: str | Path, revoked: PublicKey | str) -> None:
    """Add a revocation of ``revoked``, signed by this key, to the key's statements."""
    key = load_signing_key(signing_key_path)
    write_statements(key.path.parent, [*key.statements, make_statement(key, "revoke", revoked)])


@dataclass(frozen=True)
class Statement:
    """A key statement whose signature checked out."""

    kind: str            # "endorse" or "revoke"
    issuer: str          # key id
    subject: str         # key id
    key: PublicKey | None = None     # the endorsed key


def parse_statement(doc: Any, where: str) -> Statement:
    if not isinstance(doc, dict) or not isinstance(doc.get("statement"), dict):
        raise BundleError(f"{where}: a key statement is malformed")
    body = doc["statement"]
    issuer = PublicKey(_unb64(doc.get("issuer"), f"{where}: a statement's issuer"))
    try:
        message = STATEMENT_CONTEXT + canonical_json(body)
    except ValueError as exc:
        raise BundleError(f"{where}: a key statement cannot be put in canonical form: {exc}") from None
    if not issuer.verify(_unb64(doc.get("signature"), f"{where}: a statement's signature"), message):
        raise BundleError(f"{where}: a key statement's signature does not verify (it was altered)",
                          hint="get the bundle from its publisher again")
    kind = body.get("type")
    if kind == "endorse":
        key = PublicKey(_unb64(body.get("key"), f"{where}: an endorsed key"))
        if len(key.raw) != 32 or key.id != body.get("keyid"):
            raise BundleError(f"{where}: an endorsement names a key that is not the one it carries")
        return Statement("endorse", issuer.id, key.id, key)
    if kind == "revoke" and isinstance(body.get("keyid"), str):
        return Statement("revoke", issuer.id, body["keyid"])
    raise BundleError(f"{where}: unknown key statement type {kind!r}")


# --------------------------------------------------------- bundle signatures
@dataclass(frozen=True)
class BundleSignature:
    """A ``signature.json`` whose signature over the manifest checked out."""

    signer: PublicKey
    statements: tuple[Statement, ...]

    @property
    def signer_id(self) -> str:
        return self.signer.id


def signature_document(manifest_bytes: bytes, key: SigningKey) -> dict[str, Any]:
    return {"signed": "manifest.json", "public_key": _b64(key.public.raw), "keyid": key.public.id,
            "signature": _b64(key.sign(MANIFEST_CONTEXT + manifest_bytes)),
            "statements": list(key.statements)}


def sign_bundle_dir(bundle_dir: Path, key: SigningKey) -> Path:
    """Sign ``bundle_dir/manifest.json`` into ``bundle_dir/signature.json``."""
    manifest_bytes = (bundle_dir / "manifest.json").read_bytes()
    path = bundle_dir / SIGNATURE
    atomic.write_text(path, json.dumps(signature_document(manifest_bytes, key), indent=2, sort_keys=True) + "\n")
    return path


def verify_signature(manifest_bytes: bytes, doc: Any, where: str) -> BundleSignature:
    """Check ``signature.json`` against the manifest's exact bytes (the device
    then parses those same bytes), and every statement against its issuer."""
    if not isinstance(doc, dict):
        raise BundleError(f"{where} is not a JSON object")
    public = PublicKey(_unb64(doc.get("public_key"), f"{where}: public_key"))
    if len(public.raw) != 32:
        raise BundleError(f"{where}: public_key is not an Ed25519 key")
    signature = _unb64(doc.get("signature"), f"{where}: signature")
    if not public.verify(signature, MANIFEST_CONTEXT + manifest_bytes):
        raise BundleError(f"{where}: the signature does not match manifest.json: the manifest was changed after "
                          f"it was signed (or the signature belongs to another bundle)",
                          hint="do not edit a signed bundle; re-export and sign it, or get it from its publisher again")
    raw_statements = doc.get("statements", [])
    if not isinstance(raw_statements, list):
        raise BundleError(f"{where}: statements must be a list")
    return BundleSignature(public, tuple(parse_statement(s, where) for s in raw_statements))
