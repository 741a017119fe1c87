/**
 * Where the device keeps its state: a few named byte records behind a small
 * `Store` interface, so that each platform brings its own storage: a
 * directory in Node (`NodeFileStore`, in `@edgetailor/sdk/node`), IndexedDB in
 * a browser (`IndexedDbStore`), the app's file system or SQLite module in
 * React Native (mobile/README.md has one), or memory (`MemoryStore`).
 *
 * The one rule: `put` is atomic. After a crash or a failed write, `get`
 * returns the old value or the new one, never a mix. The state commits by
 * writing new records first and the small `state.json` that points at them
 * last, so a write that fails midway leaves the previous state in use.
 */

export interface Store {
  get(key: string): Promise<Uint8Array | null>;
  /** Atomic: afterwards (or after a crash) the key holds the old value or the new one. */
  put(key: string, value: Uint8Array): Promise<void>;
  delete(key: string): Promise<void>;
  keys(): Promise<string[]>;
}

/** A store in memory: for tests, and apps that personalize for one session only. */
export class MemoryStore implements Store {
  private readonly records = new Map<string, Uint8Array>();

  async get(key: string): Promise<Uint8Array | null> {
    const value = this.records.get(key);
    return value ? value.slice() : null;
  }

  async put(key: string, value: Uint8Array): Promise<void> {
    this.records.set(key, value.slice());
  }

  async delete(key: string): Promise<void> {
    this.records.delete(key);
  }

  async keys(): Promise<string[]> {
    return [...this.records.keys()];
  }
}

/** A store in the browser's IndexedDB: each put is one transaction, which IndexedDB makes atomic. */
export class IndexedDbStore implements Store {
  private database: Promise<IDBDatabase> | null = null;

  constructor(readonly name = "edgetailor") {}

  private db(): Promise<IDBDatabase> {
    this.database ??= new Promise((resolve, reject) => {
      const factory = (globalThis as { indexedDB?: IDBFactory }).indexedDB;
      if (!factory) {
        reject(new Error("IndexedDB is not available here; use NodeFileStore in Node, or your own Store"));
        return;
      }
      const request = factory.open(this.name, 1);
      request.onupgradeneeded = () => request.result.createObjectStore("records");
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
    this.database.catch(() => (this.database = null)); // a failed open is tried again next time
    return this.database;
  }

  private async transaction<T>(mode: IDBTransactionMode, work: (records: IDBObjectStore) => IDBRequest<T>): Promise<T> {
    const db = await this.db();
    return new Promise((resolve, reject) => {
      const tx = db.transaction("records", mode);
      const request = work(tx.objectStore("records"));
      tx.oncomplete = () => resolve(request.result);
      tx.onerror = () => reject(tx.error ?? request.error);
      tx.onabort = () => reject(tx.error ?? new Error("the IndexedDB transaction was aborted (storage full?)"));
    });
  }

  async get(key: string): Promise<Uint8Array | null> {
    const value = await this.transaction("readonly", (r) => r.get(key));
    return value ? new Uint8Array(value as ArrayBuffer) : null;
  }

  async put(key: string, value: Uint8Array): Promise<void> {
    const copy = value.slice().buffer;
    await this.transaction("readwrite", (r) => r.put(copy, key));
  }

  async delete(key: string): Promise<void> {
    await this.transaction("readwrite", (r) => r.delete(key));
  }

  async keys(): Promise<string[]> {
    return (await this.transaction("readonly", (r) => r.getAllKeys())).map(String);
  }

  close(): void {
    void this.database?.then((db) => db.close());
    this.database = null;
  }
}
