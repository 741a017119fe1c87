/**
 * The device's state on a `Store`: the user's samples, the active
 * personalization and the trust memory (pinned and revoked keys, the newest
 * release accepted per name), as the Python runtime keeps them in SQLite
 * (`device/store.py`).
 *
 * Layout: `state.json` (small; points at everything else) and records
 * `samples/<n>` (one per `addSamples` call) and `personalization/<n>/le`,
 * `.../gn` (the trained weights: float32, the manifest's parameter order). Every record's
 * sha256 is in `state.json`: a damaged record is skipped (samples) or set
 * aside (a personalization: GE answers alone), never trusted. A commit writes
 * its records first and `state.json` last, so a failed write leaves the
 * previous state, and a `samplesGeneration` counter lets a personalization
 * notice samples added while it trained (compare-and-swap).
 */

import { sha256Hex } from "./crypto.js";
import { StateError } from "./errors.js";
import type { Store } from "./store.js";

const STATE = "state.json";
const FORMAT = "edgetailor-sdk-state";

interface SampleRecord {
  key: string;
  count: number;
  height: number;
  width: number;
  sha256: string;
}

export interface PersonalizationRecord {
  id: number;
  bundleId: string;
  le: { key: string; sha256: string };
  gn: { key: string; sha256: string };
  threshold: number;
  samplesGeneration: number;
  report: Record<string, unknown>;
}

interface StateDocument {
  format: string;
  version: number;
  nextId: number;
  samples: SampleRecord[];
  samplesGeneration: number;
  personalization: PersonalizationRecord | null;
  trusted: Record<string, { key: string; why: string }>; // key id -> base64 raw key
  revoked: Record<string, string>; // key id -> revoked by
  trustPinned: boolean;
  releases: Record<string, { version: number; digest: string }>;
}

function emptyState(): StateDocument {
  return { format: FORMAT, version: 1, nextId: 1, samples: [], samplesGeneration: 0, personalization: null,
    trusted: {}, revoked: {}, trustPinned: false, releases: {} };
}

export class SamplesChanged extends Error {}

export class DeviceState {
  damagedSamples = 0;

  private constructor(readonly store: Store, private doc: StateDocument) {}

  static async open(store: Store): Promise<DeviceState> {
    return new DeviceState(store, await DeviceState.read(store));
  }

  private static async read(store: Store): Promise<StateDocument> {
    const bytes = await store.get(STATE);
    if (!bytes) return emptyState();
    let doc: StateDocument;
    try {
      doc = JSON.parse(new TextDecoder().decode(bytes)) as StateDocument;
    } catch (error) {
      throw new StateError(`the device state (${STATE}) is damaged: ${(error as Error).message}`,
        `the samples are intact in samples/*; delete ${STATE} from the store to start afresh (then give trustedKeys again)`);
    }
    if (doc.format !== FORMAT || doc.version !== 1) {
      throw new StateError(`${STATE} is not an edgetailor SDK state (format ${JSON.stringify(doc.format)}, version ${doc.version})`,
        "give the runtime a store of its own");
    }
    return doc;
  }

  /** Re-read state.json (another runtime on the same store may have committed). */
  async refresh(): Promise<void> {
    this.doc = await DeviceState.read(this.store);
  }

  private async commit(doc: StateDocument): Promise<void> {
    try {
      await this.store.put(STATE, new TextEncoder().encode(JSON.stringify(doc)));
    } catch (error) {
      throw new StateError(`could not write the device state: ${(error as Error).message}`,
        "free some space and try again; what was stored before is intact");
    }
    this.doc = doc;
  }

  private async putRecord(key: string, bytes: Uint8Array): Promise<string> {
    try {
      await this.store.put(key, bytes);
    } catch (error) {
      throw new StateError(`could not store ${key}: ${(error as Error).message}`,
        "free some space and try again; what was stored before is intact");
    }
    return sha256Hex(bytes);
  }

  private copy(): StateDocument {
    return structuredClone(this.doc);
  }

  // samples ---------------------------------------------------------------
  get samplesGeneration(): number {
    return this.doc.samplesGeneration;
  }

  sampleCount(): number {
    return this.doc.samples.reduce((sum, s) => sum + s.count, 0);
  }

  /** Store prepared samples (uint8 N*H*W) and their label indices as one record; then point state.json at it. */
  async addSamples(images: Uint8Array, labels: Int32Array, height: number, width: number): Promise<number> {
    const doc = this.copy();
    const key = `samples/${String(doc.nextId++).padStart(6, "0")}`;
    const record = new Uint8Array(labels.length * 4 + images.length);
    record.set(new Uint8Array(Int32Array.from(labels).buffer), 0);
    record.set(images, labels.length * 4);
    const sha256 = await this.putRecord(key, record);
    doc.samples.push({ key, count: labels.length, height, width, sha256 });
    doc.samplesGeneration++;
    await this.commit(doc);
    return labels.length;
  }

