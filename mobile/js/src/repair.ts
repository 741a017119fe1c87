/**
 * Rebuilding a damaged state index from the records it pointed at: loaded
 * only when a store needs it (`DeviceRuntime.repair`, or `reset()` on a
 * damaged state), as Python's `repair_state` salvages what SQLite can read.
 */

import { hex, sha256, sha256Hex } from "./crypto.js";
import { emptyState, exclusive, parseIndex, readSampleRecord, STATE, type StateDocument } from "./state.js";
import type { Store } from "./store.js";

/**
 * Rebuild `state.json` from the sample records in the store, each checked
 * image by image against its sha256; the personalization is dropped
 * (personalize again). What the device trusts lives in `trust.json`, untouched.
 */
export async function repairState(store: Store): Promise<{ samples: number; damagedRecords: number }> {
  return exclusive(store, async () => {
    const doc = emptyState();
    let damagedRecords = 0;
    let nextId = 1;
    const old = await store.get(STATE);
    let labels: string[] | null = null;
    try {
      if (old) labels = parseIndex<StateDocument>(old, STATE).labels;
    } catch {
      // the names are lost with the index; the next open records the bundle's
    }
    for (const key of (await store.keys()).filter((k) => /^samples\/\d{6}$/.test(k)).sort()) {
      nextId = Math.max(nextId, Number(key.slice(8)) + 1);
      const bytes = await store.get(key);
      const record = bytes && readSampleRecord(bytes);
      let intact = Boolean(record);
      for (let i = 0; record && intact && i < record.labels.length; i++) {
        const image = record.images.subarray(i * record.sampleBytes, (i + 1) * record.sampleBytes);
        intact = hex(await sha256(image)) === hex(record.digests.subarray(32 * i, 32 * i + 32));
      }
      if (!record || !intact || !bytes) {
        damagedRecords++;
        continue;
      }
      doc.samples.push({ key, count: record.labels.length, height: record.height, width: record.width,
        ...(record.dtype === "float32" ? { dtype: record.dtype } : {}), sha256: await sha256Hex(bytes) });
    }
    for (const key of await store.keys()) {
      const match = /^personalization\/(\d{6})\//.exec(key);
      if (match) nextId = Math.max(nextId, Number(match[1]) + 1);
    }
    doc.labels = labels;
    doc.nextId = nextId;
    doc.samplesGeneration = 1;
    await store.put(STATE, new TextEncoder().encode(JSON.stringify(doc)));
    return { samples: doc.samples.reduce((sum, s) => sum + s.count, 0), damagedRecords };
  });
}
