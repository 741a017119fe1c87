/**
 * Hashes and signatures, from well-kept pure-JavaScript libraries
 * (@noble/hashes, @noble/ed25519) so that they work the same in Node,
 * browsers and React Native (which has no WebCrypto). Where WebCrypto's
 * digest exists it hashes the bundle's files instead: it is native and
 * several times faster on megabytes.
 */

import * as ed from "@noble/ed25519";
import { sha256 as nobleSha256, sha512 } from "@noble/hashes/sha2.js";
import { BundleError } from "./errors.js";

ed.hashes.sha512 = sha512;

export function hex(bytes: Uint8Array): string {
  let out = "";
  for (const b of bytes) out += b.toString(16).padStart(2, "0");
  return out;
}

export function sha256Sync(data: Uint8Array): Uint8Array {
  return nobleSha256(data);
}

type Subtle = { digest(algorithm: string, data: Uint8Array): Promise<ArrayBuffer> };

function subtle(): Subtle | undefined {
  return (globalThis as { crypto?: { subtle?: Subtle } }).crypto?.subtle;
}

/** sha256 in hex: WebCrypto when present, else @noble/hashes. */
export async function sha256Hex(data: Uint8Array): Promise<string> {
  const native = subtle();
  if (native) {
    try {
      return hex(new Uint8Array(await native.digest("SHA-256", data)));
    } catch {
      // an insecure browser context refuses; fall through to the portable hash
    }
  }
  return hex(nobleSha256(data));
}

export function verifyEd25519(signature: Uint8Array, message: Uint8Array, publicKey: Uint8Array): boolean {
  try {
    return ed.verify(signature, message, publicKey);
  } catch {
    return false; // a malformed key or signature is a signature that does not verify
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
    const n =
      (VALUES[text.charCodeAt(i)] << 18) |
      (VALUES[text.charCodeAt(i + 1)] << 12) |
      ((VALUES[text.charCodeAt(i + 2)] & 63) << 6) |
      (VALUES[text.charCodeAt(i + 3)] & 63);
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
