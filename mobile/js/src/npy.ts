/**
 * NumPy's `.npy` and `.npz` files: the bundle's arrays (LE's and GN's initial
 * parameters, the replay samples and GE's outputs on them).
 *
 * Written here rather than taken from npm: the format is a 10-byte preamble,
 * a Python-dict header and the raw little-endian data
 * (numpy.lib.format), and the SDK reads only the few dtypes bundles use.
 * An `.npz` is a zip of `.npy` files, read with fflate.
 */

import { unzipSync } from "fflate";
import { BundleError } from "./errors.js";

export type NpyDtype = "<f4" | "<f8" | "|u1" | "<i8" | "<i4" | "|b1" | "<u2";
export type NpyData = Float32Array | Float64Array | Uint8Array | BigInt64Array | Int32Array | Uint16Array;

export interface NpyArray {
  dtype: NpyDtype;
  shape: number[];
  data: NpyData;
}

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY

const ITEM_SIZE: Record<NpyDtype, number> = { "<f4": 4, "<f8": 8, "|u1": 1, "<i8": 8, "<i4": 4, "|b1": 1, "<u2": 2 };

function aligned(bytes: Uint8Array, offset: number, length: number): ArrayBuffer {
  // typed arrays need their byte offset to be a multiple of the item size: copy the data out
  return bytes.slice(offset, offset + length).buffer;
}

/** Parse one `.npy` file; `where` names it in errors. */
export function parseNpy(bytes: Uint8Array, where: string): NpyArray {
  if (bytes.length < 10 || MAGIC.some((b, i) => bytes[i] !== b)) {
    throw new BundleError(`${where} is not a .npy file`);
  }
  const major = bytes[6];
  const headerLength = major === 1 ? bytes[8] | (bytes[9] << 8) : new DataView(bytes.buffer, bytes.byteOffset).getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  if (start + headerLength > bytes.length) throw new BundleError(`${where}: its .npy header is cut short`);
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (!descr || !fortran || shapeText === undefined) throw new BundleError(`${where}: unreadable .npy header ${header.trim()}`);
  if (fortran === "True") throw new BundleError(`${where}: Fortran-ordered arrays are not supported`);
  if (!(descr in ITEM_SIZE)) throw new BundleError(`${where}: dtype ${descr} is not one a bundle uses`);
  const dtype = descr as NpyDtype;
  const shape = shapeText.split(",").map((s) => s.trim()).filter((s) => s.length > 0).map(Number);
  if (shape.some((n) => !Number.isSafeInteger(n) || n < 0)) throw new BundleError(`${where}: bad shape (${shapeText})`);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLength;
  const length = count * ITEM_SIZE[dtype];
  if (offset + length > bytes.length) {
    throw new BundleError(`${where} holds ${bytes.length - offset} data bytes, its header promises ${length}`);
  }
  const buffer = aligned(bytes, offset, length);
  const data: NpyData =
    dtype === "<f4" ? new Float32Array(buffer)
    : dtype === "<f8" ? new Float64Array(buffer)
    : dtype === "<i8" ? new BigInt64Array(buffer)
    : dtype === "<i4" ? new Int32Array(buffer)
    : dtype === "<u2" ? new Uint16Array(buffer)
    : new Uint8Array(buffer);
  return { dtype, shape, data };
}

/** Parse an `.npz`: its arrays by name (without the `.npy` suffix). */
export function parseNpz(bytes: Uint8Array, where: string): Record<string, NpyArray> {
  let members: Record<string, Uint8Array>;
  try {
    members = unzipSync(bytes);
  } catch (error) {
    throw new BundleError(`${where} is not a readable .npz: ${(error as Error).message}`);
  }
  const out: Record<string, NpyArray> = {};
  for (const [name, data] of Object.entries(members)) {
    out[name.replace(/\.npy$/, "")] = parseNpy(data, `${where}:${name}`);
  }
  return out;
}
