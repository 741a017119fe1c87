// Bundles the device must refuse, exactly as the Python runtime does (device/trust.py), and a store
// whose write fails midway: the previous personalization stays in use.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { unzipSync, zipSync } from "fflate";
import * as ort from "onnxruntime-node";
import { BundleError, DeviceRuntime, LimitError, MemoryStore, StateError, TrustError } from "../dist/index.js";
import { FIXTURES, bundleBytes, loadSamples, publicKey, skipWithoutFixtures } from "./helpers.mjs";

function rezip(bytes, change) {
  const files = unzipSync(bytes);
  change(files);
  return zipSync(files);
}
const open = (bundle, store = new MemoryStore(), extra = {}) =>
  DeviceRuntime.open(bundle, { ort, store, trustedKeys: [publicKey()], ...extra });

test("refuses a tampered file, a tampered manifest and a swapped signature", { skip: skipWithoutFixtures }, async () => {
  const flipped = rezip(bundleBytes(), (f) => { f["ge.onnx"][1000] ^= 1; });
  await assert.rejects(open(flipped), (e) => e instanceof BundleError && /ge\.onnx does not match its sha256/.test(e.message) && /signed bundle/.test(e.message));
  const edited = rezip(bundleBytes(), (f) => {
    f["manifest.json"] = new TextEncoder().encode(new TextDecoder().decode(f["manifest.json"]).replace('"threshold": 0.5', '"threshold": 0.6'));
  });
  await assert.rejects(open(edited), /the signature does not match manifest\.json/);
  const wrongSignature = rezip(bundleBytes(), (f) => {
    const doc = JSON.parse(new TextDecoder().decode(f["signature.json"]));
    doc.signature = doc.signature.slice(0, 10) + (doc.signature[10] === "A" ? "B" : "A") + doc.signature.slice(11);
    f["signature.json"] = new TextEncoder().encode(JSON.stringify(doc));
  });
  await assert.rejects(open(wrongSignature), /signature does not match/);
  const missing = rezip(bundleBytes(), (f) => { delete f["le/step.onnx"]; });
  await assert.rejects(open(missing), /le\/step\.onnx is missing/);
});

test("a state that pins a key refuses unsigned and foreign bundles, for good", { skip: skipWithoutFixtures }, async () => {
  const unsigned = rezip(bundleBytes(), (f) => { delete f["signature.json"]; });
  await assert.rejects(open(unsigned), (e) => e instanceof TrustError && /is not signed/.test(e.message));
  const store = new MemoryStore();
  await (await open(bundleBytes(), store)).close();
  // no keys given now: the state remembers the pinned one
  await assert.rejects(DeviceRuntime.open(unsigned, { ort, store }), TrustError);
  if (FIXTURES.otherKey) {
    await assert.rejects(DeviceRuntime.open(bundleBytes(), { ort, store: new MemoryStore(), trustedKeys: [readFileSync(FIXTURES.otherKey, "utf8")] }),
      (e) => e instanceof TrustError && /which this state does not trust/.test(e.message));
  }
  // an unpinned state runs an unsigned bundle, and says so
  const rt = await DeviceRuntime.open(unsigned, { ort, store: new MemoryStore() });
  assert.match(rt.warnings.join("\n"), /not signed/);
  await rt.close();
});

test("refuses rollback and expired bundles", { skip: skipWithoutFixtures }, async () => {
  const store = new MemoryStore();
  await (await open(bundleBytes(), store)).close();
  const old = process.env.EDGETAILOR_TEST_OLD_BUNDLE;
  if (old) {
    await assert.rejects(open(new Uint8Array(readFileSync(old)), store), (e) => e instanceof TrustError && /a rollback/.test(e.message));
  }
  const expires = (await open(bundleBytes())).bundle.manifest.release?.expires;
  if (expires) {
    const later = () => new Date(Date.parse(expires) + 1000);
    await assert.rejects(open(bundleBytes(), new MemoryStore(), { now: later }), /expired/);
  }
});

