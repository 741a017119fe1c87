// The preprocessing port (src/preprocess.ts) against the Python toolkit: the
// golden vectors every client must reproduce (tests/fixtures/preprocess/), 200
// more varied cases (fixtures/make_preprocess_extra.py), and asGreyFloat's checks.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { unzipSync } from "fflate";
import { parseNpy, parseNpz } from "../dist/npy.js";
import { asGreyFloat, preprocessingFrom } from "../dist/preprocess.js";
import { SampleError } from "../dist/errors.js";

const GOLDEN = new URL("../../../tests/fixtures/preprocess/golden.npz", import.meta.url);
const EXTRA = new URL("./fixtures/preprocess-extra.npz", import.meta.url);
const EXTRA_META = new URL("./fixtures/preprocess-extra.json", import.meta.url);

/** A numpy unicode scalar (`<U..`, UTF-32LE), which parseNpy does not read. */
function npyString(bytes) {
  const headerLength = bytes[8] | (bytes[9] << 8);
  const view = new DataView(bytes.buffer, bytes.byteOffset + 10 + headerLength);
  let out = "";
  for (let k = 0; k + 4 <= view.byteLength; k += 4) {
    const code = view.getUint32(k, true);
    if (code === 0) break;
    out += String.fromCodePoint(code);
  }
  return out;
}

/** Run one image (an .npy array, (H, W) or (H, W, C)) through asGreyFloat and a preprocessing. */
function prepare(preprocessing, input, channels) {
  const [height, width] = input.shape;
  const grey = asGreyFloat(input.data, 1, height, width, channels);
  const { images, why } = preprocessing.prepareBatch(grey);
  return { grey, image: images, why: why[0] };
}

function compare(actual, expected) {
  let pixels = 0, worst = 0;
  for (let k = 0; k < expected.length; k++) {
    const d = Math.abs(actual[k] - expected[k]);
    if (d) pixels++;
    worst = Math.max(worst, d);
  }
  return { pixels, worst };
}

test("every golden vector becomes exactly its golden sample", () => {
  // golden.npz also holds strings (what_i, preprocess) as numpy unicode: read only the arrays needed
  const members = unzipSync(readFileSync(GOLDEN));
  const array = (name) => parseNpy(members[`${name}.npy`], `golden.npz:${name}`);
  const spec = JSON.parse(npyString(members["preprocess.npy"]));
  assert.equal(spec.name, "glyph-v1");
  const preprocessing = preprocessingFrom(spec);
  assert.equal(preprocessing.name, "glyph-v1");
  assert.equal(preprocessing.canvas, 28);
  const count = Number(array("count").data[0]);
  assert.equal(count, 11);
  for (let i = 0; i < count; i++) {
    const what = npyString(members[`what_${i}.npy`]);
    const expected = array(`output_${i}`);
    const { image, why } = prepare(preprocessing, array(`input_${i}`), 1);
    assert.equal(why, "", what);
    const { pixels, worst } = compare(image, expected.data);
    assert.equal(pixels, 0, `golden ${i} (${what}): ${pixels} pixels differ, by up to ${worst}`);
  }
});

test("200 varied cases match Python (>= 99 % identical, never more than 1 grey level off)", (t) => {
  const arrays = parseNpz(new Uint8Array(readFileSync(EXTRA)), "preprocess-extra.npz");
  const meta = JSON.parse(readFileSync(EXTRA_META, "utf8"));
  assert.equal(meta.length, 200);
  let identical = 0, worstPixel = 0;
  const off = [];
  for (const [i, item] of meta.entries()) {
    const preprocessing = preprocessingFrom(item.spec);
    const { grey, image, why } = prepare(preprocessing, arrays[`input_${i}`], item.channels);
    assert.equal(why, item.why, `case ${i} (${item.what}): why`);
    const expectedGrey = arrays[`grey_${i}`];
    if (expectedGrey) {
      assert.deepEqual(grey.data, expectedGrey.data, `case ${i} (${item.what}): asGreyFloat differs from as_grey_float`);
    }
    const { pixels, worst } = compare(image, arrays[`output_${i}`].data);
    worstPixel = Math.max(worstPixel, worst);
    if (pixels === 0) identical++;
    else off.push(`${i} (${item.what}): ${pixels} pixels, up to ${worst}`);
  }
  t.diagnostic(`${identical}/200 identical; worst pixel difference ${worstPixel}${off.length ? `; ${off.join("; ")}` : ""}`);
  assert.ok(identical >= 198, `only ${identical}/200 identical: ${off.join("; ")}`);
  assert.ok(worstPixel <= 1, `a pixel is ${worstPixel} grey levels off: ${off.join("; ")}`);
});

test("an image's result does not depend on its batch", () => {
  const arrays = parseNpz(new Uint8Array(readFileSync(EXTRA)), "preprocess-extra.npz");
  const preprocessing = preprocessingFrom({ name: "glyph-v1" });
  const members = [0, 1, 2, 3, 4, 30, 31]; // 28x28 grey uint8, including inverted digits
  const data = new Uint8Array(members.length * 784);
  members.forEach((i, j) => data.set(arrays[`input_${i}`].data, j * 784));
  const { images, why } = preprocessing.prepareBatch(asGreyFloat(data, members.length, 28, 28));
  members.forEach((i, j) => {
    assert.deepEqual(images.subarray(j * 784, (j + 1) * 784), arrays[`output_${i}`].data);
    assert.equal(why[j], "");
  });
});

