/**
 * Running the bundle's ONNX programs with the onnxruntime the app passes in
 * (onnxruntime-react-native, -web or -node: they share onnxruntime-common's
 * API). GE gives logits and the feature taps; LE's and GN's step programs
 * train with three flat vectors (parameters and AdamW's two moments) that
 * this module feeds back in, padding a short batch with rows of weight 0,
 * as the Python runtime's `device/backends/steps.py`.
 */

import type * as Ort from "onnxruntime-common";
import { BackendError } from "./errors.js";
import type { Bundle } from "./bundle.js";
import type { InputSpec, PartName, TrainablePart } from "./manifest.js";
import type { Samples } from "./modalities.js";

const BATCH_VALUES = 1 << 18; // input values GE reads per batch, at most (device/mixture.py)

/** What the SDK needs of an onnxruntime package: `import * as ort from "onnxruntime-node"` fits. */
export interface OrtModule {
  InferenceSession: { create(model: Uint8Array, options?: Ort.InferenceSession.SessionOptions): Promise<Ort.InferenceSession> };
  Tensor: typeof Ort.Tensor;
}

export interface ProgramOptions {
  ort: OrtModule;
  sessionOptions?: Ort.InferenceSession.SessionOptions;
}

/**
 * An int8 GE on x86 without VNNI: onnxruntime's fast U8S8 kernels saturate pairs of products to 16 bits
 * (a `server compress` int8 LeNet's logits moved by up to 27 grid units). `x64quantprecision` asks for exact
 * U8U8 arithmetic there, as the Python runtime and the firmware compute; elsewhere it changes nothing, and a
 * binding that does not read `extra` yet ignores it.
 */
const EXACT_INT8 = { session: { x64quantprecision: "1" } };

export async function openSession(options: ProgramOptions, bytes: Uint8Array, what: string, threads: number) {
  try {
    return await options.ort.InferenceSession.create(bytes, { intraOpNumThreads: threads, interOpNumThreads: 1, extra: EXACT_INT8, ...options.sessionOptions });
  } catch (error) {
    const message = String((error as Error).message ?? error).split("\n")[0].slice(0, 300);
    const hint = /opset|ir.?version/i.test(message)
      ? "this onnxruntime is too old for the bundle: update it (>= 1.17), or re-export the bundle with an older opset"
      : "re-export or re-download the bundle";
    throw new BackendError(`onnxruntime could not load ${what}: ${message}`, hint);
  }
}

/** Samples (uint8 glyphs or float32 windows and clips) -> GE's float32 input, as `InputSpec.normalize` computes it (float32 steps). */
export function normalize(samples: Samples, spec: InputSpec, out: Float32Array): Float32Array {
  // divided by 1/scale (255), not multiplied by scale: x / 255 and x * (1/255) differ in the last bit
  const divisor = Math.fround(1 / spec.scale);
  const mean = Math.fround(spec.mean);
  const std = Math.fround(spec.std);
  const scaled = (v: number) => Math.fround(Math.fround(Math.fround(v / divisor) - mean) / std);
  if (samples instanceof Float32Array) {
    for (let i = 0; i < samples.length; i++) out[i] = scaled(samples[i]);
    return out;
  }
  const table = new Float32Array(256);
  for (let v = 0; v < 256; v++) table[v] = scaled(v);
  for (let i = 0; i < samples.length; i++) out[i] = table[samples[i]];
  return out;
}

export class GlobalExpert {
  private constructor(
    private readonly options: ProgramOptions,
    private readonly session: Ort.InferenceSession,
    private readonly spec: InputSpec,
    private readonly inputName: string,
    readonly outputNames: string[], // logits first, then the taps
  ) {}

  static async open(bundle: Bundle, options: ProgramOptions): Promise<GlobalExpert> {
    const ge = bundle.manifest.global_expert;
    const file = ge.files.onnx;
    const session = await openSession(options, bundle.file(file), file, 2);
    const order = ge.output_order;
    return new GlobalExpert(options, session, bundle.manifest.input, ge.input_name, [ge.outputs.logits, ...order.slice(1)]);
  }

