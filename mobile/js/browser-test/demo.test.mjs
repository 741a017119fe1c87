/**
 * The web demo (demo/index.html) in headless Chromium, end to end: it opens a
 * signed bundle with its key pinned, takes one digit drawn with the mouse and
 * the test user's samples, predicts, personalizes in the page (onnxruntime-web,
 * one thread), predicts again, keeps the personalization across a reload, and
 * refuses a tampered bundle and a bundle signed by a key it does not trust.
 *
 * Needs Chromium (CHROMIUM_PATH, or /usr/bin/chromium[-browser]) and the
 * fixtures the Python test harness makes:
 *   EDGETAILOR_TEST_BUNDLE   a signed bundle .zip
 *   EDGETAILOR_TEST_KEY      its signing.pub
 *   EDGETAILOR_TEST_SAMPLES  an .npz: train_x uint8 (N,28,28), train_y int64 (N,), test_x, test_y
 * and `npm run build && npm run bundle` (npm run test:browser does both).
 *
 * Writes test-output/demo.png (the page after personalizing),
 * test-output/demo-refused.png (after the tampered bundle) and
 * test-output/browser.json (personalize time and accuracies).
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { generateKeyPairSync } from "node:crypto";
import { existsSync } from "node:fs";
import { copyFile, mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const OUT = path.join(ROOT, "test-output");
const FIXTURES = path.join(OUT, "browser"); // served as /test-output/browser/
const PIXELS = 28 * 28;

const chromiumPath = [process.env.CHROMIUM_PATH, "/usr/bin/chromium", "/usr/bin/chromium-browser"].find((p) => p && existsSync(p));
const fixtures = {
  bundle: process.env.EDGETAILOR_TEST_BUNDLE,
  key: process.env.EDGETAILOR_TEST_KEY,
  samples: process.env.EDGETAILOR_TEST_SAMPLES,
};
const missing = Object.entries({ EDGETAILOR_TEST_BUNDLE: fixtures.bundle, EDGETAILOR_TEST_KEY: fixtures.key, EDGETAILOR_TEST_SAMPLES: fixtures.samples })
  .filter(([, v]) => !v).map(([k]) => k);
const skip = !chromiumPath
  ? "install Chromium (Debian: apt-get install chromium) to run the browser test"
  : missing.length
    ? `set ${missing.join(", ")} to run the browser test (the Python test harness sets them: a signed bundle, its signing.pub and an .npz of samples)`
    : false;

let server;
let baseUrl;
let browser;
let data;
let logs = []; // the pages' errors and console output, shown when a step fails

/** Start scripts/serve.mjs on a free port; resolves with its URL. */
function startServer() {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(ROOT, "scripts", "serve.mjs"), "0"], { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    const timer = setTimeout(() => reject(new Error(`serve.mjs printed no URL in 10 s: ${out}${err}`)), 10_000);
    child.stdout.on("data", (chunk) => {
      out += chunk;
      const m = /serving (http:\/\/\S+\/)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({ child, url: m[1] });
      }
    });
    child.stderr.on("data", (chunk) => { err += chunk; });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`serve.mjs exited with ${code}: ${err}`));
    });
  });
}

/** A copy of the bundle with one byte of manifest.json changed (a file's sha256), zipped again. */
async function tamperedBundle(bytes) {
  const { unzipSync, zipSync } = await import("fflate");
  const members = unzipSync(bytes);
  const manifest = members["manifest.json"];
  const text = new TextDecoder().decode(manifest);
  const at = text.search(/"[0-9a-f]{64}"/) + 1; // the first hash in it: still valid JSON, no longer what was signed
  assert.ok(at > 0, "the manifest lists no sha256");
  const copy = manifest.slice();
  copy[at] = copy[at] === 0x30 ? 0x31 : 0x30;
  return zipSync({ ...members, "manifest.json": copy });
}

function anotherKeyPem() {
  return generateKeyPairSync("ed25519").publicKey.export({ type: "spki", format: "pem" }).toString();
}

