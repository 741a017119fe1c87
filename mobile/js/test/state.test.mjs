// The device state on a Store: changes take turns (nothing lost when calls overlap), the same sample is kept
// once, the samples' labels bind the store to a bundle, tidying touches only the state's own records, a
// damaged index opens read-only and is repaired from the sample records, and what the device trusts only grows.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, readdirSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { unzipSync, zipSync } from "fflate";
import * as ort from "onnxruntime-node";
import { DeviceRuntime, MemoryStore, StateError, TrustError } from "../dist/index.js";
import { NodeFileStore } from "../dist/node.js";
import { bundleBytes, loadSamples, publicKey, skipWithoutFixtures } from "./helpers.mjs";

const QUICK = { le_epochs: 8, gn_steps: 20 };
const open = (store, bundle = bundleBytes(), keys = [publicKey()]) => DeviceRuntime.open(bundle, { ort, store, trustedKeys: keys });
const one = (s, i) => s.trainX.subarray(i * 784, (i + 1) * 784);

test("overlapping calls take turns: no sample or personalization is lost", { skip: skipWithoutFixtures }, async () => {
  const s = loadSamples();
  const store = new MemoryStore();
  const rt = await open(store);
  const [a, b] = await Promise.all([rt.addSamples(s.trainX.subarray(0, 50 * 784), s.trainY.subarray(0, 50)),
    rt.addSamples(s.trainX.subarray(50 * 784), s.trainY.subarray(50))]);
  assert.equal(a + b, 100);
  assert.equal(rt.sampleCount(), 100);
  // a sample added while personalize trains: stored, and the personalization retrains to include it
  const extra = new Uint8Array(one(s, 0));
  extra[300] ^= 0x40;
  const [report, added] = await Promise.all([rt.personalize({ overrides: QUICK }), rt.addSamples(extra, [s.trainY[0]])]);
  assert.equal(added, 1);
  const again = await open(store);
  assert.equal(again.sampleCount(), 101);
  assert.ok(again.personalized);
  assert.equal(report.n_samples, 101, "the committed personalization covers the sample added during training");
  await again.close();
  await rt.close();
});

test("the same image with the same label is stored once, as in Python", { skip: skipWithoutFixtures }, async () => {
  const s = loadSamples();
  const rt = await open(new MemoryStore());
  assert.equal(await rt.addSamples(s.trainX.subarray(0, 10 * 784), s.trainY.subarray(0, 10)), 10);
  assert.equal(await rt.addSamples(s.trainX.subarray(0, 10 * 784), s.trainY.subarray(0, 10)), 0);
  assert.equal(await rt.addSamples(one(s, 0), [(s.trainY[0] + 1) % 10]), 1, "another label is another sample");
  assert.equal(rt.sampleCount(), 11);
  await rt.close();
});

test("a store keeps to the labels of the bundle its samples were stored for", { skip: skipWithoutFixtures }, async () => {
  const store = new MemoryStore();
  await (await open(store, bundleBytes(), [])).close();
  const files = unzipSync(bundleBytes());
  delete files["signature.json"];
  const manifest = JSON.parse(new TextDecoder().decode(files["manifest.json"]));
  manifest.labels = manifest.labels.map((l) => `digit ${l}`);
  files["manifest.json"] = new TextEncoder().encode(JSON.stringify(manifest));
  await assert.rejects(open(store, zipSync(files), []), (e) => e instanceof StateError && /holds samples for labels/.test(e.message));
});

test("reset tidies only the state's own records", { skip: skipWithoutFixtures }, async () => {
  const s = loadSamples();
  const dir = mkdtempSync(join(tmpdir(), "edgetailor-state-"));
  try {
    mkdirSync(join(dir, "photos"));
    writeFileSync(join(dir, "photos", "a.jpg"), "not ours");
    writeFileSync(join(dir, "notes.txt"), "not ours either");
    writeFileSync(join(dir, "state.json.partial-999999999-x"), "left by a writer that died");
    const rt = await open(new NodeFileStore(dir));
    await rt.addSamples(s.trainX, s.trainY);
    await rt.personalize({ overrides: QUICK });
    await rt.personalize({ overrides: QUICK });
    await rt.reset({ deleteSamples: true });
    assert.ok(existsSync(join(dir, "photos", "a.jpg")) && existsSync(join(dir, "notes.txt")));
    assert.ok(!existsSync(join(dir, "state.json.partial-999999999-x")), "a dead writer's temporary is removed");
    assert.deepEqual(readdirSync(join(dir, "samples")), []);
    await rt.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a damaged index opens read-only, GE answers, and reset() repairs it keeping the samples", { skip: skipWithoutFixtures }, async () => {
  const s = loadSamples();
  const store = new MemoryStore();
  const rt = await open(store);
  await rt.addSamples(s.trainX, s.trainY);
  await rt.personalize({ overrides: QUICK });
  await rt.close();
  await store.put("state.json", new TextEncoder().encode('{"format": "edgetailor-sdk-state", "vers'));
  const damaged = await open(store);
  assert.match(damaged.warnings.join("\n"), /state\.json is damaged/);
  assert.equal(damaged.personalized, false);
  assert.equal((await damaged.predict(s.testX)).experts.every((e) => e === "GE"), true);
  await assert.rejects(damaged.addSamples(one(s, 0), [1]), (e) => e instanceof StateError && /repair/.test(e.hint));
  await assert.rejects(damaged.personalize(), /cannot personalize/);
  await damaged.reset();
  assert.equal(damaged.sampleCount(), 100, "every intact sample survives the repair");
  await damaged.personalize({ overrides: QUICK });
  assert.ok(damaged.personalized);
  await damaged.close();
  // trust is kept apart: the repaired state still refuses an unsigned bundle
  const files = unzipSync(bundleBytes());
  delete files["signature.json"];
  await assert.rejects(DeviceRuntime.open(zipSync(files), { ort, store }), TrustError);
});

test("an unsigned twin of the accepted version does not displace the signed one", { skip: skipWithoutFixtures }, async () => {
  const store = new MemoryStore(); // a state that pins no key runs unsigned bundles
  await (await open(store, bundleBytes(), [])).close();
  const files = unzipSync(bundleBytes());
  delete files["signature.json"];
  files["manifest.json"] = new TextEncoder().encode(new TextDecoder().decode(files["manifest.json"]).replace('"seed": 0', '"seed": 3'));
  await (await open(store, zipSync(files), [])).close();
  const signed = await open(store, bundleBytes(), []);
  assert.ok(signed.bundle.signerId);
  await signed.close();
});
