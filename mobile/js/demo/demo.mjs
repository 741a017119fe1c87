/**
 * The edgetailor web demo: open a bundle, draw digits, add them as samples,
 * personalize in the browser (onnxruntime-web, one thread), and watch which
 * expert (GE or LE) answers each prediction.
 *
 * Served from mobile/js (scripts/serve.mjs): the SDK is ./edgetailor.js
 * (scripts/bundle.mjs) and onnxruntime-web comes from node_modules.
 *
 * Query: ?bundle=URL (opened at start), ?key=URL (signing.pub to trust),
 * ?store=NAME (the IndexedDB database; default "edgetailor-demo").
 *
 * Tests drive it through window.edgetailorDemo (see the end of this file).
 */

import {
  BackendError, BundleError, DeviceRuntime, EdgetailorError, IndexedDbStore, LimitError, PersonalizationError, SampleError,
  SigningKeyError, StateError, TrustError,
} from "./edgetailor.js";

const ORT_DIR = new URL("../node_modules/onnxruntime-web/dist/", import.meta.url).href;
const SIZE = 28; // the thumbnails show the 28x28 sample the SDK made of each drawing
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

const demo = {
  runtime: null,
  store: new IndexedDbStore(params.get("store") || "edgetailor-demo"),
  source: null, // what the open runtime was opened from: { source, name }
  keyText: null,
  keyName: null,
  label: null,
  thumbs: [], // { pixels, label } of the samples added in this session
  history: [],
  lastPersonalize: null,
  lastError: null,
  busy: false,
};

// ---------------------------------------------------------------------------
// status line

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = kind;
}

// The SDK's classes, subclasses first. A minifier renames classes, and the SDK takes
// error.name from the class name (new.target.name), so name them by instanceof.
const ERROR_CLASSES = [
  ["TrustError", TrustError], ["BundleError", BundleError], ["SampleError", SampleError], ["StateError", StateError],
  ["PersonalizationError", PersonalizationError], ["LimitError", LimitError], ["SigningKeyError", SigningKeyError],
  ["BackendError", BackendError], ["EdgetailorError", EdgetailorError],
];

function describeError(error) {
  const name = ERROR_CLASSES.find(([, cls]) => error instanceof cls)?.[0] ?? (error?.name || "Error");
  const message = error?.message ?? String(error);
  return { name, message, hint: error?.hint || "" };
}

function showError(error, context) {
  const e = describeError(error);
  demo.lastError = e;
  const still = error?.stillOpen ? `\n${error.stillOpen} stays open` : "";
  setStatus(`${context ? `${context}: ` : ""}${e.name}: ${e.message}${e.hint ? `\nhint: ${e.hint}` : ""}${still}`, "error");
  console.error(error);
}

function showWarnings(text) {
  const rt = demo.runtime;
  const notes = [...(rt?.warnings ?? [])];
  if (rt?.personalizationProblem) notes.push(`personalization: ${rt.personalizationProblem}`);
  setStatus(notes.length ? `${text}\n${notes.map((w) => `warning: ${w}`).join("\n")}` : text, notes.length ? "warn" : "ok");
}

// ---------------------------------------------------------------------------
// one action at a time: the buttons and the test hooks share this queue

let queue = Promise.resolve();

function enqueue(task, context) {
  const run = queue.then(async () => {
    setBusy(true);
    try {
      return await task();
    } catch (error) {
      showError(error, context);
      throw error;
    } finally {
      setBusy(false);
    }
  });
  queue = run.catch(() => {});
  return run;
}

function setBusy(busy) {
  demo.busy = busy;
  render();
}

// ---------------------------------------------------------------------------
// opening a bundle

let ortModule = null;
async function loadOrt() {
  if (!ortModule) {
    try {
      ortModule = await import(`${ORT_DIR}ort.wasm.min.mjs`);
    } catch (error) {
      throw Object.assign(new Error(`could not load onnxruntime-web from ${ORT_DIR}: ${error.message}`),
        { hint: "serve the demo from mobile/js (npm run demo) after npm install" });
    }
    ortModule.env.wasm.numThreads = 1; // no SharedArrayBuffer (cross-origin isolation) needed
    ortModule.env.wasm.wasmPaths = ORT_DIR;
  }
  return ortModule;
}

