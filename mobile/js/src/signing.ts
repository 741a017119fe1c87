/**
 * Checking a bundle's `signature.json`, exactly as the Python runtime's
 * `toolkit/signing.py` does: Ed25519 over `edgetailor-manifest-v1\n` + the
 * manifest's exact bytes (checked before the manifest is parsed), and each
 * key statement (endorse a new key, revoke one) over
 * `edgetailor-key-statement-v1\n` + its body's canonical JSON. Whether to
 * *trust* the signer is the device's decision (`trust.ts`).
 */

import { canonicalOf } from "./json.js";
import { fromBase64, sha256Hex, verifyEd25519 } from "./crypto.js";
import { BundleError, SigningKeyError } from "./errors.js";

const encoder = new TextEncoder();
const MANIFEST_CONTEXT = encoder.encode("edgetailor-manifest-v1\n");
const STATEMENT_CONTEXT = encoder.encode("edgetailor-key-statement-v1\n");

export interface PublicKey {
  raw: Uint8Array; // 32 bytes
  id: string; // sha256 of raw, hex
}

export interface Statement {
  kind: "endorse" | "revoke";
  issuer: string;
  subject: string;
  key?: PublicKey; // the endorsed key
}

export interface BundleSignature {
  signer: PublicKey;
  statements: Statement[];
}

export async function publicKey(raw: Uint8Array): Promise<PublicKey> {
  return { raw, id: await sha256Hex(raw) };
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

// An Ed25519 SubjectPublicKeyInfo is these 12 DER bytes and then the 32-byte key (RFC 8410).
const SPKI_PREFIX = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/** A trusted key as an app holds it: the PEM text of `signing.pub`, or the raw 32 bytes. */
export async function parsePublicKey(key: string | Uint8Array, where = "a trusted key"): Promise<PublicKey> {
  if (typeof key !== "string") {
    if (key.length !== 32) throw new SigningKeyError(`${where} is ${key.length} bytes; a raw Ed25519 public key is 32`);
    return publicKey(key);
  }
  const lines = key.trim().split(/\r?\n/);
  if (lines.length < 3 || lines[0] !== "-----BEGIN PUBLIC KEY-----" || lines[lines.length - 1] !== "-----END PUBLIC KEY-----") {
    throw new SigningKeyError(`${where} is not a PEM public key (no BEGIN/END PUBLIC KEY lines)`);
  }
  let der: Uint8Array;
  try {
    der = fromBase64(lines.slice(1, -1).join(""), where);
  } catch {
    throw new SigningKeyError(`${where} is not a PEM public key (its body is not base64)`);
  }
  if (der.length !== 44 || SPKI_PREFIX.some((b, i) => der[i] !== b)) {
    throw new SigningKeyError(`${where} is not an Ed25519 public key`);
  }
  return publicKey(der.slice(12));
}

async function parseStatement(doc: unknown, where: string): Promise<Statement> {
  if (typeof doc !== "object" || doc === null || typeof (doc as { statement?: unknown }).statement !== "object"
      || (doc as { statement?: unknown }).statement === null) {
    throw new BundleError(`${where}: a key statement is malformed`);
  }
  const { statement: body, issuer: issuerText, signature } = doc as { statement: Record<string, unknown>; issuer: unknown; signature: unknown };
  const issuer = await publicKey(fromBase64(issuerText, `${where}: a statement's issuer`));
  const message = concat(STATEMENT_CONTEXT, encoder.encode(canonicalOf(body)));
  if (!(await verifyEd25519(fromBase64(signature, `${where}: a statement's signature`), message, issuer.raw))) {
    throw new BundleError(`${where}: a key statement's signature does not verify (it was altered)`,
      "get the bundle from its publisher again");
  }
  if (body.type === "endorse") {
    const key = await publicKey(fromBase64(body.key, `${where}: an endorsed key`));
    if (key.raw.length !== 32 || key.id !== body.keyid) {
      throw new BundleError(`${where}: an endorsement names a key that is not the one it carries`);
    }
    return { kind: "endorse", issuer: issuer.id, subject: key.id, key };
  }
  if (body.type === "revoke" && typeof body.keyid === "string") {
    return { kind: "revoke", issuer: issuer.id, subject: body.keyid };
  }
  throw new BundleError(`${where}: unknown key statement type ${JSON.stringify(body.type)}`);
}

/** Check `signature.json` (parsed) against the manifest's exact bytes, and every statement against its issuer. */
export async function verifySignature(manifestBytes: Uint8Array, doc: unknown, where: string): Promise<BundleSignature> {
  if (typeof doc !== "object" || doc === null || Array.isArray(doc)) throw new BundleError(`${where} is not a JSON object`);
  const fields = doc as Record<string, unknown>;
  const signer = await publicKey(fromBase64(fields.public_key, `${where}: public_key`));
  if (signer.raw.length !== 32) throw new BundleError(`${where}: public_key is not an Ed25519 key`);
  const signature = fromBase64(fields.signature, `${where}: signature`);
  if (!(await verifyEd25519(signature, concat(MANIFEST_CONTEXT, manifestBytes), signer.raw))) {
    throw new BundleError(
      `${where}: the signature does not match manifest.json: the manifest was changed after it was signed ` +
        "(or the signature belongs to another bundle)",
      "do not edit a signed bundle; re-export and sign it, or get it from its publisher again",
    );
  }
  const statements = fields.statements ?? [];
  if (!Array.isArray(statements)) throw new BundleError(`${where}: statements must be a list`);
  const parsed: Statement[] = [];
  for (const s of statements) parsed.push(await parseStatement(s, where));
  return { signer, statements: parsed };
}
