/**
 * Opening a bundle the way the Python runtime's `toolkit/bundle.py` does:
 * read the manifest and `signature.json` first, check the signature against
 * the manifest's exact bytes, ask the device whether it trusts the signer
 * (`trust`), and only then inflate and re-hash every file against its sha256
 * and size. Every size is checked against the limits before its bytes are
 * inflated. The SDK runs the bundle's ONNX files, so it keeps those (and the
 * shared arrays) in memory and drops the rest once hashed.
 *
 * A bundle comes as zip bytes (an app's asset, a download, a file picker),
 * an http(s) URL, or in Node a path to a `.zip` or an unpacked directory.
 */

import { unzipSync } from "fflate";
import { sha256Hex } from "./crypto.js";
import { BundleError, LimitError } from "./errors.js";
import { canonicalJson, parseBundleJson } from "./json.js";
import { checkLimit, type Limits } from "./limits.js";
import { checkManifest, checkRelativePath, formatFiles, type Manifest } from "./manifest.js";
import { verifySignature, type BundleSignature } from "./signing.js";

export const MANIFEST = "manifest.json";
export const SIGNATURE = "signature.json";
export const FORMAT = "onnx"; // the format the SDK runs: onnxruntime-{react-native,web,node}

export type BundleSource = Uint8Array | ArrayBuffer | URL | string;

/** Decides, before anything is unpacked, whether the bundle may run; throws TrustError to refuse. */
export type TrustCheck = (manifest: Manifest, signature: BundleSignature | null, source: string) => void | Promise<void>;

export interface Members {
  /** The named members that exist, inflated (a missing one is left out). */
  read(names: string[]): Promise<Record<string, Uint8Array>>;
}

/**
 * A zip's members, checked from its central directory before any is inflated
 * (as `_ZipBundle._check_members` does in Python): plain relative names, no
 * duplicates, the member count, every member's size, and its compression
 * ratio. Members are inflated only when asked for, the manifest and the
 * signature within `maxManifestBytes`. fflate inflates a member to the size
 * its header declares, never more; the sha256 of every listed file catches a
 * header that lies.
 */
function zipMembers(bytes: Uint8Array, source: string, limits: Limits): Members {
  const sizes = new Map<string, number>();
  try {
    unzipSync(bytes, {
      filter(info) {
        const name = info.name.endsWith("/") ? info.name.slice(0, -1) : info.name;
        checkRelativePath(name, `${source} (a zip member)`);
        if (sizes.has(name)) throw new BundleError(`${source} holds ${JSON.stringify(name)} twice`, "the zip was tampered with; export it again");
        sizes.set(name, info.originalSize);
        checkLimit(limits, "maxBundleMembers", sizes.size, `${source} holds members`);
        const small = name === MANIFEST || name === SIGNATURE;
        checkLimit(limits, small ? "maxManifestBytes" : "maxBundleBytes", info.originalSize, `${source}/${name} (bytes)`);
        if (info.originalSize > 1 << 20) {
          const ratio = Math.round((10 * info.originalSize) / Math.max(info.size, 1)) / 10;
          checkLimit(limits, "maxCompressionRatio", ratio, `${source}: member ${name} inflates`);
        }
        return false; // nothing is inflated while the directory is checked
      },
    });
  } catch (error) {
    if (error instanceof BundleError || error instanceof LimitError) throw error;
    throw new BundleError(`${source} is neither a bundle directory nor a readable .zip bundle: ${(error as Error).message}`,
      "copy or export the bundle again");
  }
  const total = [...sizes.values()].reduce((sum, n) => sum + n, 0);
  checkLimit(limits, "maxBundleBytes", total, `${source} unpacks to (bytes)`);
  return {
    async read(names) {
      const wanted = new Set(names.filter((name) => sizes.has(name)));
      if (!wanted.size) return {};
      try {
        return unzipSync(bytes, { filter: (info) => wanted.has(info.name) });
      } catch (error) {
        throw new BundleError(`${source} is a corrupt zip: ${(error as Error).message}`, "copy or export the bundle again");
      }
    },
  };
}

/** Reads the members of a bundle on the local file system: registered by `@edgetailor/sdk/node`. */
export interface LocalBundleReader {
  directory(path: string, source: string, limits: Limits): Promise<Members | null>; // null: not a directory
  file(path: string, limits: Limits): Promise<Uint8Array>; // checks the size before reading
}

