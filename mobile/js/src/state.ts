/**
 * The device's state on a `Store`: the user's samples, the active
 * personalization, and what the device trusts (pinned and revoked keys, the
 * newest release accepted per name), as the Python runtime keeps them in
 * SQLite (`device/store.py`).
 *
 * Records: `samples/<n>` (one per `addSamples` call that added something;
 * self-describing: count, size, labels, each sample's sha256, the samples:
 * uint8 glyphs, or float32 windows and clips under their own magic),
 * `personalization/<n>/le` and `.../gn` (float32 weights, the manifest's
 * order), and two small indexes written last: `state.json` (which records
 * are live, each with its sha256) and `trust.json` (kept apart, so that
 * damage to one never loses the other's revocations).
 *
 * Every change runs under one lock per store, re-reads the indexes, writes
 * its records, and commits by replacing the index: a failed write leaves the
 * previous state, and a personalization trained on samples that changed
 * meanwhile is not committed (compare-and-swap on `samplesGeneration`). A
 * damaged record is skipped (samples) or set aside (a personalization: GE
 * answers alone). A damaged `state.json` opens read-only until `repair.ts`
 * rebuilds it from the sample records.
 */

import { hex, sha256, sha256Hex } from "./crypto.js";
import { StateError } from "./errors.js";
import type { Store } from "./store.js";

export const STATE = "state.json";
const TRUST = "trust.json";
const FORMAT = "edgetailor-sdk-state";
const SAMPLE_MAGIC = 0x31535445; // "ETS1", little-endian: uint8 samples (glyphs)
const SAMPLE_MAGIC_F32 = 0x31465445; // "ETF1": float32 samples (windows, clips), little-endian
const RECORD = /^(samples\/\d{6}|personalization\/\d{6}\/(le|gn))$/; // the only keys the state ever writes or sweeps

interface SampleRecord {
  key: string;
  count: number;
  height: number; // one sample's shape: glyphs H x W, windows channels x length, clips 1 x length
  width: number;
  dtype?: "float32"; // absent: uint8
  sha256: string;
}

export type SampleDtype = "uint8" | "float32";

export interface PersonalizationRecord {
  id: number;
  bundleId: string;
  le: { key: string; sha256: string };
  gn: { key: string; sha256: string };
  threshold: number;
  samplesGeneration: number;
  report: Record<string, unknown>;
}

export interface StateDocument {
  format: string;
  version: number;
  labels: string[] | null; // the bundle's labels the samples' indices refer to
  nextId: number;
  samples: SampleRecord[];
  samplesGeneration: number;
  personalization: PersonalizationRecord | null;
}

interface TrustDocument {
  format: string;
  version: number;
  trusted: Record<string, { key: string; why: string }>; // key id -> base64 raw key
  revoked: Record<string, string>; // key id -> revoked by
  pinned: boolean; // ever trusted a key: then only signed bundles open
  releases: Record<string, { version: number; digest: string }>;
}

export const emptyState = (): StateDocument => ({
  format: FORMAT, version: 1, labels: null, nextId: 1, samples: [], samplesGeneration: 0, personalization: null,
});
const emptyTrust = (): TrustDocument => ({
  format: FORMAT, version: 1, trusted: Object.create(null), revoked: Object.create(null), pinned: false,
  releases: Object.create(null),
});

export class SamplesChanged extends Error {}

/** One queue per store object: every runtime on it takes turns to change it. */
const locks = new WeakMap<Store, Promise<unknown>>();

export function exclusive<T>(store: Store, work: () => Promise<T>): Promise<T> {
  const previous = locks.get(store) ?? Promise.resolve();
  const next = previous.then(work, work);
  locks.set(store, next.catch(() => undefined));
  return next;
}

/** JSON of a record (objects without prototypes: names from a bundle can never reach Object.prototype). */
export function parseIndex<T>(bytes: Uint8Array, what: string): T {
  const value = JSON.parse(new TextDecoder().decode(bytes), (_, v) =>
    v && typeof v === "object" && !Array.isArray(v) ? Object.assign(Object.create(null), v) : v);
  if (value?.format !== FORMAT || value.version !== 1) throw new Error(`${what} is not an edgetailor SDK record`);
  return value as T;
}