let settleReady;
let failReady;
const ready = new Promise((resolve, reject) => { settleReady = resolve; failReady = reject; });
ready.catch(() => {}); // a page opened without ?bundle may never be ready

function openBundle(source, name) {
  return enqueue(async () => {
    setStatus(`opening ${name}…`);
    const ort = await loadOrt(); // the SDK yields to the page every ~50 ms while it trains
    const trustedKeys = demo.keyText ? [demo.keyText] : [];
    const started = performance.now();
    let runtime;
    try {
      runtime = await DeviceRuntime.open(source, { ort, store: demo.store, trustedKeys });
    } catch (error) {
      if (demo.source && error && typeof error === "object") error.stillOpen = demo.source.name;
      throw error;
    }
    const old = demo.runtime;
    demo.runtime = runtime;
    demo.source = { source, name };
    if (old) await old.close();
    if (demo.label !== null && !runtime.labels.includes(demo.label)) demo.label = null;
    renderLabels();
    renderSamples();
    const signer = runtime.bundle.signerId;
    showWarnings(`opened ${name} in ${((performance.now() - started) / 1000).toFixed(1)} s` +
      (signer ? `, signed by key ${signer.slice(0, 16)}${demo.keyText ? " (trusted)" : ""}` : ", unsigned"));
    settleReady(runtime);
    return runtime;
  }, `could not open ${name}`);
}

$("bundle-file").addEventListener("change", async (event) => {
  const file = event.target.files?.[0];
  if (!file) return;
  const bytes = new Uint8Array(await file.arrayBuffer());
  openBundle(bytes, file.name).catch(() => {});
});

$("key-file").addEventListener("change", async (event) => {
  const file = event.target.files?.[0];
  if (!file) return;
  demo.keyText = await file.text();
  demo.keyName = file.name;
  // a key chosen after the bundle: open it again, now pinning the key
  if (demo.source) openBundle(demo.source.source, demo.source.name).catch(() => {});
  else setStatus(`key ${file.name} chosen; now choose the bundle`);
});

// ---------------------------------------------------------------------------
// the drawing pad: white ink on opaque black, as MNIST

const pad = $("pad");
const ctx = pad.getContext("2d", { willReadFrequently: true });
let stroke = null;

function clearPad() {
  ctx.globalCompositeOperation = "source-over";
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
}

function padPoint(event) {
  const rect = pad.getBoundingClientRect();
  return [(event.clientX - rect.left) * (pad.width / rect.width), (event.clientY - rect.top) * (pad.height / rect.height)];
}

function ink(from, to) {
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 18;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(...from);
  ctx.lineTo(...to);
  ctx.stroke();
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  stroke = padPoint(event);
  ink(stroke, stroke); // a dot
});
pad.addEventListener("pointermove", (event) => {
  if (!stroke) return;
  const events = event.getCoalescedEvents?.() ?? [event];
  for (const e of events.length ? events : [event]) {
    const next = padPoint(e);
    ink(stroke, next);
    stroke = next;
  }
});
for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) pad.addEventListener(type, () => { stroke = null; });

function padImage() {
  const image = ctx.getImageData(0, 0, pad.width, pad.height);
  return { data: image.data, width: image.width, height: image.height, channels: 4 };
}

$("clear").addEventListener("click", clearPad);

// ---------------------------------------------------------------------------
// samples, predictions, personalization

function needRuntime() {
  if (!demo.runtime) throw Object.assign(new Error("no bundle is open"), { hint: "choose a bundle (.zip) first" });
  return demo.runtime;
}

/** Images -> the SDK's 28x28 samples, one Uint8Array each (for the thumbnails). */
function prepared(rt, images) {
  const { samples, count } = rt.prepare(images);
  return Array.from({ length: count }, (_, i) => samples.slice(i * SIZE * SIZE, (i + 1) * SIZE * SIZE));
}

