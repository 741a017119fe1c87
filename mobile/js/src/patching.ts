/**
 * Filling trained weights into the bundle's personalized-model template, as
 * the Python runtime's `toolkit/patching.py`: export recorded the byte
 * offset of every placeholder float, so the device writes little-endian
 * float32 values over them, with no converter on the device.
 */

import { BundleError } from "./errors.js";

interface PatchTable {
  version: number;
  size: number;
  threshold: number[];
  values: Record<string, Record<string, { elements: number[]; offsets: number[] }>>;
}

/** As Python's `PatchTable.check`: one element per offset, every offset inside the file, no two values on the same bytes. */
function checkTable(table: PatchTable, where: string): void {
  const spans = [...table.threshold];
  for (const params of Object.values(table.values)) {
    for (const [name, { elements, offsets }] of Object.entries(params)) {
      if (!Array.isArray(elements) || !Array.isArray(offsets) || elements.length !== offsets.length
          || elements.some((e) => !Number.isSafeInteger(e) || e < 0)) {
        throw new BundleError(`the patch table of ${where}: ${name} has ${elements?.length} elements for ${offsets?.length} offsets`,
          "the bundle is damaged; re-export it");
      }
      spans.push(...offsets);
    }
  }
  if (spans.some((o) => !Number.isSafeInteger(o) || o < 0 || o > table.size - 4)) {
    throw new BundleError(`the patch table of ${where} points outside it`, "the bundle is damaged; re-export it");
  }
  spans.sort((a, b) => a - b);
  if (spans.some((o, i) => i > 0 && o - spans[i - 1] < 4)) throw new BundleError(`the patch table of ${where} has two values overlapping`, "the bundle is damaged; re-export it");
}

export function applyPatches(template: Uint8Array, tableText: string, weights: Record<string, Record<string, Float32Array>>,
                             threshold: number, where: string): Uint8Array {
  let table: PatchTable;
  try {
    table = JSON.parse(tableText) as PatchTable;
  } catch (error) {
    throw new BundleError(`the patch table of ${where} is not JSON: ${(error as Error).message}`, "the bundle is damaged; re-export it");
  }
  if (table.version !== 1 || (table as { dtype?: unknown }).dtype !== "float32" || !Number.isSafeInteger(table.size)
      || typeof table.values !== "object" || !Array.isArray(table.threshold)) {
    throw new BundleError(`the patch table of ${where} is not one this SDK reads (version ${table.version})`, "re-export the bundle");
  }
  checkTable(table, where);
  if (template.length !== table.size) {
    throw new BundleError(`${where} has ${template.length} bytes, its patch table was made for ${table.size}`, "the bundle is damaged; re-export it");
  }
  const out = template.slice();
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  const put = (offset: number, value: number) => {
    if (!Number.isSafeInteger(offset) || offset < 0 || offset > out.length - 4) {
      throw new BundleError(`the patch table of ${where} points outside it (offset ${offset})`, "the bundle is damaged; re-export it");
    }
    view.setFloat32(offset, value, true);
  };
  for (const [part, params] of Object.entries(table.values)) {
    for (const [name, { elements, offsets }] of Object.entries(params)) {
      const flat = weights[part]?.[name];
      if (!flat) throw new BundleError(`${where} expects ${part} parameter ${JSON.stringify(name)}, which the personalization lacks`, "personalize again with this bundle");
      elements.forEach((element, k) => {
        if (element >= flat.length) throw new BundleError(`${where} expects ${part}.${name} with more than ${flat.length} values`, "personalize again with this bundle");
        put(offsets[k], flat[element]);
      });
    }
  }
  for (const offset of table.threshold) put(offset, threshold);
  return out;
}
