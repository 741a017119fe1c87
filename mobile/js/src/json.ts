/**
 * JSON as the device reads it from a bundle: depth-checked before parsing,
 * and put into Python's canonical form (`json.dumps(sort_keys=True,
 * separators=(",", ":"), ensure_ascii=False)`) for digests and key statements.
 *
 * The canonical form keeps each number's literal text instead of
 * re-printing it: JavaScript prints 60.0 as "60" and 1e-06 as "0.000001",
 * Python keeps them, and export writes the manifest as Python prints it. So
 * a bundle's id here is the Python runtime's id.
 */

import { BundleError } from "./errors.js";
import { checkLimit, type Limits } from "./limits.js";

/** How deeply `text` nests, counting brackets outside strings (before JSON.parse recurses into it). */
export function jsonDepth(text: string): number {
  let depth = 0;
  let deepest = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c) i++; // backslash: skip the escaped character
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x7b || c === 0x5b) deepest = Math.max(deepest, ++depth);
    else if (c === 0x7d || c === 0x5d) depth--;
  }
  return deepest;
}

/** Decode and parse JSON a bundle holds, within the limits; `where` names it in errors. */
export function parseBundleJson(bytes: Uint8Array, where: string, limits: Limits): { value: unknown; text: string } {
  checkLimit(limits, "maxManifestBytes", bytes.length, `${where} (bytes)`);
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new BundleError(`${where} is not UTF-8 text`, "the bundle is damaged; re-export it");
  }
  checkLimit(limits, "maxJsonDepth", jsonDepth(text), `${where} nests`);
  try {
    return { value: JSON.parse(text), text };
  } catch (error) {
    throw new BundleError(`${where} is not valid JSON: ${(error as Error).message}`, "the bundle is damaged; re-export it");
  }
}

/** Python's `json.dumps(s, ensure_ascii=False)` of one string. */
function pythonString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x22) out += '\\"';
    else if (c === 0x5c) out += "\\\\";
    else if (c === 0x0a) out += "\\n";
    else if (c === 0x0d) out += "\\r";
    else if (c === 0x09) out += "\\t";
    else if (c === 0x08) out += "\\b";
    else if (c === 0x0c) out += "\\f";
    else if (c < 0x20) out += "\\u" + c.toString(16).padStart(4, "0");
    else if (c >= 0xd800 && c <= 0xdfff && !(c <= 0xdbff && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00)) {
      if (c >= 0xdc00 && i > 0 && (s.charCodeAt(i - 1) & 0xfc00) === 0xd800) out += s[i]; // a pair's second half
      else throw new BundleError("a string holds a lone surrogate, which UTF-8 cannot encode", "the bundle is damaged; re-export it");
    } else out += s[i];
  }
  return out + '"';
}

/**
 * The canonical form of JSON `text`, numbers as written. A small recursive
 * descent over text that JSON.parse has already accepted (so it only needs
 * to find token boundaries, not to validate).
 */
export function canonicalJson(text: string): string {
  let at = 0;
  const space = () => {
    while (at < text.length && " \t\n\r".includes(text[at])) at++;
  };
  const stringToken = (): string => {
    const start = at;
    at++;
    while (text[at] !== '"') at += text[at] === "\\" ? 2 : 1;
    at++;
    return JSON.parse(text.slice(start, at)) as string;
  };
  const value = (): string => {
    space();
    const c = text[at];
    if (c === "{") {
      at++;
      const members: [string, string][] = [];
      space();
      if (text[at] === "}") {
        at++;
        return "{}";
      }
      for (;;) {
        space();
        const key = stringToken();
        space();
        at++; // ':'
        members.push([key, value()]);
        space();
        if (text[at++] === "}") break; // else ','
      }
      members.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
      // Python keeps the last of duplicate keys, in the first one's place; sorted, it is the last one of the run
      const unique = members.filter((m, i) => i + 1 === members.length || members[i + 1][0] !== m[0]);
      return "{" + unique.map(([k, v]) => `${pythonString(k)}:${v}`).join(",") + "}";
    }
    if (c === "[") {
      at++;
      const items: string[] = [];
      space();
      if (text[at] === "]") {
        at++;
        return "[]";
      }
      for (;;) {
        items.push(value());
        space();
        if (text[at++] === "]") break;
      }
      return "[" + items.join(",") + "]";
    }
    if (c === '"') return pythonString(stringToken());
    const start = at;
    while (at < text.length && !",]} \t\n\r".includes(text[at])) at++;
    const literal = text.slice(start, at);
    if (/^-?\d/.test(literal) && !Number.isFinite(Number(literal))) {
      throw new BundleError(`a number (${literal.slice(0, 20)}) has no canonical JSON form`, "the bundle is damaged or was not written by edgetailor; re-export it");
    }
    return literal;
  };
  return value();
}

/** Python's canonical JSON of a value built in JavaScript (key statements: strings and objects only). */
export function canonicalOf(value: unknown): string {
  if (value === null || typeof value === "boolean") return JSON.stringify(value);
  if (typeof value === "string") return pythonString(value);
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new BundleError("a key statement holds a non-finite number");
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return "[" + value.map(canonicalOf).join(",") + "]";
  const entries = Object.entries(value as Record<string, unknown>).sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  return "{" + entries.map(([k, v]) => `${pythonString(k)}:${canonicalOf(v)}`).join(",") + "}";
}