async function readIndex<T>(store: Store, key: string, empty: () => T): Promise<{ doc: T; problem: string | null }> {
  const bytes = await store.get(key);
  if (!bytes) return { doc: empty(), problem: null };
  try {
    return { doc: parseIndex<T>(bytes, key), problem: null };
  } catch (error) {
    return { doc: empty(), problem: `${key} is damaged (${(error as Error).message})` };
  }
}

/** A typed array's bytes (little-endian on every platform the SDK runs on). */
const bytesOf = (x: Uint8Array | Float32Array): Uint8Array => new Uint8Array(x.buffer, x.byteOffset, x.byteLength);

function sampleRecord(images: Uint8Array, labels: Int32Array, digests: Uint8Array, height: number, width: number,
                      dtype: SampleDtype): Uint8Array {
  const n = labels.length;
  const out = new Uint8Array(16 + 4 * n + 32 * n + images.length);
  const view = new DataView(out.buffer);
  [dtype === "float32" ? SAMPLE_MAGIC_F32 : SAMPLE_MAGIC, n, height, width].forEach((v, i) => view.setUint32(4 * i, v, true));
  for (let i = 0; i < n; i++) view.setInt32(16 + 4 * i, labels[i], true);
  out.set(digests, 16 + 4 * n);
  out.set(images, 16 + 36 * n);
  return out;
}

/** A sample record's parts; `images` are the samples' bytes, `sampleBytes` each one's share. Null when damaged. */
export function readSampleRecord(bytes: Uint8Array): { labels: Int32Array; digests: Uint8Array; images: Uint8Array; height: number;
                                                       width: number; dtype: SampleDtype; sampleBytes: number } | null {
  if (bytes.length < 16) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const [magic, n, height, width] = [0, 1, 2, 3].map((i) => view.getUint32(4 * i, true));
  const dtype: SampleDtype = magic === SAMPLE_MAGIC_F32 ? "float32" : "uint8";
  const sampleBytes = height * width * (dtype === "float32" ? 4 : 1);
  if ((magic !== SAMPLE_MAGIC && magic !== SAMPLE_MAGIC_F32) || bytes.length !== 16 + 36 * n + n * sampleBytes) return null;
  const labels = new Int32Array(n);
  for (let i = 0; i < n; i++) labels[i] = view.getInt32(16 + 4 * i, true);
  return { labels, digests: bytes.subarray(16 + 4 * n, 16 + 36 * n), images: bytes.subarray(16 + 36 * n), height, width, dtype,
    sampleBytes };
}

export class DeviceState {
  damagedSamples = 0;
  otherSamples = 0;
  private known: { generation: number; keys: Set<string> } | null = null; // digest+label of every stored sample

  private constructor(readonly store: Store, private doc: StateDocument, private trustDoc: TrustDocument,
                      readonly problem: string | null) {}

  /** Open the state; a damaged `state.json` opens read-only (GE alone) and says why. */
  static async open(store: Store): Promise<DeviceState> {
    const state = await readIndex(store, STATE, emptyState);
    const trust = await readIndex(store, TRUST, emptyTrust);
    // damaged trust memory stays locked: only signed bundles, from the keys the app pins again
    if (trust.problem) trust.doc.pinned = true;
    const problems = [state.problem, trust.problem].filter(Boolean);
    const opened = new DeviceState(store, state.doc, trust.doc, state.problem
      ? `${problems.join("; ")}: GE answers alone, and nothing can be stored until repair() rebuilds it from the sample records`
      : null);
    opened.trustProblem = trust.problem;
    if (!state.problem) await exclusive(store, () => opened.sweepLocked());
    return opened;
  }

  trustProblem: string | null = null;

  get readOnly(): boolean {
    return this.problem !== null;
  }

  private async reload(): Promise<void> {
    const state = await readIndex(this.store, STATE, emptyState);
    if (state.problem) throw new StateError(`the device state changed under this runtime and is now damaged: ${state.problem}`, "call repair()");
    this.doc = state.doc;
    const trust = await readIndex(this.store, TRUST, emptyTrust);
    if (!trust.problem) this.trustDoc = trust.doc;
  }

