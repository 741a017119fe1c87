// On an engine without WebCrypto (React Native), the SDK verifies with @noble/ed25519 and hashes with
// @noble/hashes, loaded on demand: the same bundles open, and the same tampering is refused.
import { test } from "node:test";
import assert from "node:assert/strict";
import { unzipSync, zipSync } from "fflate";
import * as ort from "onnxruntime-node";
import { usePortableCrypto, verifyEd25519 } from "../dist/crypto.js";
import { DeviceRuntime, MemoryStore } from "../dist/index.js";
import { bundleBytes, publicKey, skipWithoutFixtures } from "./helpers.mjs";

usePortableCrypto();

test("RFC 8032's test vector verifies, and a changed message does not", async () => {
  const hexBytes = (h) => Uint8Array.from(h.match(/../g), (b) => parseInt(b, 16));
  const key = hexBytes("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
  const signature = hexBytes("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b");
  assert.equal(await verifyEd25519(signature, new Uint8Array(0), key), true);
  assert.equal(await verifyEd25519(signature, new Uint8Array([0]), key), false);
});

test("a signed bundle opens, and a tampered manifest is refused", { skip: skipWithoutFixtures }, async () => {
  const rt = await DeviceRuntime.open(bundleBytes(), { ort, store: new MemoryStore(), trustedKeys: [publicKey()] });
  assert.ok(rt.bundle.signerId);
  await rt.close();
  const files = unzipSync(bundleBytes());
  files["manifest.json"] = new TextEncoder().encode(new TextDecoder().decode(files["manifest.json"]).replace('"seed": 0', '"seed": 1'));
  await assert.rejects(DeviceRuntime.open(zipSync(files), { ort, store: new MemoryStore(), trustedKeys: [publicKey()] }),
    /signature does not match/);
});
