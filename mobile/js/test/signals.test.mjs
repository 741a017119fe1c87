// Sensor windows and audio clips: bundles of the timeseries and audio modalities (manifest version 3),
// exported and signed by Python. The SDK augments their samples as Python does, from the same NumPy
// stream, and personalizes like the Python runtime on the same samples and seed.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { DeviceRuntime, MemoryStore, SampleError } from "../dist/index.js";
import { NodeFileStore } from "../dist/node.js";
import { Bundle } from "../dist/bundle.js";
import { resolveLimits } from "../dist/limits.js";
import { augment } from "../dist/augment.js";
import { parseNpz } from "../dist/npy.js";
import { NumpyRandom } from "../dist/rng.js";

const INDEX = process.env.EDGETAILOR_TEST_SIGNALS;
const signals = INDEX && existsSync(INDEX) ? JSON.parse(readFileSync(INDEX, "utf8")) : null;
const skip = signals ? false
  : "needs bundles exported by Python: run `.venv/bin/python -m pytest tests/mobile` from the repository root";
const key = () => readFileSync(signals.key, "utf8");
const npz = (path) => parseNpz(new Uint8Array(readFileSync(path)), path);
const labels = (a) => Int32Array.from(a.data, Number);
// how close the SDK's augmented copies must be to NumPy's (measured: an ulp or two): windows are interpolated in float64 as NumPy
// does (only their spread is summed in another order); clips also pass through an FFT of another order
const TOLERANCE = { timeseries: 1e-6, audio: 1e-6 };

