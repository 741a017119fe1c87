#!/usr/bin/env node
/**
 * Bundles the built SDK (dist/index.js, from `npm run build`) into one ESM file
 * for the browser, demo/edgetailor.js (minified, with a source map), and
 * reports the SDK's own minified size: onnxruntime is not in it (the app
 * passes its own `ort` module in), and the Node-only paths are dynamic
 * imports of node:* that stay external and never run in a browser.
 *
 * The portable crypto (@noble/ed25519 and @noble/hashes) is a separate
 * chunk, loaded only on engines whose WebCrypto lacks Ed25519 or SHA-256
 * (React Native, old engines): browsers and Node never download it.
 *
 * Training (personalize) and the personalized-model export are chunks
 * loaded on first use too: an app that predicts at startup does not load them.
 *
 * Writes test-output/size.json: {"bytes": N, "gzip_bytes": M, "lazy_chunks": {...}},
 * N being what every app loads at startup (the entry and the chunks it imports). The SDK's budget is 60 KB
 * minified; going over it prints a warning (and fails with --strict).
 */

import { build } from "esbuild";
import { mkdir, readdir, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const ENTRY = path.join(ROOT, "dist", "index.js");
const OUT_DIR = path.join(ROOT, "demo");
const OUT = path.join(OUT_DIR, "edgetailor.js");
const BUDGET = 60 * 1024;

try {
  await stat(ENTRY);
} catch {
  console.error(`bundle.mjs: ${path.relative(process.cwd(), ENTRY)} is missing; run \`npm run build\` first`);
  process.exit(1);
}

const common = {
  entryPoints: [ENTRY],
  bundle: true,
  format: "esm",
  splitting: true,
  entryNames: "edgetailor",
  chunkNames: "edgetailor-[name]-[hash]",
  platform: "browser",
  target: ["es2022"],
  minify: true,
  legalComments: "none",
  // node:* only behind `await import(...)` on Node paths; onnxruntime is the app's, never bundled
  external: ["node:*", "onnxruntime-common", "onnxruntime-web", "onnxruntime-node", "onnxruntime-react-native"],
  logLevel: "warning",
};

// 1. the demo's copy, with its source map
for (const old of await readdir(OUT_DIR)) if (/^edgetailor.*\.js(\.map)?$/.test(old)) await rm(path.join(OUT_DIR, old));
const result = await build({ ...common, outdir: OUT_DIR, sourcemap: true, metafile: true });

// 2. the SDK alone, in memory, without the source-map comment: the number to hold to the budget
//    What an app loads when it starts is the entry and every chunk it imports statically (esbuild puts
//    modules shared with a lazy chunk into chunks of their own); the rest loads on first use.
const sizedDir = path.join(ROOT, "test-output", "sized");
const sized = await build({ ...common, outdir: sizedDir, write: false, sourcemap: false, metafile: true });
const contents = new Map(sized.outputFiles.map((f) => [path.basename(f.path), f.contents]));
const outputs = Object.fromEntries(Object.entries(sized.metafile.outputs).map(([k, v]) => [path.basename(k), v]));
const startup = new Set();
const visit = (name) => {
  if (startup.has(name) || !contents.has(name)) return;
  startup.add(name);
  for (const i of outputs[name].imports ?? []) if (i.kind === "import-statement" && !i.external) visit(path.basename(i.path));
};
visit("edgetailor.js");
const code = Buffer.concat([...startup].map((name) => contents.get(name)));
const bytes = code.length;
const gzipBytes = gzipSync(code, { level: 9 }).length;
const lazyChunks = Object.fromEntries([...contents].filter(([name]) => !startup.has(name)).map(([name, c]) => [name, c.length]));
// the SDK's own code at startup: without its dependencies' bytes (fflate)
const dependencyBytes = [...startup].flatMap((name) => Object.entries(outputs[name].inputs))
  .filter(([input]) => input.includes("node_modules")).reduce((sum, [, info]) => sum + info.bytesInOutput, 0);
const ownBytes = bytes - dependencyBytes;

const imports = Object.values(result.metafile.outputs)
  .flatMap((o) => o.imports ?? []).filter((i) => i.external).map((i) => i.path);
const leaked = imports.filter((p) => p.startsWith("onnxruntime"));
if (leaked.length) console.warn(`bundle.mjs: warning: the bundle imports ${leaked.join(", ")} at run time`);

await mkdir(path.join(ROOT, "test-output"), { recursive: true });
await writeFile(path.join(ROOT, "test-output", "size.json"), JSON.stringify({ bytes, gzip_bytes: gzipBytes, own_bytes: ownBytes, lazy_chunks: lazyChunks }) + "\n");

const kb = (n) => `${(n / 1024).toFixed(1)} KB`;
console.log(`wrote ${path.relative(process.cwd(), OUT)} (+ .map)`);
console.log(`SDK minified, loaded at startup: ${bytes} bytes (${kb(bytes)}), gzip: ${gzipBytes} bytes (${kb(gzipBytes)}); budget ${kb(BUDGET)} minified`);
const lazy = Object.values(lazyChunks).reduce((a, b) => a + b, 0);
console.log(`  (at startup: ${[...startup].join(" + ")}; the SDK's own code ${kb(ownBytes)}, dependencies ${kb(dependencyBytes)})`);
console.log(`loaded on first use: ${kb(lazy)} (${Object.entries(lazyChunks).map(([n, b]) => `${n} ${kb(b)}`).join(", ")}): ` +
  "training (personalize), the personalized-model export, state repair, and @noble crypto where WebCrypto lacks Ed25519");
if (bytes > BUDGET) {
  console.warn(`bundle.mjs: warning: the SDK is ${kb(bytes - BUDGET)} over its ${kb(BUDGET)} budget`);
  if (process.argv.includes("--strict")) process.exit(1);
}