async function addSamples(images, labels) {
  const rt = needRuntime();
  const pixels = prepared(rt, images);
  const stored = await rt.addSamples(images, labels);
  const names = Array.from(labels, (l) => (typeof l === "number" ? rt.labels[l] : String(l)));
  pixels.forEach((p, i) => demo.thumbs.push({ pixels: p, label: names[i] }));
  renderSamples();
  showWarnings(`added ${pixels.length} sample${pixels.length === 1 ? "" : "s"}; ${rt.sampleCount()} stored`);
  return stored;
}

async function predict(images, record = true) {
  const rt = needRuntime();
  const pixels = prepared(rt, images);
  const p = await rt.predict(images);
  const classes = rt.labels.length;
  const rows = pixels.map((px, i) => {
    const probabilities = Array.from(p.probabilities.subarray(i * classes, (i + 1) * classes));
    return { label: p.labels[i], index: p.indices[i], probability: probabilities[p.indices[i]], probabilities,
      expert: p.experts[i], gate: p.gate[i], personalized: rt.personalized, pixels: px };
  });
  if (record) {
    for (const row of rows) demo.history.unshift(row);
    demo.history.length = Math.min(demo.history.length, 50);
    showPrediction(rows[rows.length - 1], rt.labels);
    renderHistory();
  }
  return rows;
}

function progressFn() {
  const spans = { features: [0, 0.25], "local expert": [0.25, 0.85], "gating network": [0.85, 1] };
  let last = 0;
  return (stage, done, total) => {
    const [a, b] = spans[stage] ?? [last, last];
    const value = a + (b - a) * (total ? done / total : 1);
    last = Math.max(last, value);
    $("progress").value = last;
    $("stage").textContent = `${stage}: ${done} / ${total}`;
  };
}

async function personalize() {
  const rt = needRuntime();
  $("summary").textContent = "";
  $("progress").value = 0;
  setStatus(`personalizing on ${rt.sampleCount()} samples…`);
  const started = performance.now();
  const report = await rt.personalize({ onProgress: progressFn() });
  const seconds = (performance.now() - started) / 1000;
  $("progress").value = 1;
  $("stage").textContent = `done in ${seconds.toFixed(1)} s`;
  demo.lastPersonalize = { seconds, report: JSON.parse(JSON.stringify(report)) };
  renderSummary(report, seconds);
  showWarnings(`personalized on ${report.n_samples ?? rt.sampleCount()} samples in ${seconds.toFixed(1)} s`);
  return demo.lastPersonalize;
}

async function reset(deleteSamples) {
  const rt = needRuntime();
  await rt.reset({ deleteSamples });
  if (deleteSamples) demo.thumbs = [];
  $("summary").textContent = "";
  $("progress").value = 0;
  $("stage").innerHTML = "&nbsp;";
  renderSamples();
  showWarnings(deleteSamples ? "reset: GE alone, samples forgotten" : "reset: GE alone; the samples are kept");
}

$("add").addEventListener("click", () => {
  const label = demo.label;
  enqueue(async () => {
    if (label === null) throw Object.assign(new Error("no label chosen"), { hint: "pick the label of your drawing first" });
    await addSamples(padImage(), [label]);
    clearPad();
  }, "could not add the sample").catch(() => {});
});
$("predict").addEventListener("click", () => enqueue(() => predict(padImage()), "could not predict").catch(() => {}));
$("personalize").addEventListener("click", () => enqueue(personalize, "personalization failed").catch(() => {}));
$("reset").addEventListener("click", () => enqueue(() => reset($("reset-samples").checked), "reset failed").catch(() => {}));
document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || !demo.runtime) return;
  if (demo.runtime.labels.includes(event.key)) selectLabel(event.key);
});

// ---------------------------------------------------------------------------
// rendering

