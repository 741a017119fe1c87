/**
 * The SDK's public API, mirroring the Python `DeviceRuntime`:
 *
 *     const rt = await DeviceRuntime.open(bundle, { ort, store, trustedKeys });
 *     await rt.addSamples(images, labels);   // kept in the store across restarts
 *     await rt.personalize({ onProgress });  // trains LE and GN; committed atomically
 *     await rt.predict(images);              // labels, probabilities, which expert answered, gate
 *     await rt.evaluate(images, labels);
 *     await rt.exportPersonalized();         // one program for an app that only predicts
 *     await rt.reset();
 *
 * Until a personalization exists for this bundle, predict and evaluate answer
 * with GE alone. Every image goes through the bundle's preprocessing, as in
 * Python, so the same picture becomes the same sample in every client.
 */

import type * as Ort from "onnxruntime-common";
import { Bundle, type BundleSource } from "./bundle.js";
import { BackendError, BundleError, PersonalizationError, SampleError, StateError } from "./errors.js";
import { checkLimit, resolveLimits, type Limits } from "./limits.js";
import { personalizeConfig, type PersonalizeConfig, type ProgressFn } from "./config.js";
import { modalityOf, prepareClips, prepareWindows, type NumberArray, type Samples } from "./modalities.js";
import { asGreyFloat, preprocessingFrom, type Preprocessing } from "./preprocess.js";
import {
  argmax, ForwardPart, gateFromLogits, gather, GlobalExpert, parameterCount, parameterOrder, type OrtModule, type ProgramOptions,
} from "./programs.js";
import { parsePublicKey } from "./signing.js";
import { DeviceState, SamplesChanged, type PersonalizationRecord } from "./state.js";
import type { Store } from "./store.js";
import { TrustPolicy } from "./trust.js";

export type Expert = "GE" | "LE";

/** Images: N of the bundle's input size as a flat typed array, or N of any one size with their shape. */
export type Pixels = Uint8Array | Uint8ClampedArray | Uint16Array | Float32Array | Float64Array;
export interface ImageBatch { data: Pixels; width: number; height: number; channels?: number }
export type ImageInput = Pixels | ImageBatch;

/**
 * Sensor windows (a bundle of the timeseries modality): N windows of channels x length back to back, or
 * a list of windows. Clips (audio): a list of mono clips of any length (Float32Array in [-1, 1] or
 * Int16Array), or N clips of the bundle's length back to back.
 */
export type SignalInput = NumberArray | NumberArray[];

/** What `addSamples`, `predict` and `evaluate` take: images, or windows and clips, as the bundle's modality reads. */
export type SampleInput = ImageInput | SignalInput;

export type LabelInput = ArrayLike<string | number | bigint>;

export interface OpenOptions {
  ort: OrtModule;
  store: Store;
  /** Publisher keys to pin (PEM text of `signing.pub`, or raw 32 bytes): from then on only bundles they signed open. */
  trustedKeys?: (string | Uint8Array)[];
  sessionOptions?: Ort.InferenceSession.SessionOptions;
  limits?: Partial<Limits>;
  /** The clock for release expiry (tests move it). */
  now?: () => Date;
}

export interface Prediction {
  labels: string[];
  indices: Int32Array;
  probabilities: Float32Array; // N * classes, row-major
  experts: Expert[];
  gate: Float32Array; // GN's probability that LE should answer (0 when not personalized)
}

export interface Evaluation {
  accuracy: number;
  n: number;
  experts: { GE: number; LE: number };
  accuracyByExpert: { GE: number | null; LE: number | null };
  geOnlyAccuracy: number;
  personalized: boolean;
  personalizationId: number | null;
}

const PERSONALIZE_ATTEMPTS = 5; // trainings before giving up when samples keep being added

interface Active {
  record: PersonalizationRecord;
  le: ForwardPart;
  gn: ForwardPart;
  leParams: Float32Array;
  gnParams: Float32Array;
}

export class DeviceRuntime {
  readonly warnings: string[];
  private problem: string | null = null;
  private active: Active | null = null;
  private closed = false;

