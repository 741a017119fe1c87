#!/usr/bin/env node
/**
 * A tiny static file server for the web demo and the browser test: serves the
 * mobile/js directory (so /demo/, /node_modules/onnxruntime-web/dist/ and
 * /test-output/ are reachable) with the right MIME types, and refuses any path
 * that leads outside it. No dependency: node:http only.
 *
 *     node scripts/serve.mjs [PORT]      # or PORT=... ; default 8080, 0 = any free port
 *
 * Prints `serving http://127.0.0.1:PORT/` once it listens.
 */

import { createReadStream } from "node:fs";
import { realpath, stat } from "node:fs/promises";
import { createServer } from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = await realpath(path.resolve(path.dirname(fileURLToPath(import.meta.url)), ".."));

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".htm": "text/html; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".map": "application/json; charset=utf-8",
  ".json": "application/json; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".wasm": "application/wasm",
  ".zip": "application/zip",
  ".npz": "application/octet-stream",
  ".npy": "application/octet-stream",
  ".onnx": "application/octet-stream",
  ".png": "image/png",
  ".svg": "image/svg+xml",
  ".ico": "image/x-icon",
  ".pub": "text/plain; charset=utf-8",
  ".txt": "text/plain; charset=utf-8",
};

function send(res, status, text) {
  res.writeHead(status, { "content-type": "text/plain; charset=utf-8", "cache-control": "no-store" });
  res.end(`${text}\n`);
}

/** The file a request path names, or null when it leads outside ROOT. */
async function resolve(urlPath) {
  let decoded;
  try {
    decoded = decodeURIComponent(urlPath);
  } catch {
    return null;
  }
  if (decoded.includes("\0")) return null;
  const file = path.resolve(ROOT, "." + path.posix.normalize("/" + decoded));
  if (file !== ROOT && !file.startsWith(ROOT + path.sep)) return null;
  let real;
  try {
    real = await realpath(file); // symbolic links must stay inside too
  } catch {
    return file; // missing: a 404 later
  }
  return real === ROOT || real.startsWith(ROOT + path.sep) ? real : null;
}

const server = createServer(async (req, res) => {
  if (req.method !== "GET" && req.method !== "HEAD") {
    res.setHeader("allow", "GET, HEAD");
    return send(res, 405, "method not allowed");
  }
  const url = new URL(req.url ?? "/", "http://localhost");
  if (url.pathname === "/") {
    res.writeHead(302, { location: "/demo/" + url.search }); // the root has no page of its own
    return res.end();
  }
  let file = await resolve(url.pathname);
  if (file === null) return send(res, 403, "forbidden: outside the served directory");
  let info;
  try {
    info = await stat(file);
    if (info.isDirectory()) {
      if (!url.pathname.endsWith("/")) {
        res.writeHead(301, { location: url.pathname + "/" + url.search });
        return res.end();
      }
      file = path.join(file, "index.html");
      info = await stat(file);
    }
  } catch {
    return send(res, 404, `not found: ${url.pathname}`);
  }
  if (!info.isFile()) return send(res, 404, `not found: ${url.pathname}`);
  res.writeHead(200, {
    "content-type": TYPES[path.extname(file).toLowerCase()] ?? "application/octet-stream",
    "content-length": info.size,
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
  });
  if (req.method === "HEAD") return res.end();
  createReadStream(file).on("error", () => res.destroy()).pipe(res);
});

const arg = process.argv[2] ?? process.env.PORT ?? "8080";
const port = Number(arg);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`serve.mjs: bad port ${JSON.stringify(arg)} (give 0..65535; 0 picks a free one)`);
  process.exit(2);
}
const host = process.env.HOST ?? "127.0.0.1";
server.on("error", (error) => {
  console.error(`serve.mjs: ${error.message}`);
  process.exit(1);
});
server.listen(port, host, () => {
  const { port: chosen } = server.address();
  console.log(`serving http://${host}:${chosen}/`);
  if (process.argv[2] !== "0" && process.env.PORT !== "0") console.log(`demo: http://${host}:${chosen}/demo/`);
});
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => server.close(() => process.exit(0)).closeAllConnections?.());