function greyCanvas(pixels, size = SIZE) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  const image = new ImageData(size, size);
  for (let i = 0; i < size * size; i++) {
    image.data[4 * i] = image.data[4 * i + 1] = image.data[4 * i + 2] = pixels[i];
    image.data[4 * i + 3] = 255;
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvas;
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function selectLabel(label) {
  demo.label = label;
  renderLabels();
  render();
}

function renderLabels() {
  const box = $("labels");
  box.replaceChildren(...(demo.runtime?.labels ?? []).map((label) => {
    const b = el("button", { textContent: label, className: label === demo.label ? "selected" : "", title: `label ${label}` });
    b.dataset.label = label;
    b.addEventListener("click", () => selectLabel(label));
    return b;
  }));
}

function renderSamples() {
  const rt = demo.runtime;
  const stored = rt ? rt.sampleCount() : 0;
  const shown = demo.thumbs.length;
  $("sample-count").textContent = rt ? `${stored} stored${shown < stored ? ` (${stored - shown} from earlier sessions)` : ""}` : "";
  const thumbs = $("thumbs");
  thumbs.replaceChildren(...demo.thumbs.map((t) => el("div", { className: "thumb" }, greyCanvas(t.pixels), el("span", { textContent: t.label }))));
  if (!shown) thumbs.append(el("span", { className: "muted", textContent: "draw a digit, pick its label, and press Add sample" }));
  thumbs.scrollTop = thumbs.scrollHeight;
}

function percent(x) {
  return `${(100 * x).toFixed(1)}%`;
}

function showPrediction(row, labels) {
  $("pred-label").textContent = row.label;
  $("pred-meta").replaceChildren(
    el("div", {}, el("span", { className: `badge ${row.expert}`, textContent: row.expert }),
      ` answered with ${percent(row.probability)}`),
    el("div", { textContent: row.personalized ? `gate ${row.gate.toFixed(3)} (GN's probability that LE should answer)` : "not personalized: GE answers alone" }));
  $("bars").replaceChildren(...labels.flatMap((label, i) => [
    el("span", { textContent: label }),
    el("div", {}, Object.assign(el("div", { className: "bar" }), { style: `width:${Math.max(1, 100 * row.probabilities[i])}%` })),
    el("span", { className: "muted", textContent: `${Math.round(100 * row.probabilities[i])}%` }),
  ]));
}

function renderHistory() {
  const list = $("history");
  if (!demo.history.length) {
    list.replaceChildren(el("li", { className: "muted", textContent: "no predictions yet" }));
    return;
  }
  list.replaceChildren(...demo.history.map((row) => el("li", {},
    greyCanvas(row.pixels),
    el("span", { className: "label", textContent: row.label }),
    el("span", { className: `badge ${row.expert}`, textContent: row.expert }),
    el("span", { className: `badge ${row.personalized ? "after" : "before"}`, textContent: row.personalized ? "after personalization" : "before personalization" }),
    el("span", { className: "meta", textContent: `p ${percent(row.probability)}${row.personalized ? ` · gate ${row.gate.toFixed(2)}` : ""}` }),
  )));
}

function renderSummary(report, seconds) {
  const learned = report.learned ?? {};
  const fmt = (x) => (typeof x === "number" ? percent(x) : "–");
  const rows = [
    ["samples", `${report.n_samples ?? "–"}`],
    ["GE alone, on them", fmt(learned.ge_accuracy)],
    ["personalized, on them", fmt(learned.personalized_accuracy)],
    ["fixed / broken", `${learned.fixed ?? "–"} / ${learned.broken ?? "–"}`],
    ["routed to LE", fmt(learned.routed_to_le)],
    ["time", `${Number(report.seconds ?? seconds).toFixed(1)} s${report.stopped_early ? " (stopped early: time budget)" : ""}`],
  ];
  $("summary").replaceChildren(el("dl", {}, ...rows.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v })])));
}