  /**
   * Logits [N*C] and the taps' features [N*D] for `count` samples, `batch` at a time to bound memory
   * (by default 64 glyphs, fewer of a larger input, as the Python runtime's `run_ge`).
   */
  async run(images: Samples, count: number, taps: string[], batch?: number,
            progress?: (done: number, total: number) => void, breathe?: () => Promise<void>): Promise<{ logits: Float32Array; classes: number; features: Record<string, { data: Float32Array; dim: number }> }> {
    const pixels = this.spec.shape.reduce((a, b) => a * b, 1);
    batch ??= Math.max(8, Math.min(64, Math.floor(BATCH_VALUES / pixels)));
    const input = new Float32Array(Math.max(1, Math.min(batch, count)) * pixels);
    let logits: Float32Array | null = null;
    let classes = 0;
    const features: Record<string, { data: Float32Array; dim: number }> = {};
    for (let start = 0; start < count; start += batch) {
      const rows = Math.min(batch, count - start);
      const x = input.subarray(0, rows * pixels);
      normalize(images.subarray(start * pixels, (start + rows) * pixels), this.spec, x);
      const feeds = { [this.inputName]: new this.options.ort.Tensor("float32", x, [rows, ...this.spec.shape]) };
      const outputs = await this.session.run(feeds, [this.outputNames[0], ...taps]);
      const lg = outputs[this.outputNames[0]].data as Float32Array;
      if (logits === null) {
        classes = lg.length / rows;
        logits = new Float32Array(count * classes);
        for (const tap of taps) {
          const dim = (outputs[tap].data as Float32Array).length / rows;
          features[tap] = { data: new Float32Array(count * dim), dim };
        }
      }
      logits.set(lg, start * classes);
      for (const tap of taps) features[tap].data.set(outputs[tap].data as Float32Array, start * features[tap].dim);
      progress?.(start + rows, count);
      await breathe?.();
    }
    return { logits: logits ?? new Float32Array(0), classes, features };
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}

/** The flat parameter vector in the manifest's order (sorted names, as export flattened them). */
export function parameterOrder(spec: TrainablePart): string[] {
  return Object.keys(spec.parameters).sort();
}

export function parameterCount(spec: TrainablePart): number {
  return Object.values(spec.parameters).reduce((sum, shape) => sum + shape.reduce((a, b) => a * b, 1), 0);
}

export function trainingFiles(bundle: Bundle, part: PartName): Record<string, string> {
  const files = bundle.manifest[part].training.onnx;
  if (!files?.step || !files?.forward) {
    throw new BackendError(`${bundle.source} has no onnx step programs for ${part.replace("_", " ")}`,
      "re-export the bundle with this edgetailor (`edgetailor export bundle`)");
  }
  return files;
}

/** A trained part run by its forward program: features (and base logits) in, logits out. */
export class ForwardPart {
  private constructor(private readonly options: ProgramOptions, private readonly session: Ort.InferenceSession,
                      private readonly params: Float32Array) {}

  static async open(bundle: Bundle, part: PartName, options: ProgramOptions, params: Float32Array): Promise<ForwardPart> {
    const file = trainingFiles(bundle, part).forward;
    return new ForwardPart(options, await openSession(options, bundle.file(file), file, 1), params);
  }

  async run(inputs: { data: Float32Array; dim: number }[], rows: number): Promise<Float32Array> {
    if (rows === 0) return new Float32Array(0);
    const { Tensor } = this.options.ort;
    const values = [...inputs.map((x) => new Tensor("float32", x.data, [rows, x.dim])), new Tensor("float32", this.params, [this.params.length])];
    const feeds: Record<string, Ort.Tensor> = {};
    this.session.inputNames.forEach((name, i) => (feeds[name] = values[i]));
    const out = await this.session.run(feeds);
    return out[this.session.outputNames[0]].data as Float32Array;
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}

export function sigmoid32(x: number): number {
  const f = Math.fround;
  return f(1 / f(1 + f(Math.exp(f(-x)))));
}

/** P(LE should answer) per row, from GN's two-class logits [0, s]. */
export function gateFromLogits(logits: Float32Array): Float32Array {
  const out = new Float32Array(logits.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = sigmoid32(Math.fround(logits[2 * i + 1] - logits[2 * i]));
  return out;
}

/** The first largest logit of each row (NumPy's argmax). */
export function argmax(logits: Float32Array, classes: number, rows: number, offset = 0): Int32Array {
  const out = new Int32Array(rows);
  for (let i = 0; i < rows; i++) {
    const base = (offset + i) * classes;
    let best = 0;
    for (let c = 1; c < classes; c++) if (logits[base + c] > logits[base + best]) best = c;
    out[i] = best;
  }
  return out;
}

/** The given rows of a table of `dim` values per row, as a new table (the inputs of a forward program). */
export function gather(table: { data: Float32Array; dim: number }, rows: number[]): { data: Float32Array; dim: number } {
  const out = new Float32Array(rows.length * table.dim);
  rows.forEach((r, i) => out.set(table.data.subarray(r * table.dim, (r + 1) * table.dim), i * table.dim));
  return { data: out, dim: table.dim };
}