/** A "7" drawn with real mouse strokes on the pad. */
async function drawSeven(page) {
  await page.click("#clear");
  const box = await page.locator("#pad").boundingBox();
  const at = (x, y) => [box.x + x * box.width, box.y + y * box.height];
  await page.mouse.move(...at(0.28, 0.22));
  await page.mouse.down();
  await page.mouse.move(...at(0.74, 0.22), { steps: 12 });
  await page.mouse.move(...at(0.45, 0.82), { steps: 18 });
  await page.mouse.up();
  // the crossbar of a European 7
  await page.mouse.move(...at(0.42, 0.52));
  await page.mouse.down();
  await page.mouse.move(...at(0.7, 0.52), { steps: 8 });
  await page.mouse.up();
  const inked = await page.evaluate(() => {
    const c = document.getElementById("pad");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) n += d[i] > 128 ? 1 : 0;
    return n / (c.width * c.height);
  });
  assert.ok(inked > 0.03 && inked < 0.5, `the mouse strokes left ${(100 * inked).toFixed(1)}% of the pad inked`);
}

const settled = (page) => page.evaluate(() => window.edgetailorDemo.settled());

async function openDemo(context, query) {
  const page = await context.newPage();
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
  page.on("console", (m) => logs.push(`console.${m.type()}: ${m.text()}`));
  await page.goto(`${baseUrl}demo/?${query}`);
  await page.waitForFunction(() => window.edgetailorDemo, null, { timeout: 30_000 });
  return page;
}

before(async () => {
  if (skip) return;
  assert.ok(existsSync(path.join(ROOT, "demo", "edgetailor.js")), "demo/edgetailor.js is missing: run `npm run build && npm run bundle`");
  const { parseNpz } = await import("../dist/npy.js");
  await mkdir(FIXTURES, { recursive: true });
  const bundleBytes = await readFile(fixtures.bundle);
  await copyFile(fixtures.bundle, path.join(FIXTURES, "bundle.zip"));
  await copyFile(fixtures.key, path.join(FIXTURES, "signing.pub"));
  await writeFile(path.join(FIXTURES, "tampered.zip"), await tamperedBundle(new Uint8Array(bundleBytes)));
  await writeFile(path.join(FIXTURES, "other.pub"), anotherKeyPem());
  const arrays = parseNpz(new Uint8Array(await readFile(fixtures.samples)), fixtures.samples);
  for (const name of ["train_x", "train_y", "test_x", "test_y"]) assert.ok(arrays[name], `${fixtures.samples} has no ${name}`);
  for (const name of ["train_x", "test_x"]) {
    const a = arrays[name];
    assert.ok(a.dtype === "|u1" && a.shape.length === 3 && a.shape[1] === 28 && a.shape[2] === 28, `${name} must be uint8 (N, 28, 28), got ${a.dtype} ${JSON.stringify(a.shape)}`);
  }
  data = {
    trainX: Array.from(arrays.train_x.data), trainY: Array.from(arrays.train_y.data, Number),
    testX: Array.from(arrays.test_x.data), testY: Array.from(arrays.test_y.data, Number),
  };
  const started = await startServer();
  server = started.child;
  baseUrl = started.url;
  const { chromium } = await import("playwright-core");
  browser = await chromium.launch({ executablePath: chromiumPath, headless: true, args: ["--no-sandbox"] });
});

after(async () => {
  await browser?.close();
  server?.kill();
});

const QUERY = "bundle=/test-output/browser/bundle.zip&key=/test-output/browser/signing.pub";