function render() {
  const rt = demo.runtime;
  const idle = !!rt && !demo.busy;
  $("predict").disabled = !idle;
  $("add").disabled = !idle || demo.label === null;
  $("personalize").disabled = !idle || rt.sampleCount() === 0;
  $("reset").disabled = !idle;
  for (const input of [$("bundle-file"), $("key-file")]) input.disabled = demo.busy;
  $("label-hint").textContent = !rt ? "open a bundle to see its labels"
    : demo.label === null ? "pick the label of what you drew, then add it as a sample" : `label ${demo.label}: press Add sample`;
  if (rt) {
    const m = rt.bundle.manifest;
    const release = m.release ? `${m.release.name} v${m.release.version} · ` : "";
    $("bundle-info").textContent = `${demo.source?.name ?? "bundle"} · ${release}${rt.labels.length} labels · id ${rt.bundleId ?? rt.bundle.bundleId}`;
    $("mode").replaceChildren(rt.personalized
      ? el("span", {}, el("span", { className: "badge LE", textContent: "personalized" }), ` #${rt.personalizationId}: GN routes each input to GE or LE`)
      : el("span", { textContent: `GE alone${rt.personalizationProblem ? ` (${rt.personalizationProblem})` : ""}` }));
  }
}

clearPad();
render();
renderSamples();

// ---------------------------------------------------------------------------
// start: ?key=URL, ?bundle=URL

(async () => {
  const keyUrl = params.get("key");
  const bundleUrl = params.get("bundle");
  try {
    if (keyUrl) {
      const response = await fetch(new URL(keyUrl, location.href));
      if (!response.ok) throw Object.assign(new Error(`could not load the key ${keyUrl}: HTTP ${response.status}`), { hint: "check ?key=" });
      demo.keyText = await response.text();
      demo.keyName = keyUrl;
    }
    if (bundleUrl) await openBundle(new URL(bundleUrl, location.href).href, bundleUrl.split("/").pop() || bundleUrl);
  } catch (error) {
    if (!demo.lastError) showError(error, "could not start");
    failReady(error);
  }
})();

// ---------------------------------------------------------------------------
// hooks for tests and the console: feed known 28x28 images without drawing

const asPixels = (pixels) => (pixels instanceof Uint8Array ? pixels : Uint8Array.from(pixels));

window.edgetailorDemo = {
  get runtime() { return demo.runtime; },
  /** Resolves with the runtime once a bundle is open (rejects if ?bundle= failed to open). */
  ready,
  /** Resolves when every queued action has finished. */
  settled: () => queue,
  open: (url) => openBundle(new URL(url, location.href).href, url.split("/").pop() || url),
  /** One grey 28x28 image (784 values 0-255, white ink on black) with its label (name or index). */
  addSampleFromPixels: (pixels, label) => enqueue(() => addSamples(asPixels(pixels), [label]), "could not add the sample"),
  /** N grey 28x28 images, flat (N*784), with N labels. */
  addSamplesFromPixels: (pixels, labels) => enqueue(() => addSamples(asPixels(pixels), labels), "could not add the samples"),
  /** Predictions for N grey 28x28 images; `record` puts them in the history list. */
  predictPixels: (pixels, record = true) => enqueue(async () => (await predict(asPixels(pixels), record))
    .map(({ pixels: _, ...row }) => row), "could not predict"),
  evaluatePixels: (pixels, labels) => enqueue(async () => {
    const e = await needRuntime().evaluate(asPixels(pixels), labels);
    return JSON.parse(JSON.stringify(e));
  }, "could not evaluate"),
  personalize: () => enqueue(personalize, "personalization failed"),
  reset: (deleteSamples = false) => enqueue(() => reset(deleteSamples), "reset failed"),
  drawPixelsOnPad(pixels) {
    clearPad();
    const c = greyCanvas(asPixels(pixels));
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(c, 0, 0, pad.width, pad.height);
  },
  get lastPersonalize() { return demo.lastPersonalize; },
  get lastError() { return demo.lastError; },
  get status() { return $("status").textContent; },
  get history() { return demo.history.map(({ pixels: _, probabilities: __, ...row }) => row); },
};