  /** Re-read the indexes (another runtime on the same store may have committed). */
  async refresh(): Promise<void> {
    if (!this.readOnly) await exclusive(this.store, () => this.reload());
  }

  private writable(): void {
    if (this.problem) throw new StateError(`cannot change the state: ${this.problem}`, "call repair(): it keeps every intact sample");
  }

  private async put(key: string, bytes: Uint8Array): Promise<string> {
    try {
      await this.store.put(key, bytes);
    } catch (error) {
      throw new StateError(`could not store ${key}: ${(error as Error).message}`,
        "free some space and try again; what was stored before is intact");
    }
    return sha256Hex(bytes);
  }

  private async commit(doc: StateDocument): Promise<void> {
    await this.put(STATE, new TextEncoder().encode(JSON.stringify(doc)));
    this.doc = doc;
  }

  private copy(): StateDocument {
    return JSON.parse(JSON.stringify(this.doc)) as StateDocument;
  }

  // labels ----------------------------------------------------------------
  /** The samples' label indices refer to the bundle's labels: a bundle with other labels must not read them. */
  async checkLabels(labels: string[]): Promise<void> {
    const check = (stored: string[] | null) => {
      if (stored && JSON.stringify(stored) !== JSON.stringify(labels)) {
        throw new StateError(`this store holds samples for labels ${JSON.stringify(stored)}, but the bundle knows ${JSON.stringify(labels)}`,
          "use a store of its own for this bundle");
      }
    };
    check(this.doc.labels);
    if (this.doc.labels || this.readOnly) return;
    await exclusive(this.store, async () => {
      await this.reload();
      check(this.doc.labels);
      if (!this.doc.labels) await this.commit({ ...this.copy(), labels });
    });
  }

  // samples ---------------------------------------------------------------
  get samplesGeneration(): number {
    return this.doc.samplesGeneration;
  }

  sampleCount(): number {
    return this.doc.samples.reduce((sum, s) => sum + s.count, 0);
  }

  private async knownSamples(): Promise<Set<string>> {
    if (this.known?.generation !== this.doc.samplesGeneration) {
      const keys = new Set<string>();
      for (const s of this.doc.samples) {
        const record = await this.readSamples(s);
        if (!record) continue;
        for (let i = 0; i < record.labels.length; i++) keys.add(`${hex(record.digests.subarray(32 * i, 32 * i + 32))}:${record.labels[i]}`);
      }
      this.known = { generation: this.doc.samplesGeneration, keys };
    }
    return this.known.keys;
  }

  private async readSamples(s: SampleRecord) {
    const bytes = await this.store.get(s.key);
    if (!bytes || (await sha256Hex(bytes)) !== s.sha256) return null;
    const record = readSampleRecord(bytes);
    return record && record.labels.length === s.count && record.height === s.height && record.width === s.width
      && record.dtype === (s.dtype ?? "uint8") ? record : null;
  }

  /**
   * Store prepared samples (N of height x width: uint8 glyphs, or float32 windows and clips) with label
   * indices; the same sample with the same label is stored once. Returns how many were new.
   */
  async addSamples(samples: Uint8Array | Float32Array, labels: Int32Array, height: number, width: number): Promise<number> {
    this.writable();
    const dtype: SampleDtype = samples instanceof Float32Array ? "float32" : "uint8";
    const images = bytesOf(samples);
    const sampleBytes = height * width * samples.BYTES_PER_ELEMENT;
    const digests = await Promise.all(Array.from(labels, (_, i) => sha256(images.subarray(i * sampleBytes, (i + 1) * sampleBytes))));
    return exclusive(this.store, async () => {
      await this.reload();
      const known = await this.knownSamples();
      const fresh: number[] = [];
      const seen = new Set<string>();
      labels.forEach((label, i) => {
        const key = `${hex(digests[i])}:${label}`;
        if (!known.has(key) && !seen.has(key)) {
          seen.add(key);
          fresh.push(i);
        }
      });
      if (!fresh.length) return 0;
      const kept = new Uint8Array(fresh.length * sampleBytes);
      const keptDigests = new Uint8Array(fresh.length * 32);
      fresh.forEach((i, j) => {
        kept.set(images.subarray(i * sampleBytes, (i + 1) * sampleBytes), j * sampleBytes);
        keptDigests.set(digests[i], 32 * j);
      });
      const doc = this.copy();
      const key = `samples/${String(doc.nextId++).padStart(6, "0")}`;
      const record = sampleRecord(kept, Int32Array.from(fresh, (i) => labels[i]), keptDigests, height, width, dtype);
      const sha = await this.put(key, record);
      doc.samples.push({ key, count: fresh.length, height, width, ...(dtype === "float32" ? { dtype } : {}), sha256: sha });
      doc.samplesGeneration++;
      await this.commit(doc);
      for (const k of seen) known.add(k);
      this.known = { generation: doc.samplesGeneration, keys: known };
      return fresh.length;
    });
  }

