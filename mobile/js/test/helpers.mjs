// Fixtures the Python test harness (tests/mobile/test_js_sdk.py) makes and names by environment variables:
// a signed bundle exported by Python, its publisher key, user samples and the Python runtime's answers.
import { readFileSync, existsSync } from "node:fs";
import { parseNpz } from "../dist/npy.js";

export const FIXTURES = {
  bundle: process.env.EDGETAILOR_TEST_BUNDLE,
  key: process.env.EDGETAILOR_TEST_KEY,
  otherKey: process.env.EDGETAILOR_TEST_OTHER_KEY,
  samples: process.env.EDGETAILOR_TEST_SAMPLES,
  python: process.env.EDGETAILOR_TEST_PYTHON,
};

export const haveFixtures = Boolean(FIXTURES.bundle && FIXTURES.key && FIXTURES.samples && existsSync(FIXTURES.bundle));
export const skipWithoutFixtures = haveFixtures ? false
  : "needs a bundle exported by Python: run `.venv/bin/python -m pytest tests/mobile` from the repository root";

export function loadSamples() {
  const arrays = parseNpz(new Uint8Array(readFileSync(FIXTURES.samples)), FIXTURES.samples);
  const labels = (a) => Int32Array.from(a.data, Number);
  return {
    trainX: arrays.train_x.data, trainY: labels(arrays.train_y),
    testX: arrays.test_x.data, testY: labels(arrays.test_y),
  };
}

export const bundleBytes = () => new Uint8Array(readFileSync(FIXTURES.bundle));
export const publicKey = () => readFileSync(FIXTURES.key, "utf8");