  /** Every readable sample; damaged records are skipped and counted in `damagedSamples`. */
  async loadSamples(height: number, width: number): Promise<{ images: Uint8Array; labels: Int32Array; generation: number }> {
    const pixels = height * width;
    const parts: { images: Uint8Array; labels: Int32Array }[] = [];
    this.damagedSamples = 0;
    for (const s of this.doc.samples) {
      const bytes = await this.store.get(s.key);
      if (!bytes || bytes.length !== s.count * (4 + pixels) || s.height !== height || s.width !== width
          || (await sha256Hex(bytes)) !== s.sha256) {
        this.damagedSamples += s.count;
        continue;
      }
      const labels = new Int32Array(bytes.slice(0, s.count * 4).buffer);
      parts.push({ images: bytes.subarray(s.count * 4), labels });
    }
    const total = parts.reduce((sum, p) => sum + p.labels.length, 0);
    const images = new Uint8Array(total * pixels);
    const labels = new Int32Array(total);
    let at = 0;
    for (const p of parts) {
      images.set(p.images, at * pixels);
      labels.set(p.labels, at);
      at += p.labels.length;
    }
    return { images, labels, generation: this.doc.samplesGeneration };
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
    if (!le || !gn || (await sha256Hex(le)) !== record.le.sha256 || (await sha256Hex(gn)) !== record.gn.sha256) {
      throw new StateError(`the stored personalization ${record.id} is damaged or missing`,
        "personalize again (the samples are kept), or reset()");
    }
    return { record, le, gn };
  }

  /** Commit a personalization trained on samples of `generation`; throws SamplesChanged if samples were added since. */
  async savePersonalization(bundleId: string, le: Uint8Array, gn: Uint8Array, threshold: number,
                            report: Record<string, unknown>, generation: number): Promise<number> {
    await this.refresh();
    if (this.doc.samplesGeneration !== generation) throw new SamplesChanged();
    const doc = this.copy();
    const id = doc.nextId++;
    const base = `personalization/${String(id).padStart(6, "0")}`;
    const leSha = await this.putRecord(`${base}/le`, le);
    const gnSha = await this.putRecord(`${base}/gn`, gn);
    const previous = doc.personalization;
    doc.personalization = { id, bundleId, le: { key: `${base}/le`, sha256: leSha }, gn: { key: `${base}/gn`, sha256: gnSha },
      threshold, samplesGeneration: generation, report };
    await this.commit(doc);
    if (previous) await this.deleteQuietly(previous.le.key, previous.gn.key);
    return id;
  }

  async clearPersonalization(deleteSamples: boolean): Promise<void> {
    const doc = this.copy();
    const stale = doc.personalization ? [doc.personalization.le.key, doc.personalization.gn.key] : [];
    doc.personalization = null;
    if (deleteSamples) {
      stale.push(...doc.samples.map((s) => s.key));
      doc.samples = [];
      doc.samplesGeneration++;
    }
    await this.commit(doc);
    await this.deleteQuietly(...stale);
  }

  /** Records no longer referenced (left by a failed commit or an old personalization). */
  async sweep(): Promise<void> {
    const live = new Set([STATE, ...this.doc.samples.map((s) => s.key)]);
    if (this.doc.personalization) live.add(this.doc.personalization.le.key).add(this.doc.personalization.gn.key);
    await this.deleteQuietly(...(await this.store.keys()).filter((k) => !live.has(k)));
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
    return Object.fromEntries(Object.entries(this.doc.trusted).map(([id, v]) => [id, v.key]));
  }

  revokedKeys(): Set<string> {
    return new Set(Object.keys(this.doc.revoked));
  }

  get trustPinned(): boolean {
    return this.doc.trustPinned;
  }

  acceptedRelease(name: string): { version: number; digest: string } | null {
    return this.doc.releases[name] ?? null;
  }

  /** Remember trust changes (keys pinned, endorsed or revoked; a release accepted) in one commit. */
  async rememberTrust(change: { trust?: [string, string, string][]; revoke?: [string, string][];
                                release?: [string, number, string] }): Promise<void> {
    if (!change.trust?.length && !change.revoke?.length && !change.release) return;
    const doc = this.copy();
    for (const [id, key, why] of change.trust ?? []) {
      doc.trusted[id] = { key, why };
      doc.trustPinned = true;
    }
    for (const [id, by] of change.revoke ?? []) doc.revoked[id] = by;
    if (change.release) {
      const [name, version, digest] = change.release;
      doc.releases[name] = { version, digest };
    }
    await this.commit(doc);
  }
}
