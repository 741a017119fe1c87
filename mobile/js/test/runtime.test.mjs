// The SDK end to end in Node, on a bundle Python exported and signed: open and verify, personalize,
// predict and evaluate, then compare with the Python device runtime on the same samples and seed.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { DeviceRuntime, MemoryStore, SampleError } from "../dist/index.js";
import { NodeFileStore } from "../dist/node.js";
import { normalize } from "../dist/programs.js";
import { FIXTURES, bundleBytes, loadSamples, publicKey, skipWithoutFixtures } from "./helpers.mjs";

const python = () => JSON.parse(readFileSync(FIXTURES.python, "utf8"));

test("personalizes like the Python runtime: same predictions, same accuracy", { skip: skipWithoutFixtures }, async (t) => {
  const s = loadSamples();
  const dir = mkdtempSync(join(tmpdir(), "edgetailor-js-"));
  try {
    const rt = await DeviceRuntime.open(FIXTURES.bundle, { ort, store: new NodeFileStore(dir), trustedKeys: [publicKey()] });
    const reference = python();
    assert.equal(rt.bundle.bundleId, reference.bundle_id, "the bundle id is the Python runtime's");
    assert.deepEqual(rt.warnings, []);
    const before = await rt.predict(s.testX);
    assert.ok(before.experts.every((e) => e === "GE"), "before personalizing, GE answers everything");
    const agreeBefore = before.indices.filter((v, i) => v === reference.before.indices[i]).length / before.indices.length;
    assert.equal(agreeBefore, 1, "GE alone answers exactly as in Python");
    assert.equal(await rt.addSamples(s.trainX, s.trainY), s.trainY.length);
    const stages = new Set();
    const report = await rt.personalize({ onProgress: (stage) => stages.add(stage) });
    assert.deepEqual([...stages], ["features", "local expert", "gating network"]);
    assert.equal(report.le_steps, reference.le_steps);
    const after = await rt.predict(s.testX);
    const agree = after.indices.filter((v, i) => v === reference.after.indices[i]).length / after.indices.length;
    const accuracy = after.indices.filter((v, i) => v === s.testY[i]).length / s.testY.length;
    t.diagnostic(`agreement with Python ${agree}, accuracy ${accuracy} (Python ${reference.accuracy_after}), threshold ${report.gate_threshold} (Python ${reference.threshold})`);
    assert.ok(agree >= 0.98, `JS and Python agree on ${agree} of the predictions`);
    assert.ok(Math.abs(accuracy - reference.accuracy_after) <= 0.01, `accuracy ${accuracy} vs Python ${reference.accuracy_after}`);
    assert.ok(Math.abs(report.gate_threshold - reference.threshold) < 1e-4, `threshold ${report.gate_threshold} vs ${reference.threshold}`);
    assert.ok(after.experts.includes("LE"));
    const m = await rt.evaluate(s.testX, Array.from(s.testY, (i) => rt.labels[i]));
    assert.equal(m.n, s.testY.length);
    assert.equal(m.experts.GE + m.experts.LE, m.n);
    assert.ok(Math.abs(m.accuracy - accuracy) < 1e-12);
    await rt.close();

    // a restart finds the samples and the personalization in the store
    const again = await DeviceRuntime.open(FIXTURES.bundle, { ort, store: new NodeFileStore(dir) });
    assert.equal(again.sampleCount(), s.trainY.length);
    assert.ok(again.personalized);
    assert.deepEqual(Array.from((await again.predict(s.testX)).indices), Array.from(after.indices));
    await again.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the same seed gives the same personalization", { skip: skipWithoutFixtures }, async () => {
  const s = loadSamples();
  const runs = [];
  for (let i = 0; i < 2; i++) {
    const rt = await DeviceRuntime.open(bundleBytes(), { ort, store: new MemoryStore(), trustedKeys: [publicKey()] });
    await rt.addSamples(s.trainX.subarray(0, 40 * 784), s.trainY.subarray(0, 40));
    const report = await rt.personalize({ overrides: { le_epochs: 20, gn_steps: 50 } });
    runs.push({ report, program: await rt.exportPersonalized() });
    await rt.close();
  }
  assert.equal(runs[0].report.le_loss, runs[1].report.le_loss);
  assert.deepEqual(runs[0].program, runs[1].program);
});

test("the exported personalized program answers as predict does", { skip: skipWithoutFixtures }, async () => {
  const s = loadSamples();
  const rt = await DeviceRuntime.open(bundleBytes(), { ort, store: new MemoryStore(), trustedKeys: [publicKey()] });
  await assert.rejects(rt.exportPersonalized(), /nothing to export/);
  await rt.addSamples(s.trainX, s.trainY);
  await rt.personalize({ overrides: { le_epochs: 30 } });
  const program = await rt.exportPersonalized();
  const session = await ort.InferenceSession.create(program);
  const { samples, count } = rt.prepare(s.testX);
  const x = normalize(samples, rt.bundle.manifest.input, new Float32Array(count * 784));
  const out = await session.run({ image: new ort.Tensor("float32", x, [count, 1, 28, 28]) });
  const p = await rt.predict(s.testX);
  const expert = Array.from(out.expert.data, (e) => (e > 0.5 ? "LE" : "GE"));
  const agreeExpert = expert.filter((e, i) => e === p.experts[i]).length / count;
  assert.ok(agreeExpert >= 0.99, `the program routes ${agreeExpert} as predict does`);
  await session.release();
  await rt.close();
});

test("refuses bad images and unknown labels, naming the problem", { skip: skipWithoutFixtures }, async () => {
  const rt = await DeviceRuntime.open(bundleBytes(), { ort, store: new MemoryStore(), trustedKeys: [publicKey()] });
  const s = loadSamples();
  await assert.rejects(rt.addSamples(new Uint8Array(700), [1]), (e) => e instanceof SampleError && /not a whole number of 28x28/.test(e.message));
  await assert.rejects(rt.addSamples(s.trainX.subarray(0, 784), ["seven"]), (e) => e instanceof SampleError && /unknown label/.test(e.message) && /knows: 0, 1/.test(e.hint));
  await assert.rejects(rt.addSamples(s.trainX.subarray(0, 784), [10]), /unknown label/);
  await assert.rejects(rt.addSamples(s.trainX.subarray(0, 1568), [1]), /2 images but 1 labels/);
  const nan = new Float32Array(784).fill(0.5);
  nan[3] = NaN;
  await assert.rejects(rt.addSamples(nan, [1]), /NaN/);
  await assert.rejects(rt.addSamples(new Float32Array(784).fill(2), [1]), /\[0, 1\]/);
  await assert.rejects(rt.addSamples(new Uint8Array(784), [1]), /no usable ink/);
  await assert.rejects(rt.predict({ data: new Uint8Array(30 * 20 * 2), width: 20, height: 30, channels: 2 }), /channels must be 1, 3 or 4/);
  await assert.rejects(rt.personalize(), /no samples stored/);
  await rt.addSamples(s.trainX.subarray(0, 784 * 3), [s.trainY[0], s.trainY[0], s.trainY[0]].map(Number));
  await assert.rejects(rt.personalize(), (e) => /have the label/.test(e.message) && /at least two labels/.test(e.hint));
  assert.equal(rt.sampleCount(), 3, "refused samples were not stored");
  // any size: a 56x56 version of a sample is read as the same digit
  const big = new Uint8Array(56 * 56);
  for (let r = 0; r < 56; r++) for (let c = 0; c < 56; c++) big[r * 56 + c] = s.testX[(r >> 1) * 28 + (c >> 1)];
  const small = await rt.predict(s.testX.subarray(0, 784));
  assert.equal((await rt.predict({ data: big, width: 56, height: 56 })).labels[0], small.labels[0]);
  await rt.close();
});
