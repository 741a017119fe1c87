/**
 * The bundle's `manifest.json`, as far as a client needs it: the input
 * spec, the labels, GE's outputs, LE's and GN's step programs and
 * parameters, the replay set, the personalize defaults, the release and
 * every file's sha256 and size. Its schema is `toolkit/manifest.schema.json`
 * (Python); this module checks what the SDK reads and refuses the rest with
 * a clear error, so a damaged manifest fails here, not deep in training.
 */

import { BundleError } from "./errors.js";
import { augmentProblem, modalityOf } from "./modalities.js";

export interface InputSpec {
  shape: number[]; // GE's input for one sample: [1, height, width] glyphs, [channels, length] windows, [1, length] clips
  scale: number;
  mean: number;
  std: number;
  preprocess?: unknown;
  modality?: string; // modalities.ts: "image" when absent (version 2), "timeseries" or "audio" (version 3)
  augment?: Record<string, number | number[] | string>;
}

export interface TrainablePart {
  feature_tap: string;
  feature_dim: number;
  inputs: string[]; // "features", and "base_logits" for LE
  initial_parameters: string;
  max_batch: number;
  parameters: Record<string, number[]>; // name -> shape; flattened in sorted-name order
  threshold?: number; // GN's default gate threshold
  training: Record<string, Record<string, string>>; // format -> {step, forward, ...}
}

export interface Release {
  name: string;
  version: number;
  expires?: string;
}

export interface Manifest {
  schema_version: number;
  input: InputSpec;
  labels: string[];
  files: Record<string, string>;
  sizes: Record<string, number>;
  formats: Record<string, { files: Record<string, string>; runtime?: string }>;
  global_expert: { files: Record<string, string>; input_name: string; output_order: string[]; outputs: { logits: string } };
  local_expert: TrainablePart;
  gating_network: TrainablePart;
  replay: { file: string; count?: number; outputs?: Record<string, string> }; // outputs: GE's on the replay, by format
  personalize: Record<string, unknown>;
  personalized_model: Record<string, { program: string; patches: string }>;
  release?: Release;
}

export const PARTS = ["local_expert", "gating_network"] as const;
export type PartName = (typeof PARTS)[number];

/**
 * An ISO 8601 time as Python's `parse_time` reads it (`datetime.fromisoformat`,
 * "Z" for UTC; no offset means UTC, never the device's local time), in ms;
 * NaN when it is not one. `Date.parse` would accept other forms, and read an
 * offset-less time in local time.
 */
export function parseTime(text: string): number {
  const m = /^(\d{4})-?(\d{2})-?(\d{2})(?:[T ](\d{2})(?::?(\d{2})(?::?(\d{2})(?:[.,](\d{1,6}))?)?)?)?(Z|[+-]\d{2}(?::?\d{2})?)?$/.exec(text);
  if (!m) return NaN;
  const [, y, mo, d, h = "0", mi = "0", sec = "0", frac = "0", zone] = m;
  const utc = Date.UTC(+y, +mo - 1, +d, +h, +mi, +sec, Math.floor(Number(`0.${frac}`) * 1000));
  if (new Date(utc).getUTCDate() !== +d || +h > 23 || +mi > 59 || +sec > 59) return NaN;
  if (!zone || zone === "Z") return utc;
  const sign = zone[0] === "-" ? -1 : 1;
  const digits = zone.slice(1).replace(":", "");
  return utc - sign * (Number(digits.slice(0, 2)) * 60 + Number(digits.slice(2) || "0")) * 60_000;
}

/** Python's `check_relative_path`: a path the manifest names must stay inside the bundle. */
export function checkRelativePath(name: unknown, where: string): string {
  if (typeof name !== "string" || !name || name.startsWith("/") || name.startsWith("\\") || name.includes("\\")
      || name.includes(":") || name.includes("\0") || name.split("/").some((p) => p === "" || p === "." || p === "..")) {
    throw new BundleError(`${where} names the path ${JSON.stringify(name)}, which is not a plain relative path inside the bundle`,
      "the bundle was tampered with or not written by edgetailor; re-export it");
  }
  return name;
}

