/**
 * Limits checked before bytes are allocated: those of the Python runtime's
 * `toolkit/limits.py` that apply to what the SDK reads (bundles, JSON, images
 * passed in; it reads no data files), with the same defaults, so a bundle one
 * client refuses, the other refuses too. Override any of them with the
 * `limits` option of `DeviceRuntime.open`.
 */

import { LimitError } from "./errors.js";

export interface Limits {
  maxBundleBytes: number; // every file of a bundle, uncompressed
  maxBundleMembers: number; // files in a bundle
  maxCompressionRatio: number; // uncompressed / compressed, per zip member (models deflate < 10x)
  maxManifestBytes: number; // manifest.json and signature.json
  maxJsonDepth: number; // nesting of any JSON the device reads
  maxImagePixels: number; // one image
  maxSamples: number; // images in one call
}

export const DEFAULT_LIMITS: Limits = {
  maxBundleBytes: 2 ** 30,
  maxBundleMembers: 1000,
  maxCompressionRatio: 200,
  maxManifestBytes: 2 ** 20,
  maxJsonDepth: 32,
  maxImagePixels: 40_000_000,
  maxSamples: 1_000_000,
};

export function resolveLimits(overrides?: Partial<Limits>): Limits {
  return { ...DEFAULT_LIMITS, ...(overrides ?? {}) };
}

/** Refuse `value` over the limit `name`, naming it, its value and how to raise it. */
export function checkLimit(limits: Limits, name: keyof Limits, value: number, what: string): void {
  if (value > limits[name]) {
    throw new LimitError(
      `${what}: ${value.toLocaleString("en")} is over the limit ${name} = ${limits[name].toLocaleString("en")}`,
      `if it is genuine, raise it: DeviceRuntime.open(bundle, { limits: { ${name}: ... } })`,
    );
  }
}