  private constructor(readonly bundle: Bundle, private state: DeviceState, private readonly ge: GlobalExpert,
                      private readonly preprocessing: Preprocessing | null, private readonly options: ProgramOptions,
                      private readonly limits: Limits, warnings: string[]) {
    this.warnings = warnings;
  }

  /** Open the state, decide whether the bundle may run (trust), then open and check the bundle and load GE. */
  static async open(source: BundleSource, options: OpenOptions): Promise<DeviceRuntime> {
    if (!options?.ort?.InferenceSession || !options.ort.Tensor) {
      throw new BackendError("DeviceRuntime.open needs { ort }: the onnxruntime module your app ships",
        'import * as ort from "onnxruntime-web" (or -node, or -react-native) and pass it');
    }
    if (!options.store) throw new StateError("DeviceRuntime.open needs { store }", "e.g. new IndexedDbStore(), new NodeFileStore(dir) or new MemoryStore()");
    const limits = resolveLimits(options.limits);
    const keys = await Promise.all((options.trustedKeys ?? []).map((k, i) => parsePublicKey(k, `trustedKeys[${i}]`)));
    const state = await DeviceState.open(options.store);
    const policy = new TrustPolicy(state, keys, options.now);
    const bundle = await Bundle.open(source, limits, policy.check);
    await policy.accept(bundle.manifest, bundle.manifestDigest, bundle.signature !== null, bundle.source);
    await state.checkLabels(bundle.labels);
    const warnings = [...policy.warnings, ...[state.problem, state.trustProblem && `${state.trustProblem}: only bundles signed by the ` +
      "keys given now as trustedKeys open"].filter((w): w is string => Boolean(w))];
    const programOptions: ProgramOptions = { ort: options.ort, sessionOptions: options.sessionOptions };
    // the image preprocessing; windows and clips are taken as they are (modalities.ts)
    const preprocessing = modalityOf(bundle.manifest.input).name === "image" ? preprocessingFrom(bundle.manifest.input.preprocess) : null;
    const ge = await GlobalExpert.open(bundle, programOptions);
    const runtime = new DeviceRuntime(bundle, state, ge, preprocessing, programOptions, limits, warnings);
    await runtime.loadPersonalization();
    return runtime;
  }

  /**
   * Rebuild a damaged store's index from its sample records (each image checked
   * against its sha256); the personalization is dropped, the trust memory kept.
   * Open the runtime again afterwards. `reset()` repairs by itself.
   */
  static async repair(store: Store): Promise<{ samples: number; damagedRecords: number }> {
    const { repairState } = await import("./repair.js"); // loaded only when a store needs it
    return repairState(store);
  }

  get labels(): string[] {
    return this.bundle.labels;
  }

  /** Why GE answers alone although a personalization is stored (damaged, or trained with another bundle), or null. */
  get personalizationProblem(): string | null {
    return this.problem;
  }

  get personalized(): boolean {
    return this.active !== null;
  }

  get personalizationId(): number | null {
    return this.active?.record.id ?? null;
  }

  private async loadPersonalization(): Promise<void> {
    await this.releaseActive();
    this.problem = null;
    let loaded;
    try {
      loaded = await this.state.loadPersonalization();
    } catch (error) {
      // never lock the user out: GE answers alone and says why
      this.problem = `${(error as Error).message}; GE answers alone until you personalize again`;
      return;
    }
    if (!loaded) return;
    if (loaded.record.bundleId !== this.bundle.bundleId) {
      this.problem = `it was trained with another bundle (id ${loaded.record.bundleId}, this one is ${this.bundle.bundleId}); personalize again to use this bundle`;
      return;
    }
    let le: ForwardPart | null = null;
    try {
      const leParams = this.unpack(loaded.le, "local_expert");
      const gnParams = this.unpack(loaded.gn, "gating_network");
      le = await ForwardPart.open(this.bundle, "local_expert", this.options, leParams);
      const gn = await ForwardPart.open(this.bundle, "gating_network", this.options, gnParams);
      this.active = { record: loaded.record, le, gn, leParams, gnParams };
    } catch (error) {
      await le?.release();
      this.problem = (error as Error).message;
    }
  }