test("refuses oversized and malformed input before inflating it", { skip: skipWithoutFixtures }, async () => {
  await assert.rejects(open(bundleBytes(), new MemoryStore(), { limits: { maxBundleBytes: 100_000 } }),
    (e) => e instanceof LimitError && /maxBundleBytes/.test(e.message));
  await assert.rejects(open(new Uint8Array([80, 75, 3, 4, 1, 2, 3])), /readable \.zip/);
  const deep = rezip(bundleBytes(), (f) => { delete f["signature.json"]; f["manifest.json"] = new TextEncoder().encode("[".repeat(100) + "]".repeat(100)); });
  await assert.rejects(DeviceRuntime.open(deep, { ort, store: new MemoryStore() }), /maxJsonDepth/);
  await assert.rejects(DeviceRuntime.open(bundleBytes(), { store: new MemoryStore() }), /needs \{ ort \}/);
  const escaping = rezip(bundleBytes(), (f) => { f["../evil.sh"] = new Uint8Array([1]); });
  await assert.rejects(open(escaping), /not a plain relative path/);
  const hugeManifest = rezip(bundleBytes(), (f) => { f["manifest.json"] = new Uint8Array(3 << 20).fill(32); });
  await assert.rejects(open(hugeManifest), (e) => e instanceof LimitError && /maxManifestBytes/.test(e.message));
  await assert.rejects(open(bundleBytes(), new MemoryStore(), { trustedKeys: ["not a key"] }), /not a PEM public key/);
});

class FailingStore extends MemoryStore {
  failOn = null;
  async put(key, value) {
    if (this.failOn && this.failOn(key)) throw new Error("ENOSPC: no space left on device");
    return super.put(key, value);
  }
}

test("a write that fails midway keeps the previous personalization and the samples", { skip: skipWithoutFixtures }, async () => {
  const s = loadSamples();
  const store = new FailingStore();
  const rt = await open(bundleBytes(), store);
  await rt.addSamples(s.trainX, s.trainY);
  await rt.personalize({ overrides: { le_epochs: 10, gn_steps: 20 } });
  const first = rt.personalizationId;
  const answers = Array.from((await rt.predict(s.testX)).indices);
  for (const failOn of [(k) => k.endsWith("/gn"), (k) => k === "state.json"]) {
    store.failOn = failOn;
    await assert.rejects(rt.personalize({ overrides: { le_epochs: 12, gn_steps: 20 } }),
      (e) => e instanceof StateError && /no space left/.test(e.message) && /intact/.test(e.hint));
    store.failOn = null;
    assert.equal(rt.personalizationId, first);
    const reopened = await open(bundleBytes(), store);
    assert.equal(reopened.personalizationId, first, "the store still points at the previous personalization");
    assert.equal(reopened.sampleCount(), s.trainY.length);
    assert.deepEqual(Array.from((await reopened.predict(s.testX)).indices), answers);
    await reopened.close();
  }
  store.failOn = (k) => k.startsWith("samples/");
  await assert.rejects(rt.addSamples(s.trainX.subarray(0, 784), [1]), /could not store/);
  store.failOn = null;
  assert.equal(rt.sampleCount(), s.trainY.length);
  // a damaged weights record: GE answers alone and says why
  const record = (await store.keys()).find((k) => k.endsWith("/le"));
  const bytes = await store.get(record);
  bytes[bytes.length - 1] ^= 1;
  await store.put(record, bytes);
  const damaged = await open(bundleBytes(), store);
  assert.equal(damaged.personalized, false);
  assert.match(damaged.personalizationProblem, /damaged/);
  await damaged.personalize({ overrides: { le_epochs: 5, gn_steps: 10 } });
  assert.ok(damaged.personalized);
  await damaged.reset({ deleteSamples: true });
  assert.equal(damaged.sampleCount(), 0);
  assert.equal(damaged.personalized, false);
  await damaged.close();
  await rt.close();
});