for (const name of ["timeseries", "audio"]) {
  test(`${name}: augmented copies are NumPy's (shift, gain, noise, masks; jitter, scaling, warp)`, { skip }, async (t) => {
    const c = signals.cases[name];
    const bundle = await Bundle.open(new Uint8Array(readFileSync(c.bundle)), resolveLimits());
    const spec = bundle.manifest.input;
    const fixture = npz(c.augment);
    const n = fixture.x.shape[0];
    const copies = Number(fixture.copies.data[0]);
    const got = augment(spec, fixture.x.data, n, copies, new NumpyRandom(Number(fixture.seed.data[0])));
    const want = fixture.expected.data;
    assert.equal(got.length, want.length);
    let worst = 0;
    for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]));
    t.diagnostic(`largest difference from NumPy's copies: ${worst}`);
    assert.ok(worst <= TOLERANCE[name], `largest difference from NumPy's copies: ${worst}`);
    assert.deepEqual(Array.from(got.subarray(0, n * spec.shape.reduce((a, b) => a * b, 1))), Array.from(fixture.x.data),
      "the originals come first, unchanged");
  });

  test(`${name}: personalizes like the Python runtime`, { skip }, async (t) => {
    const c = signals.cases[name];
    const s = npz(c.samples);
    const reference = JSON.parse(readFileSync(c.python, "utf8"));
    const dir = mkdtempSync(join(tmpdir(), "edgetailor-js-"));
    try {
      const rt = await DeviceRuntime.open(new Uint8Array(readFileSync(c.bundle)), { ort, store: new NodeFileStore(dir), trustedKeys: [key()] });
      assert.equal(rt.modality, name);
      assert.equal(rt.bundle.bundleId, reference.bundle_id);
      const before = await rt.predict(s.test_x.data);
      assert.deepEqual(Array.from(before.indices), reference.before.indices, "GE alone answers exactly as in Python");
      assert.equal(await rt.addSamples(s.train_x.data, labels(s.train_y)), s.train_y.shape[0]);
      assert.equal(await rt.addSamples(s.train_x.data, labels(s.train_y)), 0, "the same samples are stored once");
      const report = await rt.personalize();
      assert.equal(report.le_steps, reference.le_steps);
      assert.ok(report.augment_copies > 0 && report.other_samples_ignored === 0);
      const after = await rt.predict(s.test_x.data);
      const truth = labels(s.test_y);
      const agree = after.indices.filter((v, i) => v === reference.after.indices[i]).length / truth.length;
      const accuracy = after.indices.filter((v, i) => v === truth[i]).length / truth.length;
      t.diagnostic(`agreement with Python ${agree}, accuracy ${reference.accuracy_before} -> ${accuracy} (Python ` +
        `${reference.accuracy_after}), threshold ${report.gate_threshold} (Python ${reference.threshold})`);
      assert.ok(agree >= 0.95, `JS and Python agree on ${agree} of the predictions`);
      assert.ok(Math.abs(accuracy - reference.accuracy_after) <= 0.05, `accuracy ${accuracy} vs Python ${reference.accuracy_after}`);
      assert.ok(Math.abs(report.gate_threshold - reference.threshold) < 1e-2, `threshold ${report.gate_threshold} vs ${reference.threshold}`);
      await rt.close();

      // a restart finds the float samples and the personalization in the store
      const again = await DeviceRuntime.open(new Uint8Array(readFileSync(c.bundle)), { ort, store: new NodeFileStore(dir) });
      assert.equal(again.sampleCount(), s.train_y.shape[0]);
      assert.ok(again.personalized);
      assert.deepEqual(Array.from((await again.predict(s.test_x.data)).indices), Array.from(after.indices));
      await again.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

test("refuses windows of the wrong length, NaN, and empty, silent or clipped clips, naming each", { skip }, async () => {
  const windows = await DeviceRuntime.open(new Uint8Array(readFileSync(signals.cases.timeseries.bundle)), { ort, store: new MemoryStore() });
  const [channels, length] = windows.bundle.manifest.input.shape;
  await assert.rejects(windows.addSamples(new Float32Array(channels * (length - 1)), [0]),
    (e) => e instanceof SampleError && /not a whole number of windows of 3 channel\(s\) x 64 steps/.test(e.message));
  await assert.rejects(windows.addSamples([new Float32Array(channels * length), new Float32Array(7)], [0, 1]),
    (e) => e instanceof SampleError && /window 1 holds 7 values/.test(e.message));
  const nan = new Float32Array(2 * channels * length);
  nan[channels * length + 5] = NaN;
  await assert.rejects(windows.addSamples(nan, [0, 1]), (e) => e instanceof SampleError && /NaN or infinite values \(the first is window 1\)/.test(e.message));
  await assert.rejects(windows.addSamples(new Float32Array(channels * length), ["no-such-gesture"]), (e) => /unknown label/.test(e.message));
  assert.equal(windows.sampleCount(), 0, "nothing was stored");
  await windows.close();

  const clips = await DeviceRuntime.open(new Uint8Array(readFileSync(signals.cases.audio.bundle)), { ort, store: new MemoryStore() });
  const tone = (n, amplitude) => Float32Array.from({ length: n }, (_, t) => amplitude * Math.sin(t / 3));
  await assert.rejects(clips.addSamples([new Float32Array(0)], [0]), (e) => e instanceof SampleError && /clip 0 is empty/.test(e.message));
  await assert.rejects(clips.addSamples([tone(4000, 0.3), new Float32Array(4000)], [0, 1]), (e) => e instanceof SampleError && /clip 1 is silent/.test(e.message));
  const loud = tone(4000, 0.3).map((v, t) => (t % 10 === 0 ? 1 : v));
  await assert.rejects(clips.addSamples([loud], [0]), (e) => e instanceof SampleError && /clip 0 is clipped: 10.0% of its samples/.test(e.message));
  await assert.rejects(clips.addSamples([tone(4000, 2)], [0]), (e) => e instanceof SampleError && /goes to 2.00/.test(e.message));
  // clips of any length are fitted to the bundle's: a short one centred, a long one cut to its loudest stretch
  assert.equal(await clips.addSamples([tone(1000, 0.3), tone(9000, 0.3), Int16Array.from(tone(4000, 9000))], [0, 1, 2]), 3);
  assert.equal(clips.sampleCount(), 3);
  await clips.close();
});

test("a bundle's augmentation parameters are checked as Python checks them, each bad one named", async () => {
  const { augmentProblem } = await import("../dist/modalities.js");
  const audio = { shape: [1, 4000], scale: 1, mean: 0, std: 1, modality: "audio" };
  assert.equal(augmentProblem(audio), null);
  assert.equal(augmentProblem({ ...audio, augment: { shift: 0.2, snr_db: [10, 30] } }), null);
  assert.match(augmentProblem({ ...audio, augment: { snr_db: 20 } }), /input.augment.snr_db must be a pair of finite number/);
  assert.match(augmentProblem({ ...audio, augment: { time_mask: 1.5 } }), /input.augment.time_mask is a share of the input and must be under 1/);
  assert.match(augmentProblem({ ...audio, augment: { loudness: 3 } }), /key\(s\) loudness that audio augmentation lacks/);
  assert.match(augmentProblem({ ...audio, augment: { gain_db: -1 } }), /input.augment.gain_db must be a finite number/);
  const windows = { shape: [3, 64], scale: 1, mean: 0, std: 1, modality: "timeseries" };
  assert.match(augmentProblem({ ...windows, augment: { warp: 0.7 } }), /warp is a share of the input and must be under 0.5/);
  assert.match(augmentProblem({ ...windows, augment: { name: "audio-v1" } }), /timeseries inputs are augmented by "sensor-v1"/);
  const glyphs = { shape: [1, 28, 28], scale: 1 / 255, mean: 0, std: 1 };
  assert.equal(augmentProblem({ ...glyphs, augment: { rotation: 6.0 } }), null);
  assert.match(augmentProblem({ ...glyphs, augment: { rotation: 20 } }), /a glyph bundle's augmentation is fixed/);
});