  /** Stored weights (little-endian float32, the manifest's parameter order), checked against the bundle's part. */
  private unpack(blob: Uint8Array, part: "local_expert" | "gating_network"): Float32Array {
    const expected = parameterCount(this.bundle.manifest[part]);
    if (blob.length !== expected * 4) {
      throw new StateError(`the stored ${part.replace("_", " ")} holds ${blob.length / 4} values, this bundle's has ${expected}`,
        "personalize again for this bundle");
    }
    const params = new Float32Array(blob.slice().buffer);
    if (!params.every(Number.isFinite)) throw new StateError(`the stored ${part.replace("_", " ")} weights contain NaN or infinity`, "personalize again");
    return params;
  }

  // samples -------------------------------------------------------------
  /** The bundle's kind of input (`modalities.ts`): "image", "timeseries" or "audio". */
  get modality(): string {
    return modalityOf(this.bundle.manifest.input).name;
  }

  /**
   * Inputs as an app has them -> the samples GE reads, as the bundle's modality makes them: images of
   * any size by the bundle's preprocessing (blank ones refused), sensor windows of exactly the bundle's
   * shape, clips fitted to its length (empty, silent or clipped ones refused).
   */
  prepare(images: SampleInput, labelsHint?: number): { samples: Samples; count: number } {
    this.checkOpen();
    const spec = this.bundle.manifest.input;
    const modality = modalityOf(spec).name;
    if (modality !== "image") {
      const typed = (x: unknown) => Array.isArray(x) || (ArrayBuffer.isView(x) && !(x instanceof DataView));
      if (!typed(images)) {
        throw new SampleError(`${modality} samples must be a typed array of values or a list of them`,
          modality === "audio" ? "e.g. [Float32Array of a clip in [-1, 1], ...] or Int16Array clips" : "e.g. a Float32Array of N windows back to back");
      }
      const limit = (count: number) => checkLimit(this.limits, "maxSamples", count, "samples in one call"); // before allocating
      return modality === "audio" ? prepareClips(images as SignalInput, spec, limit) : prepareWindows(images as SignalInput, spec, limit);
    }
    return this.prepareImages(images as ImageInput, labelsHint);
  }

  private prepareImages(images: ImageInput, labelsHint?: number): { samples: Uint8Array; count: number } {
    const [, h, w] = this.bundle.manifest.input.shape;
    const typed = (x: unknown): boolean => ArrayBuffer.isView(x) && !(x instanceof DataView) && typeof (x as { length?: unknown }).length === "number";
    const batch: ImageBatch = typed(images) ? { data: images as Pixels, width: w, height: h, channels: 1 } : images as ImageBatch;
    if (!batch || !typed(batch.data)) {
      throw new SampleError("images must be a typed array (N*H*W) or { data, width, height, channels }",
        "e.g. Uint8Array of N 28x28 images, or a canvas's ImageData as { data, width, height, channels: 4 }");
    }
    const channels = batch.channels ?? 1;
    if (![1, 3, 4].includes(channels)) throw new SampleError(`channels must be 1, 3 or 4, got ${channels}`);
    if (!(Number.isSafeInteger(batch.width) && Number.isSafeInteger(batch.height) && batch.width >= 2 && batch.height >= 2)) {
      throw new SampleError(`an image must be at least 2x2, got ${batch.width}x${batch.height}`);
    }
    const per = batch.width * batch.height * channels;
    checkLimit(this.limits, "maxImagePixels", batch.width * batch.height, "one image (pixels)");
    if (batch.data.length === 0 || batch.data.length % per !== 0) {
      throw new SampleError(`${batch.data.length} values are not a whole number of ${batch.height}x${batch.width}` +
        `${channels > 1 ? `x${channels}` : ""} images`, ArrayBuffer.isView(images)
        ? `a flat array holds N images of this bundle's input size (${h}x${w}); for other sizes pass { data, width, height }`
        : "check width, height and channels");
    }
    if (!ArrayBuffer.isView(images) && batch.channels === undefined && batch.data.length === batch.width * batch.height * 4
        && labelsHint !== undefined && labelsHint !== 4) {
      throw new SampleError(`${batch.data.length} values of ${batch.height}x${batch.width} read as 4 grey images, but ${labelsHint} label(s) were given`,
        "a canvas's ImageData is RGBA: pass { data, width, height, channels: 4 }");
    }
    const count = batch.data.length / per;
    checkLimit(this.limits, "maxSamples", count, "images in one call");
    const grey = asGreyFloat(batch.data, count, batch.height, batch.width, channels);
    const { images: samples, why } = this.preprocessing!.prepareBatch(grey);   // an image bundle has one
    const refused = why.map((reason, i) => [i, reason] as const).filter(([, reason]) => reason);
    if (refused.length) {
      const where = refused.slice(0, 5).map(([i]) => `image ${i}`).join(", ");
      throw new SampleError(`${refused.length} of ${count} images have no usable ink (blank or too faint): ${where}` +
        `${refused.length > 5 ? ` and ${refused.length - 5} more` : ""} (${refused[0][1]})`, "remove or retake them");
    }
    return { samples, count };
  }

