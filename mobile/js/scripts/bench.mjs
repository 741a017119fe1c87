// The SDK's side of benchmarks/mobile_sdk.py: for one bundle and one user's samples, open and verify the
// bundle (the first open in this process, then warm ones), personalize `repeats` times and predict, in Node
// with onnxruntime-node. Prints one JSON object.
//
//   node scripts/bench.mjs BUNDLE.zip signing.pub samples.npz [repeats] [seed]
import { readFileSync } from "node:fs";
import * as ort from "onnxruntime-node";
import { DeviceRuntime, MemoryStore } from "../dist/index.js";
import { parseNpz } from "../dist/npy.js";

const [bundlePath, keyPath, samplesPath, repeatsText = "1", seedText = "0"] = process.argv.slice(2);
const key = readFileSync(keyPath, "utf8");
const arrays = parseNpz(new Uint8Array(readFileSync(samplesPath)), samplesPath);
const labels = (a) => Int32Array.from(a.data, Number);
const now = () => performance.now() / 1000;

const opens = [];
let rt;
for (let i = 0; i < 6; i++) {
  const started = now();
  const bytes = new Uint8Array(readFileSync(bundlePath)); // reading the file is part of opening it
  const opened = await DeviceRuntime.open(bytes, { ort, store: new MemoryStore(), trustedKeys: [key] });
  opens.push(now() - started);
  if (rt) await opened.close();
  else rt = opened;
}
const before = await rt.predict(arrays.test_x.data);
await rt.addSamples(arrays.train_x.data, labels(arrays.train_y));
const times = [];
let report;
for (let i = 0; i < Number(repeatsText); i++) {
  const started = now();
  report = await rt.personalize({ overrides: { seed: Number(seedText) } });
  times.push(now() - started);
}
const after = await rt.predict(arrays.test_x.data);
const truth = labels(arrays.test_y);
const accuracy = (p) => p.indices.filter((v, i) => v === truth[i]).length / truth.length;
console.log(JSON.stringify({
  open_seconds_first: opens[0], open_seconds_warm: opens.slice(1).sort((a, b) => a - b)[2],
  personalize_seconds: times, train_seconds: report.train_seconds, threshold: report.gate_threshold, le_steps: report.le_steps,
  before: { indices: Array.from(before.indices), experts: before.experts },
  after: { indices: Array.from(after.indices), experts: after.experts },
  accuracy_before: accuracy(before), accuracy_after: accuracy(after), bundle_id: rt.bundle.bundleId,
}));
await rt.close();
