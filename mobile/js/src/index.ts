/**
 * @edgetailor/sdk: personalize an edgetailor bundle on the device, in React
 * Native, the browser or Node. It opens and verifies a signed bundle, keeps
 * the user's samples in a `Store`, trains the Local Expert and the Gating
 * Network with the bundle's step programs on the onnxruntime the app passes
 * in, and routes each input to GE or LE, as the Python device runtime does:
 * images, sensor windows or audio clips, as the bundle's modality says.
 */

export { DeviceRuntime } from "./runtime.js";
export type {
  Evaluation, Expert, ImageBatch, ImageInput, LabelInput, OpenOptions, Pixels, Prediction, SampleInput, SignalInput,
} from "./runtime.js";
export { MODALITIES } from "./modalities.js";
export type { Modality, NumberArray, Samples } from "./modalities.js";
export { MemoryStore, IndexedDbStore } from "./store.js";
export type { Store } from "./store.js";
export type { OrtModule } from "./programs.js";
export type { PersonalizeConfig, ProgressFn } from "./config.js";
export { DEFAULT_LIMITS } from "./limits.js";
export type { Limits } from "./limits.js";
export {
  BackendError, BundleError, EdgetailorError, LimitError, PersonalizationError, SampleError, SigningKeyError, StateError, TrustError,
} from "./errors.js";
