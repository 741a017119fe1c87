/**
 * Training one part (LE or GN) with its step program: this module keeps the
 * flat parameters and AdamW's two moments, feeds them back in each step, and
 * pads a short batch with rows of weight 0 (the programs have a static
 * batch), as the Python runtime's `StepTrainer` (`device/backends/steps.py`).
 */

import type * as Ort from "onnxruntime-common";
import type { Bundle } from "./bundle.js";
import { BackendError, PersonalizationError } from "./errors.js";
import type { PartName, TrainablePart } from "./manifest.js";
import { parseNpy } from "./npy.js";
import { openSession, parameterCount, trainingFiles, type ProgramOptions } from "./programs.js";

/** Trains one part (LE or GN) by running its step program. */
export class StepTrainer {
  params: Float32Array;
  private m: Float32Array;
  private v: Float32Array;
  private t = 0;
  private lr = new Float32Array([1e-3]);
  readonly batch: number;
  private readonly buffers: Float32Array[];
  private readonly labels: Int32Array;
  private readonly rowWeights: Float32Array;
  private readonly dims: number[];

  private constructor(private readonly options: ProgramOptions, private readonly session: Ort.InferenceSession,
                      readonly spec: TrainablePart, private readonly part: PartName, dims: number[]) {
    this.batch = spec.max_batch;
    this.dims = dims;
    this.params = new Float32Array(0);
    this.m = new Float32Array(0);
    this.v = new Float32Array(0);
    this.buffers = dims.map((d) => new Float32Array(this.batch * d));
    this.labels = new Int32Array(this.batch);
    this.rowWeights = new Float32Array(this.batch);
  }

  /** `dims`: the width of each feature input (features D, and C for LE's base_logits). */
  static async open(bundle: Bundle, part: PartName, options: ProgramOptions, dims: number[]): Promise<StepTrainer> {
    const spec = bundle.manifest[part];
    const file = trainingFiles(bundle, part).step;
    const initial = parseNpy(bundle.file(spec.initial_parameters), spec.initial_parameters);
    const expected = parameterCount(spec);
    if (initial.data.length !== expected || !(initial.data instanceof Float32Array)) {
      throw new BackendError(`${spec.initial_parameters} holds ${initial.data.length} values, ${part} has ${expected} parameters`,
        "the bundle is damaged; re-export it");
    }
    const trainer = new StepTrainer(options, await openSession(options, bundle.file(file), file, 1), spec, part, dims);
    trainer.params = Float32Array.from(initial.data);
    trainer.m = new Float32Array(expected);
    trainer.v = new Float32Array(expected);
    return trainer;
  }

  setLearningRate(lr: number): void {
    this.lr = new Float32Array([lr]);
  }

  /** One AdamW step on `rows` rows gathered from the tables: `tables[i]` has `dims[i]` values per row. */
  async step(tables: Float32Array[], rowIndex: ArrayLike<number>, labels: ArrayLike<number>): Promise<number> {
    const rows = rowIndex.length;
    if (rows > this.batch) {
      throw new PersonalizationError(`a training batch of ${rows} rows is more than this bundle's ${this.part.replace("_", " ")} step program takes (${this.batch})`,
        "lower personalize.batch_size to the bundle's default or below");
    }
    for (let k = 0; k < tables.length; k++) {
      const d = this.dims[k];
      const buffer = this.buffers[k];
      const table = tables[k];
      for (let r = 0; r < rows; r++) buffer.set(table.subarray(rowIndex[r] * d, rowIndex[r] * d + d), r * d);
      buffer.fill(0, rows * d);
    }
    for (let r = 0; r < this.batch; r++) {
      this.labels[r] = r < rows ? labels[r] : 0;
      this.rowWeights[r] = r < rows ? 1 : 0;
    }
    this.t += 1;
    const { Tensor } = this.options.ort;
    const names = this.session.inputNames;
    const values: Ort.Tensor[] = [
      ...this.buffers.map((b, k) => new Tensor("float32", b, [this.batch, this.dims[k]])),
      new Tensor("int32", this.labels, [this.batch]),
      new Tensor("float32", this.rowWeights, [this.batch]),
      new Tensor("float32", new Float32Array([this.t]), [1]),
      new Tensor("float32", this.lr, [1]),
      new Tensor("float32", this.params, [this.params.length]),
      new Tensor("float32", this.m, [this.m.length]),
      new Tensor("float32", this.v, [this.v.length]),
    ];
    const feeds: Record<string, Ort.Tensor> = {};
    names.forEach((name, i) => (feeds[name] = values[i]));
    const out = await this.session.run(feeds);
    const [loss, params, m, v] = this.session.outputNames.map((name) => out[name].data as Float32Array);
    this.params = Float32Array.from(params);
    this.m = Float32Array.from(m);
    this.v = Float32Array.from(v);
    return loss[0];
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}