  /** Label names or indices -> indices into the bundle's labels. */
  labelIndices(labels: LabelInput, n: number): Int32Array {
    if (!labels || typeof labels.length !== "number") throw new SampleError("labels must be an array of label names or indices");
    if (labels.length !== n) throw new SampleError(`${n} images but ${labels.length} labels`);
    const names = this.labels;
    const index = new Map(names.map((name, i) => [name, i]));
    const out = new Int32Array(n);
    const unknown = new Set<string>();
    for (let i = 0; i < n; i++) {
      const label = labels[i];
      if (typeof label === "bigint") {
        if (label >= 0n && label < BigInt(names.length)) out[i] = Number(label);
        else unknown.add(String(label));
      } else if (typeof label === "string") {
        const k = index.get(label);
        if (k === undefined) unknown.add(JSON.stringify(label));
        else out[i] = k;
      } else if (Number.isInteger(label) && label >= 0 && label < names.length) out[i] = label;
      else unknown.add(String(label));
    }
    if (unknown.size) {
      throw new SampleError(`unknown label(s) ${[...unknown].sort().join(", ")}: this bundle has ${names.length} labels`,
        `this bundle knows: ${names.join(", ")} (or their indices 0..${names.length - 1})`);
    }
    return out;
  }

  /** Prepare, validate and store labelled samples; returns how many were new (the same image and label is kept once). */
  async addSamples(images: SampleInput, labels: LabelInput): Promise<number> {
    const { samples, count } = this.prepare(images, labels?.length);
    const indices = this.labelIndices(labels, count);
    const [h, w] = this.sampleDims();
    return this.state.addSamples(samples, indices, h, w);
  }

  /** One stored sample's two dimensions: glyphs H x W, windows channels x length, clips 1 x length. */
  private sampleDims(): [number, number] {
    const shape = this.bundle.manifest.input.shape;
    return shape.length === 3 ? [shape[1], shape[2]] : [shape[0], shape[1]];
  }

  sampleCount(): number {
    return this.state.sampleCount();
  }

  // personalize ---------------------------------------------------------
  /**
   * Train LE and GN on every stored sample, then make them active in one commit.
   * If samples were added meanwhile (another runtime on the same store), the
   * training is stale: it trains again on all of them, or yields to a newer
   * personalization of the same samples (`superseded`).
   */
  async personalize(options: { onProgress?: ProgressFn; overrides?: Partial<PersonalizeConfig> } = {}): Promise<Record<string, unknown>> {
    this.checkOpen();
    if (this.state.readOnly) throw new StateError(`cannot personalize: ${this.state.problem}`, "call reset() or DeviceRuntime.repair(store) first");
    const cfg = personalizeConfig(this.bundle.manifest.personalize, options.overrides,
      { le: this.bundle.manifest.local_expert.max_batch, gn: this.bundle.manifest.gating_network.max_batch });
    const [h, w] = this.sampleDims();
    const dtype = modalityOf(this.bundle.manifest.input).dtype;
    const started = Date.now();
    // Loaded on first use: an app that only predicts at startup never loads the training code.
    const { trainMixture } = await import("./mixture.js");
    for (let attempt = 1; attempt <= PERSONALIZE_ATTEMPTS; attempt++) {
      await this.state.refresh();
      const { images, labels, generation } = await this.state.loadSamples(h, w, dtype);
      this.checkTrainable(labels);
      const trained = await trainMixture(this.bundle, this.ge, this.options, images, labels, cfg, options.onProgress);
      const report = { ...trained.report, damaged_samples_skipped: this.state.damagedSamples,
        other_samples_ignored: this.state.otherSamples };
      let id: number;
      try {
        id = await this.state.savePersonalization(this.bundle.bundleId, bytesOf(trained.le), bytesOf(trained.gn),
          trained.threshold, report, generation);
      } catch (error) {
        if (!(error instanceof SamplesChanged)) throw error;
        const newer = this.state.personalization;
        if (newer && newer.bundleId === this.bundle.bundleId && newer.samplesGeneration === this.state.samplesGeneration) {
          await this.loadPersonalization();
          return { ...newer.report, personalization_id: newer.id, superseded: true, attempts: attempt, seconds: (Date.now() - started) / 1000 };
        }
        continue;
      }
      await this.loadPersonalization();
      return { ...report, personalization_id: id, attempts: attempt, seconds: (Date.now() - started) / 1000 };
    }
    throw new PersonalizationError(`the stored samples changed during each of ${PERSONALIZE_ATTEMPTS} trainings, so none was committed`,
      "personalize again once the samples stop changing; the previous personalization stays in use");
  }

