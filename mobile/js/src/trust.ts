/**
 * Which bundles this device runs, decided as the Python runtime's
 * `device/trust.py` decides: a state given `trustedKeys` pins them and from
 * then on refuses any bundle none of them signed (unsigned, tampered,
 * re-hashed, or signed by an unknown or revoked key). Signed statements in
 * a bundle rotate keys (a trusted key endorses a new one) or revoke them;
 * revocations apply first in each round and are permanent. A signed bundle
 * older than the newest accepted release of its name (rollback), past its
 * expiry, or with the same version but other contents is refused too.
 */

import { TrustError } from "./errors.js";
import { parseTime, type Manifest } from "./manifest.js";
import { fromBase64, toBase64 } from "./crypto.js";
import type { BundleSignature, PublicKey } from "./signing.js";
import type { DeviceState } from "./state.js";

export const UNSIGNED_WARNING =
  "this bundle is not signed, and the state trusts no key, so anyone who can write the bundle decides what runs; " +
  "pin your publisher's key with trustedKeys to refuse unsigned bundles from now on";

export class TrustPolicy {
  readonly warnings: string[] = [];
  private readonly trusted: Map<string, Uint8Array>;
  private readonly revoked: Set<string>;
  private readonly pending: { trust: [string, string, string][]; revoke: [string, string][] } = { trust: [], revoke: [] };

  constructor(private readonly state: DeviceState, pinned: PublicKey[], private readonly now: () => Date = () => new Date()) {
    this.trusted = new Map(Object.entries(state.trustedKeys()).map(([id, key]) => [id, fromBase64(key, "a stored key")]));
    this.revoked = state.revokedKeys();
    for (const key of pinned) {
      if (!this.trusted.has(key.id)) {
        this.trusted.set(key.id, key.raw);
        this.pending.trust.push([key.id, toBase64(key.raw), "pinned"]);
      }
    }
  }

  /** Whether the state has ever trusted a key: then only signed bundles open. */
  get locked(): boolean {
    return this.trusted.size > 0 || this.state.trustPinned;
  }

  /**
   * The bundle's TrustCheck: runs after the signature is verified, before any file is inflated.
   * Pinned keys and learned statements are remembered at once, whatever this bundle's fate:
   * a revocation must hold even if the bundle that carried it is refused.
   */
  check = async (manifest: Manifest, signature: BundleSignature | null, source: string): Promise<void> => {
    if (signature) this.learn(signature);
    await this.state.rememberTrust(this.pending);
    this.pending.trust = [];
    this.pending.revoke = [];
    if (this.locked) this.checkSigner(signature, source);
    else if (!signature) this.warnings.push(`${source}: ${UNSIGNED_WARNING}`);
    else {
      this.warnings.push(`${source} is signed by key ${signature.signer.id.slice(0, 16)}, but this state trusts no key, ` +
        "so the signature protects nothing; pin the key with trustedKeys");
    }
    this.checkRelease(manifest, signature, source);
  };

  private learn(signature: BundleSignature): void {
    let changed = true;
    while (changed) {
      changed = false;
      for (const kind of ["revoke", "endorse"] as const) {
        for (const s of signature.statements) {
          if (s.kind !== kind || !this.trusted.has(s.issuer) || this.revoked.has(s.issuer)) continue;
          if (kind === "revoke" && !this.revoked.has(s.subject)) {
            this.revoked.add(s.subject);
            this.pending.revoke.push([s.subject, s.issuer]);
            changed = true;
          } else if (kind === "endorse" && s.key && !this.trusted.has(s.subject) && !this.revoked.has(s.subject)) {
            this.trusted.set(s.subject, s.key.raw);
            this.pending.trust.push([s.subject, toBase64(s.key.raw), `endorsed by ${s.issuer}`]);
            changed = true;
          }
        }
      }
    }
  }

  private checkSigner(signature: BundleSignature | null, source: string): void {
    const live = [...this.trusted.keys()].filter((k) => !this.revoked.has(k)).map((k) => k.slice(0, 16));
    const ids = live.join(", ") || "none left: all revoked";
    if (!signature) {
      throw new TrustError(`${source} is not signed, and this state only runs bundles signed by a key it trusts (${ids})`,
        "ask the publisher for the signed bundle (`edgetailor export bundle --signing-key KEY`)");
    }
    const signer = signature.signer.id;
    if (this.revoked.has(signer)) {
      throw new TrustError(`${source} is signed by key ${signer.slice(0, 16)}, which has been revoked`,
        "a revoked key stays revoked; get a bundle signed by a current key");
    }
    if (!this.trusted.has(signer)) {
      throw new TrustError(`${source} is signed by key ${signer.slice(0, 16)}, which this state does not trust (trusted: ${ids})`,
        "if the publisher rotated keys, the bundle must carry the endorsement by the old key (`edgetailor keys rotate`); or pin the new key with trustedKeys");
    }
  }

  private checkRelease(manifest: Manifest, signature: BundleSignature | null, source: string): void {
    const release = manifest.release;
    if (!release) {
      if (signature && this.locked) {
        throw new TrustError(`${source} is signed but names no release (name and version), so this state cannot tell it from an older one`,
          "re-sign it with `edgetailor export sign --version N`");
      }
      return;
    }
    if (release.expires && this.now().getTime() >= parseTime(release.expires)) {
      throw new TrustError(`${source} (${release.name} version ${release.version}) expired at ${release.expires}`,
        "get the current bundle from its publisher");
    }
    const accepted = this.state.acceptedRelease(release.name);
    if (accepted && release.version < accepted.version) {
      throw new TrustError(`${source} is ${release.name} version ${release.version}, older than version ${accepted.version} which this state already accepted (a rollback)`,
        "use the newer bundle; a state never goes back to an older version");
    }
  }

  /** After every file checked out: remember keys learned and the version (refusing same-version, other-contents twins). */
  async accept(manifest: Manifest, digest: string, signed: boolean, source: string): Promise<void> {
    const release = manifest.release;
    let remembered: [string, number, string] | undefined;
    if (release) {
      const accepted = this.state.acceptedRelease(release.name);
      if (accepted && accepted.version === release.version && accepted.digest !== digest && signed) {
        throw new TrustError(`${source} claims to be ${release.name} version ${release.version}, but this state accepted a different bundle under that version`,
          "a publisher never reuses a version; get the bundle from its publisher again");
      }
      // the highest version only: an unsigned twin of the current version never displaces the signed one
      if (!accepted || release.version > accepted.version) remembered = [release.name, release.version, digest];
    }
    if (remembered) await this.state.rememberTrust({ release: remembered });
  }
}
