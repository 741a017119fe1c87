/**
 * Errors the SDK raises: one class per kind of problem, each with a hint that
 * says what to do, as the Python device runtime's `toolkit/errors.py`. An app
 * can show `error.message` and `error.hint` to a person as they are.
 */

export class EdgetailorError extends Error {
  static defaultHint = "see mobile/README.md";
  readonly hint: string;

  // Each class names itself with a literal: minifiers rename classes, and an app shows `error.name`.
  override name = "EdgetailorError";

  constructor(message: string, hint = "") {
    super(message);
    this.hint = hint || (new.target as typeof EdgetailorError).defaultHint;
  }

  /** The message and the hint, as the Python CLI prints them. */
  describe(): string {
    return `${this.message}\n  hint: ${this.hint}`;
  }
}

export class BundleError extends EdgetailorError {
  override name = "BundleError";
  static override defaultHint = "re-export the bundle (`edgetailor export bundle`) or copy it again";
}

export class TrustError extends BundleError {
  override name = "TrustError";
  static override defaultHint =
    "get the bundle from its publisher again; a device trusts the keys given as trustedKeys";
}

export class SampleError extends EdgetailorError {
  override name = "SampleError";
  static override defaultHint = "give uint8 images (0-255) or float images in [0, 1], with one known label each";
}

export class StateError extends EdgetailorError {
  override name = "StateError";
  static override defaultHint = "personalize again, or start afresh with reset()";
}

export class PersonalizationError extends EdgetailorError {
  override name = "PersonalizationError";
  static override defaultHint =
    "check the samples and the personalize settings; the previous personalization stays in use";
}

export class LimitError extends EdgetailorError {
  override name = "LimitError";
  static override defaultHint = "if the input is genuine, raise the limit named above (the limits option)";
}

export class SigningKeyError extends EdgetailorError {
  override name = "SigningKeyError";
  static override defaultHint = "give the signing.pub written by `edgetailor keys generate`";
}

export class BackendError extends EdgetailorError {
  override name = "BackendError";
  static override defaultHint = "pass the onnxruntime module your app ships: onnxruntime-react-native, -web or -node";
}