test("a blank image is reported in why, with a zero sample, not thrown", () => {
  const preprocessing = preprocessingFrom({ name: "glyph-v1" });
  const data = new Uint8Array(3 * 28 * 28).fill(200);
  data.fill(0, 784, 2 * 784); // the second image: black
  const { images, why } = preprocessing.prepareBatch(asGreyFloat(data, 3, 28, 28));
  assert.deepEqual(why, ["no ink: contrast 0.000 < 0.08", "no ink: contrast 0.000 < 0.08", "no ink: contrast 0.000 < 0.08"]);
  assert.ok(images.every((v) => v === 0));
  assert.equal(images.length, 3 * 784);
  // too small to be an image at all is an error, as in Python
  assert.throws(() => preprocessing.prepareBatch(asGreyFloat(new Uint8Array(5), 1, 1, 5)),
    (e) => e instanceof SampleError && /at least 2x2/.test(e.message));
});

test("asGreyFloat composites RGBA onto white as Python does", () => {
  const rgba = new Uint8Array([255, 0, 0, 255, 0, 255, 0, 128, 0, 0, 255, 0, 12, 200, 77, 255, 250, 250, 250, 64, 31, 41, 59, 26]);
  // as_grey_float(rgba.reshape(2, 3, 4)) in Python (the last value is where numpy's BLAS uses FMA)
  const python = [0.299, 0.7926901960784314, 1.0, 0.5088862745098038, 0.9950788158400615, 0.9140578546712803];
  const grey = asGreyFloat(rgba, 1, 2, 3, 4);
  assert.deepEqual([grey.count, grey.height, grey.width], [1, 2, 3]);
  assert.deepEqual(Array.from(grey.data), python);
  // one pixel wide: numpy's own loop
  const column = new Uint8Array([255, 0, 0, 255, 12, 200, 77, 255]);
  assert.deepEqual(Array.from(asGreyFloat(column, 1, 2, 1, 4).data), [0.299, 0.5088862745098038]);
  // RGB, uint16 and floats
  // white is not quite 1 in Python either (0.299 + 0.587 + 0.114, rounded as numpy's BLAS adds them)
  assert.deepEqual(Array.from(asGreyFloat(new Uint8Array([255, 255, 255, 0, 0, 0]), 1, 1, 2, 3).data), [0.9999999999999999, 0]);
  assert.deepEqual(Array.from(asGreyFloat(new Uint16Array([65535, 0]), 1, 1, 2).data), [1, 0]);
  assert.deepEqual(Array.from(asGreyFloat(new Float32Array([0.5, 1]), 1, 1, 2).data), [0.5, 1]);
});

test("asGreyFloat refuses what Python refuses", () => {
  const sample = (fn, pattern) => assert.throws(fn, (e) => e instanceof SampleError && pattern.test(e.message) && e.hint.length > 0);
  sample(() => asGreyFloat(new Float64Array([0, NaN, 1, 0]), 1, 2, 2), /the images contain NaN or infinite values/);
  sample(() => asGreyFloat(new Float32Array([0, Infinity, 1, 0]), 1, 2, 2), /NaN or infinite/);
  sample(() => asGreyFloat(new Float64Array([-0.5, 0, 1, 0]), 1, 2, 2), /float images must lie in \[0, 1\], got \[-0\.5, 1\]/);
  sample(() => asGreyFloat(new Float64Array([0, 255, 0, 0]), 1, 2, 2), /got \[0, 255\]/);
  assert.throws(() => asGreyFloat(new Float64Array([0, 255, 0, 0]), 1, 2, 2), (e) => /divide 0-255 images by 255/.test(e.hint));
  sample(() => asGreyFloat(new Uint8Array(8), 1, 2, 2, 2), /1 \(grey\), 3 \(RGB\) or 4 \(RGBA\) channels, got 2/);
  sample(() => asGreyFloat(new Uint8Array(7), 1, 2, 2), /7 values/);
  sample(() => asGreyFloat(new Uint8Array(0), 0, 2, 2), /got shape/);
  sample(() => asGreyFloat(new Int16Array(4), 1, 2, 2), /uint8, uint16 or float/);
});

test("preprocessingFrom reads the manifest's input.preprocess as Python's from_spec", () => {
  assert.equal(preprocessingFrom(undefined).name, "mnist-style-v0");
  assert.equal(preprocessingFrom("mnist").name, "mnist-style-v0");
  assert.equal(preprocessingFrom({ name: "mnist-style-v0" }).canvas, 28);
  assert.equal(preprocessingFrom({ name: "glyph-v1", canvas: 32, box: 24, extra: "ignored" }).canvas, 32);
  assert.throws(() => preprocessingFrom({ name: "glyph-v9" }),
    (e) => e instanceof SampleError && /'glyph-v9'/.test(e.message) && /known: glyph-v1, mnist-style-v0/.test(e.hint));
  assert.throws(() => preprocessingFrom({ name: "glyph-v1", box: "20" }), SampleError);
});
