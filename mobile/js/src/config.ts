/**
 * How LE and GN are trained on the device: the bundle's `personalize`
 * defaults (Python's `PersonalizeConfig`, `toolkit/config.py`), any of them
 * overridable per call, checked before any work.
 */

import { PersonalizationError } from "./errors.js";

export type ProgressFn = (stage: string, done: number, total: number) => void;

/** How LE and GN are trained: the bundle's `personalize` defaults, any of them overridable. */
export interface PersonalizeConfig {
  le_epochs: number;
  le_max_steps: number;
  le_learning_rate: number;
  batch_size: number;
  replay_weight: number;
  augment_copies: number;
  augment_until: number;
  gn_steps: number;
  gn_learning_rate: number;
  gate_generic_share: number;
  max_seconds: number;
  seed: number;
}

export const DEFAULT_CONFIG: PersonalizeConfig = {
  le_epochs: 150, le_max_steps: 6000, le_learning_rate: 1e-2, batch_size: 128, replay_weight: 0.3,
  augment_copies: 4, augment_until: 20000, gn_steps: 200, gn_learning_rate: 1e-2, gate_generic_share: 0.1,
  max_seconds: 60, seed: 0,
};

const COUNTS = ["le_epochs", "le_max_steps", "batch_size", "augment_copies", "augment_until", "gn_steps", "seed"] as const;

/**
 * The settings for one personalization: the bundle's defaults with `overrides`,
 * refused before any work when one is unknown, not a number, out of range, or
 * makes a batch larger than the bundle's step programs take (`maxBatch`).
 */
export function personalizeConfig(bundleDefaults: Record<string, unknown>, overrides: Partial<PersonalizeConfig> = {},
                                  maxBatch?: { le: number; gn: number }): PersonalizeConfig {
  const cfg: Record<string, unknown> = { ...DEFAULT_CONFIG };
  for (const [key, value] of Object.entries({ ...bundleDefaults, ...overrides })) {
    if (!Object.hasOwn(DEFAULT_CONFIG, key)) {
      if (Object.hasOwn(overrides, key)) {
        throw new PersonalizationError(`unknown personalize setting ${JSON.stringify(key)}`, `known: ${Object.keys(DEFAULT_CONFIG).join(", ")}`);
      }
      continue; // a newer bundle's setting this SDK does not use
    }
    if (typeof value !== "number" || !Number.isFinite(value)) {
      throw new PersonalizationError(`personalize.${key} must be a finite number, got ${JSON.stringify(value)}`);
    }
    cfg[key] = value;
  }
  const c = cfg as unknown as PersonalizeConfig;
  for (const key of ["le_epochs", "le_max_steps", "le_learning_rate", "batch_size", "gn_steps", "gn_learning_rate", "max_seconds"] as const) {
    if (!(c[key] > 0)) throw new PersonalizationError(`personalize.${key} must be positive, got ${c[key]}`);
  }
  if (!(c.gate_generic_share >= 0 && c.gate_generic_share < 1)) {
    throw new PersonalizationError(`personalize.gate_generic_share must be in [0, 1), got ${c.gate_generic_share}`);
  }
  if (!(c.augment_copies >= 0 && c.augment_until >= 0 && c.replay_weight >= 0)) {
    throw new PersonalizationError("personalize.augment_copies, augment_until and replay_weight must be >= 0");
  }
  for (const key of COUNTS) {
    if (!Number.isSafeInteger(c[key]) || c[key] < 0) throw new PersonalizationError(`personalize.${key} must be a whole number >= 0, got ${c[key]}`);
  }
  if (maxBatch) {
    const le = c.batch_size + Math.round(c.batch_size * c.replay_weight);
    if (le > maxBatch.le || 2 * Math.floor(c.batch_size / 2) > maxBatch.gn) {
      throw new PersonalizationError(`personalize.batch_size ${c.batch_size} makes batches of up to ${le} rows; this bundle's step programs take ` +
        `${maxBatch.le} (LE, with replay) and ${maxBatch.gn} (GN)`, "lower personalize.batch_size to the bundle's default or below");
    }
  }
  return c;
}