let localReader: LocalBundleReader | null = null;

/**
 * Paths are a Node feature: the main entry never imports `node:fs`, so that
 * browser and React Native bundlers never see it. Importing
 * `@edgetailor/sdk/node` registers the reader.
 */
export function setLocalBundleReader(reader: LocalBundleReader): void {
  localReader = reader;
}

/** A download's body, refused as soon as it passes the limit (a missing or lying Content-Length). */
async function readCapped(response: Response, limits: Limits, where: string): Promise<Uint8Array> {
  if (!response.body) {
    const bytes = new Uint8Array(await response.arrayBuffer());
    checkLimit(limits, "maxBundleBytes", bytes.length, `${where} (bytes)`);
    return bytes;
  }
  const reader = response.body.getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.length;
    if (total > limits.maxBundleBytes) {
      await reader.cancel();
      checkLimit(limits, "maxBundleBytes", total, `${where} (bytes, so far)`);
    }
    chunks.push(value);
  }
  const out = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  return out;
}

async function openSource(source: BundleSource, limits: Limits): Promise<{ members: Members; where: string }> {
  if (source instanceof Uint8Array || source instanceof ArrayBuffer) {
    const bytes = source instanceof Uint8Array ? source : new Uint8Array(source);
    checkLimit(limits, "maxBundleBytes", bytes.length, "the bundle (bytes)");
    return { members: zipMembers(bytes, "the bundle", limits), where: "the bundle" };
  }
  const text = source.toString();
  if (source instanceof URL || /^(https?|blob|data|file):/i.test(text)) {
    let response: Response;
    try {
      response = await fetch(text);
    } catch (error) {
      throw new BundleError(`could not download the bundle from ${text}: ${(error as Error).message}`, "check the URL and the connection");
    }
    if (!response.ok) throw new BundleError(`could not download the bundle from ${text}: HTTP ${response.status}`, "check the URL");
    const declared = Number(response.headers.get("content-length") ?? "0");
    checkLimit(limits, "maxBundleBytes", declared, `${text} (bytes)`);
    return { members: zipMembers(await readCapped(response, limits, text), text, limits), where: text };
  }
  if (!localReader) {
    throw new BundleError(`cannot open the path ${text}: paths need Node and \`import "@edgetailor/sdk/node"\``,
      "in a browser or React Native app, pass the bundle's bytes (Uint8Array) or an http(s) URL");
  }
  const directory = await localReader.directory(text, text, limits);
  if (directory) return { members: directory, where: text };
  return { members: zipMembers(await localReader.file(text, limits), text, limits), where: text };
}

export class Bundle {
  private constructor(
    readonly source: string,
    readonly manifest: Manifest,
    readonly manifestDigest: string, // sha256 of the canonical manifest: every field, every file's hash
    readonly signature: BundleSignature | null,
    private readonly contents: Map<string, Uint8Array>,
    readonly damaged: Record<string, string>, // format -> why its files cannot be used (unsigned bundles only)
  ) {}

  /** Open and check a bundle; `trust` decides after the signature is checked and before files are inflated. */
  static async open(source: BundleSource, limits: Limits, trust?: TrustCheck): Promise<Bundle> {
    const { members, where } = await openSource(source, limits);
    const head = await members.read([MANIFEST, SIGNATURE]);
    const manifestBytes = head[MANIFEST];
    if (!manifestBytes) throw new BundleError(`${where} has no ${MANIFEST}`, "is this an edgetailor bundle? re-export it");
    let signature: BundleSignature | null = null;
    if (head[SIGNATURE]) {
      // checked first: a signed manifest is parsed only once it is genuine
      const doc = parseBundleJson(head[SIGNATURE], `${where}/${SIGNATURE}`, limits).value;
      signature = await verifySignature(manifestBytes, doc, `${where}/${SIGNATURE}`);
    }
    const { value, text } = parseBundleJson(manifestBytes, `${where}/${MANIFEST}`, limits);
    const manifest = checkManifest(value, `${where}/${MANIFEST}`);
    const digest = await sha256Hex(new TextEncoder().encode(canonicalJson(text)));
    await trust?.(manifest, signature, where);
    const { contents, damaged } = await verifyFiles(members, manifest, where, signature !== null, limits);
    return new Bundle(where, manifest, digest, signature, contents, damaged);
  }