test("the web demo personalizes in Chromium, keeps it across a reload, and refuses a tampered bundle", { skip, timeout: 900_000 }, async (t) => {
  logs = [];
  const context = await browser.newContext({ viewport: { width: 1240, height: 900 } });
  try {
    const page = await openDemo(context, QUERY);
    await page.evaluate(() => window.edgetailorDemo.ready.then(() => true));
    assert.match(await page.textContent("#status"), /opened bundle\.zip .*signed by key [0-9a-f]{16} \(trusted\)/);
    const labels = await page.evaluate(() => window.edgetailorDemo.runtime.labels);
    assert.ok(labels.includes("7"), `the bundle's labels: ${labels}`);
    const nTrain = data.trainY.length;
    const nTest = data.testY.length;

    await t.test("a digit drawn with the mouse: predicted by GE, then added as a sample", async () => {
      await drawSeven(page);
      await page.click("#predict");
      await settled(page);
      const [first] = await page.evaluate(() => window.edgetailorDemo.history);
      assert.equal(first.expert, "GE");
      assert.equal(first.personalized, false);
      assert.match(await page.textContent("#history"), /before personalization/);
      await page.click('#labels button[data-label="7"]');
      await page.click("#add");
      await settled(page);
      assert.equal(await page.evaluate(() => window.edgetailorDemo.runtime.sampleCount()), 1);
      assert.equal(await page.locator("#thumbs .thumb").count(), 1);
    });

    await t.test(`${nTrain} samples fed through the hook`, async () => {
      const stored = await page.evaluate(({ x, y }) => window.edgetailorDemo.addSamplesFromPixels(x, y), { x: data.trainX, y: data.trainY });
      assert.equal(stored, nTrain);
      assert.equal(await page.evaluate(() => window.edgetailorDemo.runtime.sampleCount()), nTrain + 1);
      assert.match(await page.textContent("#sample-count"), new RegExp(`${nTrain + 1} stored`));
    });

    const before = await page.evaluate(({ x, y }) => window.edgetailorDemo.evaluatePixels(x, y), { x: data.testX, y: data.testY });
    assert.equal(before.n, nTest);
    assert.equal(before.experts.LE, 0, "LE answered before any personalization");
    await page.evaluate((x) => window.edgetailorDemo.predictPixels(x), data.testX.slice(0, 2 * PIXELS));

    let personalized;
    await t.test("Personalize: progress, then the summary", async () => {
      await page.click("#personalize");
      await page.waitForFunction(() => window.edgetailorDemo.lastPersonalize || window.edgetailorDemo.lastError,
        null, { timeout: 600_000, polling: 500 });
      const error = await page.evaluate(() => window.edgetailorDemo.lastError);
      assert.equal(error, null, `personalize failed: ${JSON.stringify(error)}`);
      personalized = await page.evaluate(() => window.edgetailorDemo.lastPersonalize);
      assert.equal(personalized.report.n_samples, nTrain + 1);
      assert.ok(personalized.report.learned, "the report says what was learned");
      assert.equal(await page.evaluate(() => window.edgetailorDemo.runtime.personalized), true);
      assert.equal(await page.locator("#progress").evaluate((p) => p.value), 1);
      const summary = await page.textContent("#summary");
      for (const word of ["GE alone, on them", "personalized, on them", "fixed / broken", "time"]) assert.ok(summary.includes(word), summary);
      t.diagnostic(`personalize: ${personalized.seconds.toFixed(2)} s wall in the page (SDK report: ${personalized.report.seconds} s, ` +
        `${personalized.report.le_epochs} LE epochs, stopped early: ${personalized.report.stopped_early})`);
    });
    assert.ok(personalized, "personalization did not finish");

    const afterEval = await page.evaluate(({ x, y }) => window.edgetailorDemo.evaluatePixels(x, y), { x: data.testX, y: data.testY });
    t.diagnostic(`test accuracy: ${before.accuracy.toFixed(3)} before, ${afterEval.accuracy.toFixed(3)} after; LE answered ${afterEval.experts.LE} of ${nTest}`);
    assert.ok(afterEval.accuracy >= before.accuracy - 0.02,
      `accuracy after personalizing (${afterEval.accuracy}) fell below the accuracy before (${before.accuracy}) - 0.02`);
    assert.ok(afterEval.experts.LE > 0, "LE answered none of the test images");

    await t.test("predictions after personalization name the expert that answered", async () => {
      await page.evaluate((x) => window.edgetailorDemo.predictPixels(x), data.testX.slice(0, 4 * PIXELS));
      await drawSeven(page);
      await page.click("#predict");
      await settled(page);
      const history = await page.evaluate(() => window.edgetailorDemo.history);
      const afterRows = history.filter((row) => row.personalized);
      assert.equal(afterRows.length, 5);
      assert.ok(history.some((row) => !row.personalized), "the history keeps the predictions made before");
      for (const row of afterRows) assert.ok(["GE", "LE"].includes(row.expert) && row.gate >= 0 && row.gate <= 1);
      assert.match(await page.textContent("#history"), /after personalization/);
      assert.match(await page.textContent("#pred-meta"), /gate \d\.\d{3}/);
    });

    await page.locator("#thumbs").evaluate((el) => { el.scrollTop = 0; });
    await page.screenshot({ path: path.join(OUT, "demo.png"), fullPage: true });

    await t.test("a reload finds the personalization and the samples in IndexedDB", async () => {
      const again = await openDemo(context, QUERY);
      await again.evaluate(() => window.edgetailorDemo.ready.then(() => true));
      assert.equal(await again.evaluate(() => window.edgetailorDemo.runtime.personalized), true);
      assert.equal(await again.evaluate(() => window.edgetailorDemo.runtime.sampleCount()), nTrain + 1);
      const e = await again.evaluate(({ x, y }) => window.edgetailorDemo.evaluatePixels(x, y), { x: data.testX, y: data.testY });
      assert.equal(e.accuracy, afterEval.accuracy);
      await again.close();
    });

    await t.test("the key picker, then a tampered bundle from the file picker: refused, shown in the status line", async () => {
      await page.setInputFiles("#key-file", path.join(FIXTURES, "signing.pub"));
      await page.waitForFunction(() => /opened bundle\.zip/.test(window.edgetailorDemo.status) && !document.getElementById("bundle-file").disabled,
        null, { timeout: 60_000 });
      await settled(page);
      await page.setInputFiles("#bundle-file", path.join(FIXTURES, "tampered.zip"));
      await page.waitForSelector("#status.error", { timeout: 60_000 });
      await settled(page);
      const status = await page.textContent("#status");
      assert.match(status, /(TrustError|BundleError): /);
      assert.match(status, /tampered\.zip/);
      assert.match(status, /hint: /);
      const error = await page.evaluate(() => window.edgetailorDemo.lastError);
      assert.ok(["TrustError", "BundleError"].includes(error.name), JSON.stringify(error));
      // the genuine bundle stays open and personalized
      assert.equal(await page.evaluate(() => window.edgetailorDemo.runtime.personalized), true);
      await page.screenshot({ path: path.join(OUT, "demo-refused.png"), fullPage: true });
      t.diagnostic(`refused: ${status.split("\n")[0]}`);
    });

    const pageErrors = logs.filter((line) => line.startsWith("pageerror"));
    assert.deepEqual(pageErrors, [], "uncaught errors in the page");
    const result = {
      personalize_seconds: Math.round(personalized.seconds * 1000) / 1000,
      accuracy_before: before.accuracy,
      accuracy_after: afterEval.accuracy,
      n_test: nTest,
      le_answers: afterEval.experts.LE,
      n_samples: personalized.report.n_samples,
      sdk_report_seconds: personalized.report.seconds,
      stopped_early: personalized.report.stopped_early,
      browser: `Chromium ${browser.version()}`,
    };
    await writeFile(path.join(OUT, "browser.json"), JSON.stringify(result, null, 2) + "\n");
    t.diagnostic(JSON.stringify(result));
  } catch (error) {
    console.error(logs.slice(-30).join("\n"));
    throw error;
  } finally {
    await context.close();
  }
});

test("the web demo refuses a bundle signed by a key it does not trust", { skip, timeout: 120_000 }, async () => {
  logs = [];
  const context = await browser.newContext(); // a fresh IndexedDB: a state that has pinned no key yet
  try {
    const page = await openDemo(context, "bundle=/test-output/browser/bundle.zip&key=/test-output/browser/other.pub");
    await assert.rejects(page.evaluate(() => window.edgetailorDemo.ready.then(() => true)), /TrustError|not trust/);
    const status = await page.textContent("#status");
    assert.match(status, /TrustError: .*not trust/);
    assert.match(status, /hint: /);
    assert.equal(await page.evaluate(() => window.edgetailorDemo.runtime), null);
    assert.equal(await page.locator("#predict").isDisabled(), true);
  } finally {
    await context.close();
  }
});