  private checkTrainable(labels: Int32Array): void {
    if (labels.length === 0) {
      const damaged = this.state.damagedSamples ? ` (${this.state.damagedSamples} damaged samples skipped)` : "";
      throw new SampleError(`no samples stored to personalize on${damaged}`, "add labelled samples first (addSamples)");
    }
    if (new Set(labels).size < 2) {
      throw new SampleError(`all ${labels.length} stored samples have the label ${JSON.stringify(this.labels[labels[0]])}`,
        "add samples of at least two labels");
    }
  }

  // inference -----------------------------------------------------------
  private async answer(samples: Samples, count: number) {
    const m = this.bundle.manifest;
    const leTap = m.local_expert.feature_tap;
    const gnTap = m.gating_network.feature_tap;
    const out = await this.ge.run(samples, count, [...new Set([leTap, gnTap])]);
    const classes = out.classes;
    const logits = Float32Array.from(out.logits);
    const gate = new Float32Array(count);
    const useLe = new Array<boolean>(count).fill(false);
    if (this.active) {
      gate.set(gateFromLogits(await this.active.gn.run([out.features[gnTap]], count)));
      const threshold = Math.fround(this.active.record.threshold); // NumPy compares float32 gates in float32
      const rows: number[] = [];
      for (let i = 0; i < count; i++) if ((useLe[i] = gate[i] > threshold)) rows.push(i);
      if (rows.length) {
        const leLogits = await this.active.le.run([gather(out.features[leTap], rows),
          gather({ data: out.logits, dim: classes }, rows)], rows.length);
        rows.forEach((r, j) => logits.set(leLogits.subarray(j * classes, (j + 1) * classes), r * classes));
      }
    }
    return { geLogits: out.logits, logits, classes, gate, useLe };
  }

  /** The answer for each image, and which expert gave it. */
  async predict(images: SampleInput): Promise<Prediction> {
    const { samples, count } = this.prepare(images);
    const { logits, classes, gate, useLe } = await this.answer(samples, count);
    const indices = argmax(logits, classes, count);
    return { labels: Array.from(indices, (i) => this.labels[i]), indices, probabilities: softmax(logits, classes, count),
      experts: useLe.map((u) => (u ? "LE" : "GE")), gate };
  }

  async evaluate(images: SampleInput, labels: LabelInput): Promise<Evaluation> {
    const { samples, count } = this.prepare(images, labels?.length);
    const truth = this.labelIndices(labels, count);
    const { geLogits, logits, classes, useLe } = await this.answer(samples, count);
    const predicted = argmax(logits, classes, count);
    const geOnly = argmax(geLogits, classes, count);
    let right = 0, geRight = 0, byGe = 0, byLe = 0, rightGe = 0, rightLe = 0;
    for (let i = 0; i < count; i++) {
      const ok = predicted[i] === truth[i];
      right += +ok;
      geRight += +(geOnly[i] === truth[i]);
      if (useLe[i]) { byLe++; rightLe += +ok; } else { byGe++; rightGe += +ok; }
    }
    return { accuracy: right / count, n: count, experts: { GE: byGe, LE: byLe },
      accuracyByExpert: { GE: byGe ? rightGe / byGe : null, LE: byLe ? rightLe / byLe : null },
      geOnlyAccuracy: geRight / count, personalized: this.personalized, personalizationId: this.personalizationId };
  }