  /** A content id over the whole manifest, the Python runtime's `bundle_id`: a personalization is bound to it. */
  get bundleId(): string {
    return this.manifestDigest.slice(0, 16);
  }

  get signerId(): string | null {
    return this.signature?.signer.id ?? null;
  }

  get labels(): string[] {
    return this.manifest.labels;
  }

  /** A file's bytes (one the SDK keeps: the ONNX format's and the shared arrays). */
  file(name: string): Uint8Array {
    const bytes = this.contents.get(name);
    if (!bytes) throw new BundleError(`${this.source} has no ${name}`, "the bundle is damaged; re-export it");
    return bytes;
  }
}

async function verifyFiles(members: Members, manifest: Manifest, source: string, strict: boolean, limits: Limits) {
  const names = Object.keys(manifest.files);
  checkLimit(limits, "maxBundleMembers", names.length, `${source}/${MANIFEST} lists files`);
  const declared = Object.values(manifest.sizes).reduce((a, b) => a + b, 0);
  checkLimit(limits, "maxBundleBytes", declared, `${source}/${MANIFEST}'s files (bytes)`);
  const onnx = new Set(formatFiles(manifest, FORMAT));
  const owned = new Set(Object.keys(manifest.formats).flatMap((fmt) => formatFiles(manifest, fmt)));
  const problems = new Map<string, string>();
  const contents = new Map<string, Uint8Array>();
  // one member at a time (in small groups) so that only the files the SDK keeps stay in memory
  for (let start = 0; start < names.length; start += 8) {
    const group = names.slice(start, start + 8);
    const read = await members.read(group);
    for (const name of group) {
      const bytes = read[name];
      if (!bytes) {
        problems.set(name, "is missing");
        continue;
      }
      const size = Object.hasOwn(manifest.sizes, name) ? manifest.sizes[name] : undefined;
      if (size !== undefined && bytes.length !== size) {
        problems.set(name, `is ${bytes.length.toLocaleString("en")} bytes, the manifest says ${size.toLocaleString("en")}`);
        continue;
      }
      const actual = await sha256Hex(bytes);
      if (actual !== manifest.files[name]) {
        problems.set(name, `does not match its sha256 in the manifest (expected ${manifest.files[name].slice(0, 12)}…, found ${actual.slice(0, 12)}…)`);
        continue;
      }
      if (onnx.has(name) || !owned.has(name)) contents.set(name, bytes);
    }
  }
  const hint = "the file was modified, swapped or damaged; get the bundle from its publisher again";
  if (strict && problems.size) {
    const [name, why] = problems.entries().next().value as [string, string];
    throw new BundleError(`${source}: ${name} ${why}; a signed bundle must be exactly what its publisher signed`, hint);
  }
  for (const [fmt, entry] of Object.entries(manifest.formats)) {
    const unlisted = formatFiles(manifest, fmt).filter((f) => !Object.hasOwn(manifest.files, f)
      || !Object.hasOwn(entry.files ?? {}, f) || entry.files[f] !== manifest.files[f]);
    if (unlisted.length) {
      throw new BundleError(`${source}/${MANIFEST}: format ${JSON.stringify(fmt)} references files it does not hash consistently: ${unlisted.join(", ")}`,
        "the bundle is damaged; re-export it");
    }
  }
  const shared = [...problems].filter(([name]) => !owned.has(name));
  if (shared.length) throw new BundleError(`${source}: ${shared[0][0]} ${shared[0][1]}`, "the file is corrupt, modified or missing; re-export or re-download the bundle");
  const damaged: Record<string, string> = {};
  for (const fmt of Object.keys(manifest.formats)) {
    const bad = formatFiles(manifest, fmt).filter((f) => problems.has(f)).map((f) => `${f} ${problems.get(f)}`);
    if (bad.length) damaged[fmt] = bad.join("; ");
  }
  if (!Object.hasOwn(manifest.formats, FORMAT)) {
    throw new BundleError(`${source} has no ${FORMAT} files (it carries: ${Object.keys(manifest.formats).join(", ")})`,
      `the SDK runs ONNX programs; re-export with \`edgetailor export bundle --formats ${[...Object.keys(manifest.formats), FORMAT].join(",")}\``);
  }
  if (damaged[FORMAT]) throw new BundleError(`${source}: ${damaged[FORMAT]}`, "the file is corrupt, modified or missing; re-export or re-download the bundle");
  return { contents, damaged };
}
