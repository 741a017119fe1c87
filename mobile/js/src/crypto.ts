/**
 * Hashes and signatures. WebCrypto does them where it can (Node, browsers:
 * native and fast, and no code to ship); where it cannot (React Native, old
 * engines), the well-kept pure-JavaScript @noble/ed25519 and @noble/hashes
 * do, loaded only then (a separate chunk for bundlers). Both verify Ed25519
 * strictly (RFC 8032), as OpenSSL does for the Python runtime, so a
 * signature one client accepts, the other accepts too.
 */

import { BundleError } from "./errors.js";

type Subtle = {
  digest(algorithm: string, data: Uint8Array): Promise<ArrayBuffer>;
  importKey(format: "raw", key: Uint8Array, algorithm: { name: string }, extractable: boolean, usages: string[]): Promise<unknown>;
  verify(algorithm: { name: string }, key: unknown, signature: Uint8Array, data: Uint8Array): Promise<boolean>;
};

interface Portable {
  sha256(data: Uint8Array): Uint8Array;
  verify(signature: Uint8Array, message: Uint8Array, publicKey: Uint8Array): boolean;
}

let portable: Promise<Portable> | null = null;

function loadPortable(): Promise<Portable> {
  portable ??= Promise.all([import("@noble/ed25519"), import("@noble/hashes/sha2.js")]).then(([ed, hashes]) => {
    ed.hashes.sha512 = hashes.sha512;
    return {
      sha256: hashes.sha256,
      verify: (signature, message, publicKey) => ed.verify(signature, message, publicKey, { zip215: false }),
    };
  });
  return portable;
}

let portableOnly = false;

function subtle(): Subtle | undefined {
  return portableOnly ? undefined : (globalThis as { crypto?: { subtle?: Subtle } }).crypto?.subtle;
}

// RFC 8032's first test key: importing it tells whether this WebCrypto knows Ed25519 at all
const PROBE_KEY = new Uint8Array([
  0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64, 0x07, 0x3a,
  0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68, 0xf7, 0x07, 0x51, 0x1a,
]);
let nativeEd25519: Promise<boolean> | null = null;

function hasNativeEd25519(): Promise<boolean> {
  const native = subtle();
  nativeEd25519 ??= native
    ? native.importKey("raw", PROBE_KEY, { name: "Ed25519" }, false, ["verify"]).then(() => true, () => false)
    : Promise.resolve(false);
  return nativeEd25519;
}

export function hex(bytes: Uint8Array): string {
  let out = "";
  for (const b of bytes) out += b.toString(16).padStart(2, "0");
  return out;
}

export async function sha256(data: Uint8Array): Promise<Uint8Array> {
  const native = subtle();
  if (native) {
    try {
      return new Uint8Array(await native.digest("SHA-256", data));
    } catch {
      // an insecure browser context refuses; the portable hash does it
    }
  }
  return (await loadPortable()).sha256(data);
}

export async function sha256Hex(data: Uint8Array): Promise<string> {
  return hex(await sha256(data));
}

export async function verifyEd25519(signature: Uint8Array, message: Uint8Array, publicKey: Uint8Array): Promise<boolean> {
  if (signature.length !== 64 || publicKey.length !== 32) return false;
  if (await hasNativeEd25519()) {
    const native = subtle() as Subtle;
    try {
      const key = await native.importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
      return await native.verify({ name: "Ed25519" }, key, signature, message);
    } catch {
      return false; // a malformed key is a signature that does not verify
    }
  }
  try {
    return (await loadPortable()).verify(signature, message, publicKey);
  } catch {
    return false;
  }
}

const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const VALUES = new Int16Array(128).fill(-1);
for (let i = 0; i < ALPHABET.length; i++) VALUES[ALPHABET.charCodeAt(i)] = i;

/**
 * Strict base64 (Python's `b64decode(validate=True)`): written here because
 * `atob` is missing from older React Native engines and accepts whitespace.
 */
export function fromBase64(text: unknown, what: string): Uint8Array {
  if (typeof text !== "string" || text.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) {
    throw new BundleError(`${what} is not base64`);
  }
  const padding = text.endsWith("==") ? 2 : text.endsWith("=") ? 1 : 0;
  const out = new Uint8Array((text.length / 4) * 3 - padding);
  let o = 0;
  for (let i = 0; i < text.length; i += 4) {
    const n = (VALUES[text.charCodeAt(i)] << 18) | (VALUES[text.charCodeAt(i + 1)] << 12)
      | ((VALUES[text.charCodeAt(i + 2)] & 63) << 6) | (VALUES[text.charCodeAt(i + 3)] & 63);
    if (o < out.length) out[o++] = (n >> 16) & 255;
    if (o < out.length) out[o++] = (n >> 8) & 255;
    if (o < out.length) out[o++] = n & 255;
  }
  return out;
}

export function toBase64(bytes: Uint8Array): string {
  let out = "";
  for (let i = 0; i < bytes.length; i += 3) {
    const n = (bytes[i] << 16) | ((bytes[i + 1] ?? 0) << 8) | (bytes[i + 2] ?? 0);
    out += ALPHABET[(n >> 18) & 63] + ALPHABET[(n >> 12) & 63];
    out += i + 1 < bytes.length ? ALPHABET[(n >> 6) & 63] : "=";
    out += i + 2 < bytes.length ? ALPHABET[n & 63] : "=";
  }
  return out;
}

/** For tests: the portable implementations only, as on an engine without WebCrypto (React Native). */
export function usePortableCrypto(): void {
  portableOnly = true;
  nativeEd25519 = Promise.resolve(false);
}