  // one program, for apps that only predict -----------------------------
  /**
   * GE + LE + GN + routing as one program with the active personalization's
   * weights written over the bundle template's placeholders (no converter on
   * the device): image in; logits, probabilities, gate and expert out.
   */
  async exportPersonalized(format = "onnx"): Promise<Uint8Array> {
    if (!this.active) {
      throw new PersonalizationError("nothing to export: this state has no personalization in use" +
        (this.personalizationProblem ? ` (${this.personalizationProblem})` : ""), "personalize first");
    }
    const template = this.bundle.manifest.personalized_model[format];
    if (!template || format !== "onnx") {
      throw new BundleError(`the SDK exports the onnx personalized-model program; this bundle has: ${Object.keys(this.bundle.manifest.personalized_model).join(", ") || "none"}`,
        "re-export the bundle with --formats including onnx");
    }
    const spec = this.bundle.manifest;
    const unflat = (flat: Float32Array, part: "local_expert" | "gating_network") => {
      const out: Record<string, Float32Array> = {};
      let at = 0;
      for (const name of parameterOrder(spec[part])) {
        const size = spec[part].parameters[name].reduce((a, b) => a * b, 1);
        out[name] = flat.subarray(at, at + size);
        at += size;
      }
      return out;
    };
    const patches = new TextDecoder().decode(this.bundle.file(template.patches));
    const { applyPatches } = await import("./patching.js");
    return applyPatches(this.bundle.file(template.program), patches, {
      local_expert: unflat(this.active.leParams, "local_expert"), gating_network: unflat(this.active.gnParams, "gating_network"),
    }, this.active.record.threshold, template.program);
  }

  // housekeeping --------------------------------------------------------
  /** Forget the personalization (and the samples, with deleteSamples): back to GE alone. */
  async reset(options: { deleteSamples?: boolean } = {}): Promise<void> {
    this.checkOpen();
    if (this.state.readOnly) {   // a damaged index is rebuilt first, keeping every intact sample
      await DeviceRuntime.repair(this.state.store);
      this.state = await DeviceState.open(this.state.store);
      await this.state.checkLabels(this.labels);
    }
    await this.state.clearPersonalization(Boolean(options.deleteSamples));
    await this.loadPersonalization();
  }

  status(): { bundle: string; bundleId: string; signedBy: string | null; warnings: string[]; samples: number;
              personalized: boolean; personalization: Record<string, unknown> | null; personalizationProblem: string | null } {
    return { bundle: this.bundle.source, bundleId: this.bundle.bundleId, signedBy: this.bundle.signerId,
      warnings: this.warnings, samples: this.sampleCount(), personalized: this.personalized,
      personalization: this.active?.record.report ?? null, personalizationProblem: this.personalizationProblem };
  }

  private async releaseActive(): Promise<void> {
    const active = this.active;
    this.active = null;
    if (active) {
      await active.le.release();
      await active.gn.release();
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.releaseActive();
    await this.ge.release();
  }

  private checkOpen(): void {
    if (this.closed) throw new StateError("this runtime is closed", "open it again with DeviceRuntime.open");
  }
}

/** A float32 vector's bytes, little-endian (as every platform the SDK runs on stores them). */
function bytesOf(values: Float32Array): Uint8Array {
  return new Uint8Array(values.buffer.slice(values.byteOffset, values.byteOffset + values.byteLength));
}

function softmax(logits: Float32Array, classes: number, rows: number): Float32Array {
  const out = new Float32Array(logits.length);
  for (let i = 0; i < rows; i++) {
    const row = logits.subarray(i * classes, (i + 1) * classes);
    let max = -Infinity;
    for (const v of row) max = Math.max(max, v);
    let sum = 0;
    for (let c = 0; c < classes; c++) sum += out[i * classes + c] = Math.exp(row[c] - max);
    for (let c = 0; c < classes; c++) out[i * classes + c] /= sum;
  }
  return out;
}