function need(condition: boolean, where: string, what: string): void {
  if (!condition) {
    throw new BundleError(`${where}: ${what}`, "the bundle is damaged or was not written by edgetailor; re-export it");
  }
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
const isPositiveInt = (v: unknown): boolean => Number.isSafeInteger(v) && (v as number) > 0;

function checkPart(part: unknown, key: string, where: string): void {
  need(isObject(part), where, `${key} is missing`);
  const p = part as Record<string, unknown>;
  need(typeof p.feature_tap === "string", where, `${key}.feature_tap is missing`);
  need(Array.isArray(p.inputs), where, `${key}.inputs is missing`);
  need(isObject(p.parameters) && Object.values(p.parameters as object).every(
    (s) => Array.isArray(s) && s.every((d) => Number.isSafeInteger(d) && d >= 0)), where, `${key}.parameters is missing or malformed`);
  need(isPositiveInt(p.max_batch), where, `${key}.max_batch is missing (a bundle from before step programs; re-export it)`);
  need(typeof p.initial_parameters === "string", where, `${key}.initial_parameters is missing`);
  need(isObject(p.training), where, `${key}.training is missing`);
  checkRelativePath(p.initial_parameters, `${where}: ${key}.initial_parameters`);
}

/** Check the parts of a parsed manifest that the SDK reads. */
export function checkManifest(data: unknown, where: string): Manifest {
  need(isObject(data), where, "is not a JSON object");
  const m = data as Record<string, unknown>;
  if (m.schema_version !== 2 && m.schema_version !== 3) {
    throw new BundleError(`${where} has schema_version ${JSON.stringify(m.schema_version)}; this SDK reads versions 2 and 3`,
      "re-export the bundle with the current edgetailor (`edgetailor export bundle`), or update @edgetailor/sdk");
  }
  need(isObject(m.input) && Array.isArray((m.input as Record<string, unknown>).shape), where, "input.shape is missing");
  const input = m.input as Record<string, unknown>;
  // version 2: glyphs; version 3: windows or clips, the input naming its modality (modalities.ts)
  need(m.schema_version === 3 ? typeof input.modality === "string" && input.modality !== "image"
    : input.modality === undefined || input.modality === "image", where, "input.modality does not match the schema version");
  need(input.augment === undefined || isObject(input.augment), where, "input.augment must be an object");
  const modality = modalityOf(input as unknown as InputSpec);
  const why = modality.checkShape(input.shape as number[]);
  need(why === null, where, why ?? "");
  need(input.dtype === undefined || input.dtype === modality.dtype, where,
    `a ${modality.name} input is ${modality.dtype}, not ${JSON.stringify(input.dtype)}`);
  const augment = augmentProblem(input as unknown as InputSpec);
  need(augment === null, where, augment ?? "");
  for (const k of ["scale", "mean", "std"]) need(Number.isFinite(input[k]), where, `input.${k} is missing`);
  need((input.std as number) > 0 && (input.scale as number) > 0, where, "input.scale and input.std must be positive");
  need(Array.isArray(m.labels) && m.labels.length >= 2 && m.labels.every((l) => typeof l === "string"), where, "labels must be two or more names");
  need(isObject(m.files) && Object.values(m.files as object).every((h) => typeof h === "string" && /^[0-9a-f]{64}$/.test(h)),
    where, "files must map each file to its sha256");
  for (const name of Object.keys(m.files as object)) checkRelativePath(name, `${where}: files`);
  need(m.sizes === undefined || (isObject(m.sizes) && Object.values(m.sizes as object).every((s) => Number.isSafeInteger(s) && s >= 0)),
    where, "sizes must map files to byte counts");
  need(isObject(m.formats), where, "formats is missing");
  need(isObject(m.global_expert), where, "global_expert is missing");
  const ge = m.global_expert as Record<string, unknown>;
  need(isObject(ge.files) && typeof ge.input_name === "string" && Array.isArray(ge.output_order) && isObject(ge.outputs),
    where, "global_expert lacks files, input_name, output_order or outputs");
  checkPart(m.local_expert, "local_expert", where);
  checkPart(m.gating_network, "gating_network", where);
  need(isObject(m.replay) && typeof (m.replay as Record<string, unknown>).file === "string", where, "replay.file is missing");
  checkRelativePath((m.replay as Record<string, unknown>).file, `${where}: replay.file`);
  const outputs = (m.replay as Record<string, unknown>).outputs;
  need(outputs === undefined || (isObject(outputs) && Object.values(outputs).every((v) => typeof v === "string")), where,
    "replay.outputs must map formats to files");
  for (const file of Object.values(outputs ?? {})) checkRelativePath(file, `${where}: replay.outputs`);
  need(isObject(m.personalize), where, "personalize is missing");
  if (m.release !== undefined) {
    const r = m.release as Record<string, unknown>;
    need(isObject(r) && typeof r.name === "string" && Number.isSafeInteger(r.version), where, "release needs a name and an integer version");
    if (r.expires !== undefined) {
      need(typeof r.expires === "string" && !Number.isNaN(parseTime(r.expires as string)), where,
        `release.expires ${JSON.stringify(r.expires)} is not an ISO 8601 time`);
    }
  }
  const manifest = data as unknown as Manifest;
  manifest.sizes ??= {};
  manifest.personalized_model ??= {};
  for (const fmt of Object.values(manifest.personalized_model)) {
    checkRelativePath(fmt.program, `${where}: personalized_model`);
    checkRelativePath(fmt.patches, `${where}: personalized_model`);
  }
  // Python's `Manifest.check_paths`: a file the manifest names but does not hash would go unverified
  const unhashed = [...new Set(referencedFiles(manifest))].filter((f) => !Object.hasOwn(manifest.files, f)).sort();
  need(unhashed.length === 0, where, `references files it does not hash: ${unhashed.slice(0, 5).join(", ")}`);
  return manifest;
}

/** Every path the manifest names, besides the `files` map's keys (`Manifest.referenced_files`). */
function referencedFiles(m: Manifest): string[] {
  const names = [m.replay.file, ...Object.values(m.replay.outputs ?? {}), ...Object.values(m.global_expert.files)];
  for (const part of PARTS) {
    names.push(...Object.values(m[part].training).flatMap((roles) => (isObject(roles) ? Object.values(roles) : [roles])) as string[],
      m[part].initial_parameters);
  }
  names.push(...Object.values(m.formats).flatMap((entry) => Object.keys(entry.files ?? {})));
  return [...names, ...Object.values(m.personalized_model).flatMap((t) => [t.program, t.patches])];
}

/** The files format `fmt` needs: GE, GE's outputs on the replay, the step and forward programs, the personalized-model template. */
export function formatFiles(manifest: Manifest, fmt: string): string[] {
  const files = new Set<string>();
  const ge = manifest.global_expert.files[fmt];
  if (ge) files.add(ge);
  const outputs = manifest.replay.outputs?.[fmt];
  if (outputs) files.add(outputs);
  for (const part of PARTS) for (const f of Object.values(manifest[part].training[fmt] ?? {})) files.add(f);
  const template = manifest.personalized_model[fmt];
  if (template) {
    files.add(template.program);
    files.add(template.patches);
  }
  return [...files];
}
