// The SDK's NumPy Generator must give NumPy's own streams: the golden values below are
// numpy.random.default_rng(seed) outputs (numpy 2.x; the streams are stable across versions).
import { test } from "node:test";
import assert from "node:assert/strict";
import { NumpyRandom, seedSequenceState } from "../dist/rng.js";

test("SeedSequence(0).generate_state(8) is NumPy's", () => {
  assert.deepEqual(Array.from(seedSequenceState(0, 4)), [2968811710, 3677149159, 745650761, 2884920346]);
});

test("uniform, permutation and integers follow NumPy's stream", () => {
  const r = new NumpyRandom(0);
  assert.deepEqual(Array.from(r.uniform(-6, 6, 2)), [1.6435402478574517, -2.7625594348335563]);
  // numpy: r = default_rng(0); r.uniform(-6, 6, 5); r.permutation(500)[:8]
  r.uniform(-6, 6, 3);
  assert.deepEqual(Array.from(r.permutation(500).subarray(0, 8)), [63, 463, 109, 339, 285, 88, 209, 119]);
  assert.deepEqual(Array.from(r.integers(0, 300, 7)), [118, 188, 297, 227, 277, 20, 45]);
});

test("long interleaved streams match NumPy draw for draw (fixtures/numpy-streams.json)", async () => {
  const { readFileSync } = await import("node:fs");
  const { cases } = JSON.parse(readFileSync(new URL("./fixtures/numpy-streams.json", import.meta.url), "utf8"));
  for (const { seed, draws } of cases) {
    const r = new NumpyRandom(BigInt(seed));
    for (const d of draws) {
      const got = d.uniform ? r.uniform(...d.uniform) : d.permutation ? r.permutation(d.permutation) : r.integers(...d.integers);
      assert.deepEqual(Array.from(got), d.values, `seed ${seed}: ${JSON.stringify(d).slice(0, 60)}`);
    }
  }
});

test("single-precision normals are NumPy's, tail and wedges included (fixtures/numpy-normals.json)", async () => {
  const { readFileSync } = await import("node:fs");
  const { createHash } = await import("node:crypto");
  const { cases } = JSON.parse(readFileSync(new URL("./fixtures/numpy-normals.json", import.meta.url), "utf8"));
  for (const { seed, draws } of cases) {
    const r = new NumpyRandom(BigInt(seed));
    for (const d of draws) {
      if (d.normal === undefined) {
        const got = d.uniform ? r.uniform(...d.uniform) : r.integers(...d.integers);
        assert.deepEqual(Array.from(got), d.values, `seed ${seed}: ${JSON.stringify(d).slice(0, 60)}`);
        continue;
      }
      const values = r.standardNormalF32(d.normal);
      const decode = (text) => new Float32Array(new Uint8Array(Buffer.from(text, "base64")).buffer);  // a Buffer may view a shared pool
      if (d.sha256) {
        // the tail's values come from libm's log1pf (not correctly rounded): equal to an ulp; the rest bit for bit
        const tail = values.filter((v) => Math.abs(v) > 3.6541528853610088);
        const body = values.map((v) => (Math.abs(v) > 3.6541528853610088 ? 0 : v));
        assert.equal(createHash("sha256").update(Buffer.from(body.buffer)).digest("hex"), d.sha256, `seed ${seed}: ${d.normal} normals`);
        const want = decode(d.tail);
        assert.ok(want.length > 100 && tail.length === want.length, `seed ${seed}: ${tail.length} tail values, NumPy drew ${want.length}`);
        want.forEach((v, i) => assert.ok(Math.abs(tail[i] - v) <= 1e-6 * Math.abs(v), `seed ${seed}: tail value ${i}: ${tail[i]} vs ${v}`));
      } else {
        const want = decode(d.base64);
        const got = values;
        const first = got.findIndex((v, i) => v !== want[i]);
        assert.equal(first, -1, `seed ${seed}: normal ${first} is ${got[first]}, NumPy drew ${want[first]}`);
      }
    }
  }
});