  /**
   * Every intact sample of this shape and dtype; damaged records are skipped and counted in
   * `damagedSamples`, samples of another kind (another bundle's, with the same labels) in `otherSamples`.
   */
  async loadSamples(height: number, width: number, dtype: SampleDtype = "uint8"): Promise<{ images: Uint8Array | Float32Array;
                                                                                           labels: Int32Array; generation: number }> {
    return exclusive(this.store, async () => {
      if (!this.readOnly) await this.reload();
      const sampleBytes = height * width * (dtype === "float32" ? 4 : 1);
      const parts: { images: Uint8Array; labels: Int32Array }[] = [];
      this.damagedSamples = 0;
      this.otherSamples = 0;
      for (const s of this.doc.samples) {
        if (s.height !== height || s.width !== width || (s.dtype ?? "uint8") !== dtype) {
          this.otherSamples += s.count;
          continue;
        }
        const record = await this.readSamples(s);
        if (!record) {
          this.damagedSamples += s.count;
          continue;
        }
        parts.push(record);
      }
      const total = parts.reduce((sum, p) => sum + p.labels.length, 0);
      const bytes = new Uint8Array(total * sampleBytes);
      const labels = new Int32Array(total);
      let at = 0;
      for (const p of parts) {
        bytes.set(p.images, at * sampleBytes);
        labels.set(p.labels, at);
        at += p.labels.length;
      }
      const images = dtype === "float32" ? new Float32Array(bytes.buffer) : bytes;
      return { images, labels, generation: this.doc.samplesGeneration };
    });
  }

  // personalization -------------------------------------------------------
  get personalization(): PersonalizationRecord | null {
    return this.doc.personalization;
  }

  /** The active personalization's weights, checked against their sha256; throws StateError when damaged. */
  async loadPersonalization(): Promise<{ record: PersonalizationRecord; le: Uint8Array; gn: Uint8Array } | null> {
    const record = this.doc.personalization;
    if (!record) return null;
    const le = await this.store.get(record.le.key);
    const gn = await this.store.get(record.gn.key);
    if (!le || !gn || (await sha256Hex(le)) !== record.le.sha256 || (await sha256Hex(gn)) !== record.gn.sha256
        || !Number.isFinite(record.threshold)) {
      throw new StateError(`the stored personalization ${record.id} is damaged or missing`,
        "personalize again (the samples are kept), or reset()");
    }
    return { record, le, gn };
  }

  /** Commit a personalization trained on samples of `generation`; throws SamplesChanged if samples changed since. */
  async savePersonalization(bundleId: string, le: Uint8Array, gn: Uint8Array, threshold: number,
                            report: Record<string, unknown>, generation: number): Promise<number> {
    this.writable();
    if (!Number.isFinite(threshold)) throw new StateError(`refusing to store a personalization with gate threshold ${threshold}`, "personalize again");
    return exclusive(this.store, async () => {
      await this.reload();
      if (this.doc.samplesGeneration !== generation) throw new SamplesChanged();
      const doc = this.copy();
      const id = doc.nextId++;
      const base = `personalization/${String(id).padStart(6, "0")}`;
      const leSha = await this.put(`${base}/le`, le);
      const gnSha = await this.put(`${base}/gn`, gn);
      const previous = doc.personalization;
      doc.personalization = { id, bundleId, le: { key: `${base}/le`, sha256: leSha }, gn: { key: `${base}/gn`, sha256: gnSha },
        threshold, samplesGeneration: generation, report };
      await this.commit(doc);
      if (previous) await this.deleteQuietly(previous.le.key, previous.gn.key);
      return id;
    });
  }

