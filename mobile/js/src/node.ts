/**
 * Node-only parts of the SDK (`@edgetailor/sdk/node`), kept out of the main
 * entry so that browser and React Native bundles never see `node:fs`.
 */

import { lstat, mkdir, open, readdir, readFile, realpath, rename, rm, stat } from "node:fs/promises";
import { dirname, join, relative, sep } from "node:path";
import { MANIFEST, SIGNATURE, setLocalBundleReader, type Members } from "./bundle.js";
import { BundleError } from "./errors.js";
import { checkLimit, type Limits } from "./limits.js";
import type { Store } from "./store.js";

/** An unpacked bundle directory: members read on demand, symbolic links and escapes refused. */
async function directoryMembers(dir: string, source: string, limits: Limits): Promise<Members | null> {
  let info;
  try {
    info = await stat(dir);
  } catch {
    throw new BundleError(`no bundle at ${dir}`, "export one with `edgetailor export bundle --model DIR --out BUNDLE`");
  }
  if (!info.isDirectory()) return null;
  const root = await realpath(dir);
  return {
    async read(names) {
      const out: Record<string, Uint8Array> = {};
      for (const name of names) {
        const file = join(dir, ...name.split("/"));
        let entry;
        try {
          entry = await lstat(file);
        } catch {
          continue; // missing: reported by the caller
        }
        if (entry.isSymbolicLink() || !(await realpath(file)).startsWith(root + sep)) {
          throw new BundleError(`${source}: ${name} is a symbolic link or leads outside the bundle`,
            "a bundle holds plain files only; re-export or re-download it");
        }
        const limit = name === MANIFEST || name === SIGNATURE ? "maxManifestBytes" : "maxBundleBytes";
        checkLimit(limits, limit, entry.size, `${source}/${name} (bytes)`);
        out[name] = new Uint8Array(await readFile(file));
      }
      return out;
    },
  };
}

setLocalBundleReader({
  directory: directoryMembers,
  async file(path, limits) {
    checkLimit(limits, "maxBundleBytes", (await stat(path)).size, `${path} (bytes)`);
    return new Uint8Array(await readFile(path));
  },
});

/**
 * A store in a directory, one file per key. `put` writes a temporary file,
 * fsyncs it, renames it over the old one and fsyncs the directory: after a
 * crash the key holds the old bytes or the new ones, as the Python runtime's
 * `toolkit/atomic.py` does.
 */
export class NodeFileStore implements Store {
  constructor(readonly dir: string) {}

  private path(key: string): string {
    if (!key || key.split("/").some((p) => p === "" || p === "." || p === "..") || key.includes("\\") || key.includes("\0")) {
      throw new Error(`a store key must be a plain relative name, got ${JSON.stringify(key)}`);
    }
    return join(this.dir, ...key.split("/"));
  }

  async get(key: string): Promise<Uint8Array | null> {
    try {
      return new Uint8Array(await readFile(this.path(key)));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw error;
    }
  }

  async put(key: string, value: Uint8Array): Promise<void> {
    const path = this.path(key);
    await mkdir(dirname(path), { recursive: true });
    const temporary = `${path}.partial-${process.pid}-${Math.random().toString(36).slice(2)}`;
    const handle = await open(temporary, "w", 0o600);
    try {
      await handle.writeFile(value);
      await handle.sync();
    } catch (error) {
      await handle.close();
      await rm(temporary, { force: true });
      throw error;
    }
    await handle.close();
    try {
      await rename(temporary, path);
    } catch (error) {
      await rm(temporary, { force: true });
      throw error;
    }
    await syncDirectory(dirname(path));
  }

  async delete(key: string): Promise<void> {
    await rm(this.path(key), { force: true });
  }

  async keys(): Promise<string[]> {
    const out: string[] = [];
    const walk = async (dir: string): Promise<void> => {
      let entries;
      try {
        entries = await readdir(dir, { withFileTypes: true });
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === "ENOENT") return;
        throw error;
      }
      for (const entry of entries) {
        const full = join(dir, entry.name);
        if (entry.isDirectory()) await walk(full);
        else if (entry.isFile() && entry.name.includes(".partial-")) await removeIfAbandoned(full, entry.name);
        else if (entry.isFile()) out.push(relative(this.dir, full).split(sep).join("/"));
      }
    };
    await walk(this.dir);
    return out;
  }
}

/** A temporary left by a writer that died (its process is gone) is removed; a live writer's is left alone. */
async function removeIfAbandoned(path: string, name: string): Promise<void> {
  const pid = Number(/\.partial-(\d+)-/.exec(name)?.[1]);
  let alive = false;
  try {
    process.kill(pid, 0);
    alive = pid !== process.pid || Date.now() - (await stat(path)).mtimeMs < 3_600_000;
  } catch (error) {
    alive = (error as NodeJS.ErrnoException).code === "EPERM"; // exists, but not ours to signal
  }
  if (!alive) await rm(path, { force: true });
}

async function syncDirectory(dir: string): Promise<void> {
  if (process.platform === "win32") return; // Windows cannot open a directory to fsync it
  const handle = await open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export { DeviceRuntime } from "./runtime.js";