  async clearPersonalization(deleteSamples: boolean): Promise<void> {
    this.writable();
    await exclusive(this.store, async () => {
      await this.reload();
      const doc = this.copy();
      doc.personalization = null;
      if (deleteSamples) {
        doc.samples = [];
        doc.samplesGeneration++;
      }
      await this.commit(doc);
      await this.sweepLocked();
    });
  }

  /** Delete the state's own records that no index names (a failed commit's, a replaced personalization's). */
  private async sweepLocked(): Promise<void> {
    const live = new Set(this.doc.samples.map((s) => s.key));
    if (this.doc.personalization) live.add(this.doc.personalization.le.key).add(this.doc.personalization.gn.key);
    let keys: string[];
    try {
      keys = await this.store.keys();
    } catch {
      return; // tidying is optional
    }
    // Only ids below the committed nextId: a record with a higher id may be another runtime's commit in flight.
    // (A failed commit's records keep their id, and the next commit reuses it, overwriting them.)
    const committed = (k: string) => Number(/\d{6}/.exec(k)?.[0]) < this.doc.nextId;
    await this.deleteQuietly(...keys.filter((k) => RECORD.test(k) && committed(k) && !live.has(k)));
  }

  private async deleteQuietly(...keys: string[]): Promise<void> {
    for (const key of keys) {
      try {
        await this.store.delete(key);
      } catch {
        // an unreferenced record costs space only; the next sweep retries
      }
    }
  }

  // trust memory ----------------------------------------------------------
  trustedKeys(): Record<string, string> {
    return Object.fromEntries(Object.entries(this.trustDoc.trusted).map(([id, v]) => [id, v.key]));
  }

  revokedKeys(): Set<string> {
    return new Set(Object.keys(this.trustDoc.revoked));
  }

  get trustPinned(): boolean {
    return this.trustDoc.pinned;
  }

  acceptedRelease(name: string): { version: number; digest: string } | null {
    return Object.hasOwn(this.trustDoc.releases, name) ? this.trustDoc.releases[name] : null;
  }

  /**
   * Remember what the device learned to trust, merged into the stored record
   * (keys and revocations only accumulate; a release's version only rises),
   * so that two runtimes never undo each other's revocations. A state that
   * cannot be written keeps them for this run only, as Python's read-only state does.
   */
  async rememberTrust(change: { trust?: [string, string, string][]; revoke?: [string, string][];
                                release?: [string, number, string] }): Promise<void> {
    const apply = (doc: TrustDocument) => {
      for (const [id, key, why] of change.trust ?? []) {
        if (!Object.hasOwn(doc.trusted, id)) doc.trusted[id] = { key, why };
        doc.pinned = true;
      }
      for (const [id, by] of change.revoke ?? []) if (!Object.hasOwn(doc.revoked, id)) doc.revoked[id] = by;
      if (change.release) {
        const [name, version, digest] = change.release;
        const accepted = Object.hasOwn(doc.releases, name) ? doc.releases[name] : null;
        if (!accepted || version > accepted.version) doc.releases[name] = { version, digest };
      }
    };
    if (!change.trust?.length && !change.revoke?.length && !change.release) return;
    apply(this.trustDoc);
    if (this.readOnly || this.trustProblem) return;
    await exclusive(this.store, async () => {
      const stored = await readIndex(this.store, TRUST, emptyTrust);
      if (stored.problem) return;
      apply(stored.doc);
      await this.put(TRUST, new TextEncoder().encode(JSON.stringify(stored.doc)));
      this.trustDoc = stored.doc;
    });
  }
}
