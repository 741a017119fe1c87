"""GE's ONNX graph as the firmware's list of layers (``et_layer`` in
``firmware_examples/libedgetailor/include/edgetailor.h``), and a numpy twin
of the firmware's kernels that checks the list against onnxruntime.

The C kernels run one plain chain of Conv, Relu, MaxPool, Flatten and Linear
layers (a LeNet-style GE) with no allocation: anything else (a ViT's
attention, a skip connection, a grouped conv) is refused here, naming the
node, rather than written as a model the firmware would reject or, worse,
run wrongly.

A quantized GE is the QDQ graph that ``server compress`` writes with
onnxruntime.quantization. Its QuantizeLinear/DequantizeLinear pairs are
folded into each layer's int8 weights, int32 bias, uint8 zero points and
requantization multipliers, so that the firmware runs GE's own integers (the
ones the compression recipe measured) instead of quantizing GE a second time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetailor.toolkit.errors import ExportError
from edgetailor.toolkit.input_spec import InputSpec

# et_op and the tap codes of edgetailor.h. A layer's ``tap`` is -1 (none), ET_TAP_LE, ET_TAP_GN, or TAP_BOTH when
# LE and GN read the same tensor (the header has no field for a second tap on one layer).
OP_CONV2D, OP_RELU, OP_MAXPOOL, OP_FLATTEN, OP_LINEAR = 1, 2, 3, 4, 5
OP_NAMES = {OP_CONV2D: "conv2d", OP_RELU: "relu", OP_MAXPOOL: "maxpool", OP_FLATTEN: "flatten", OP_LINEAR: "linear"}
TAP_NONE, TAP_LE, TAP_GN, TAP_BOTH = -1, 0, 1, 2
PASS_THROUGH = (OP_RELU, OP_MAXPOOL, OP_FLATTEN)   # an int8 kernel that keeps its input's scale and zero point

KERNELS_SAY = "the kernels run Conv, Relu, MaxPool, Flatten and Gemm (a LeNet-style GE)"
KERNELS_HINT = ("export a LeNet-style GE (`edgetailor server pretrain --arch lenet5`, optionally `edgetailor server "
                "compress --recipe int8`); other architectures run on the device runtimes (`edgetailor device ...`)")
FP32_TOLERANCE = 1e-4          # relative to the output's magnitude: the sums run in another order than onnxruntime's
INT8_AGREEMENT = 0.99          # argmax agreement with onnxruntime's reference (unfused) QDQ arithmetic
INT8_OFF_BY_MORE = 0.01        # share of int8 outputs allowed more than one unit away from it


@dataclass(frozen=True)
class Quant:
    """A uint8 tensor's grid: real = (q - zero_point) * scale."""

    scale: float               # a float32 value
    zero_point: int


@dataclass
class Layer:
    op: int
    node: str                              # the ONNX node it comes from, for messages
    in_shape: tuple[int, int, int]         # (channels, height, width); a flat vector is (n, 1, 1)
    out_shape: tuple[int, int, int]
    kernel: tuple[int, int] = (0, 0)
    stride: tuple[int, int] = (0, 0)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right (the firmware stores top, left)
    weight: np.ndarray | None = None       # fp32: [out][in][kh][kw] or [out][in]
    bias: np.ndarray | None = None
    weight_q: np.ndarray | None = None     # int8 models
    weight_scale: np.ndarray | None = None
    bias_q: np.ndarray | None = None
    multiplier: np.ndarray | None = None
    in_quant: Quant | None = None
    out_quant: Quant | None = None
    tap: int = TAP_NONE
    _bias_real: np.ndarray | None = field(default=None, repr=False)   # a float bias of an int8 layer, gridded later

    @property
    def in_elements(self) -> int:
        return int(np.prod(self.in_shape))

    @property
    def out_elements(self) -> int:
        return int(np.prod(self.out_shape))

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"op": OP_NAMES[self.op], "node": self.node, "in": list(self.in_shape),
                                "out": list(self.out_shape)}
        if self.op in (OP_CONV2D, OP_MAXPOOL):
            info.update(kernel=list(self.kernel), stride=list(self.stride), pads=list(self.pads))
        if self.tap != TAP_NONE:
            info["tap"] = {TAP_LE: "le", TAP_GN: "gn", TAP_BOTH: "le+gn"}[self.tap]
        if self.out_quant is not None:
            info["out_scale"], info["out_zero_point"] = self.out_quant.scale, self.out_quant.zero_point
        return info


@dataclass
class CompiledGE:
    """GE as the firmware runs it."""

    layers: list[Layer]
    quantized: bool
    in_hw: tuple[int, int]
    input_lut: np.ndarray                  # float32[256]: pixel -> normalised input
    input_q_lut: np.ndarray | None         # uint8[256]: pixel -> quantized input (int8 models)
    input_quant: Quant | None
    tap_layers: dict[int, int]             # TAP_LE / TAP_GN -> index of the layer whose output it is

    @property
    def n_classes(self) -> int:
        return self.layers[-1].out_elements

    def tap_dim(self, tap: int) -> int:
        return self.layers[self.tap_layers[tap]].out_elements

    def tap_quant(self, tap: int) -> Quant | None:
        return self.layers[self.tap_layers[tap]].out_quant

    @property
    def max_activation(self) -> int:
        """Elements of the largest layer input plus its output: the kernels ping-pong between the two ends of
        one buffer (libedgetailor's et_ge.c). ReLU and Flatten work in place, so only their input counts."""
        in_place = (OP_RELU, OP_FLATTEN)
        return max(layer.in_elements + (0 if layer.op in in_place else layer.out_elements) for layer in self.layers)

    def weight_bytes(self) -> int:
        """Flash the layers' constant arrays take, the input table included."""
        total = 256 if self.quantized else 256 * 4
        for layer in self.layers:
            for array in (layer.weight, layer.bias, layer.weight_q, layer.bias_q, layer.multiplier):
                total += 0 if array is None else array.nbytes
        return total


def input_luts(spec: InputSpec, quant: Quant | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Every pixel value through ``InputSpec.normalize`` (so that the firmware's input is the server's to the
    bit), and through the GE's input QuantizeLinear as ONNX defines it: float32 division, round half to even,
    saturate to uint8."""
    lut = spec.normalize(np.arange(256, dtype=np.uint8).reshape(1, 16, 16)).reshape(256).astype(np.float32)
    if quant is None:
        return lut, None
    q = np.rint(lut / np.float32(quant.scale)) + np.float32(quant.zero_point)
    return lut, np.clip(q, 0, 255).astype(np.uint8)


class _Value:
    """An activation: which layer produced it (-1: the image) and its shape. QuantizeLinear and
    DequantizeLinear outputs name the same _Value as their input."""

    def __init__(self, layer: int, shape: tuple[int, int, int]):
        self.layer, self.shape = layer, shape


def _name(node) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _refuse(node, why: str = "", hint: str = KERNELS_HINT) -> ExportError:
    why = why or f"has no firmware kernel; {KERNELS_SAY}"
    return ExportError(f"GE layer {_name(node)!r} ({node.op_type}) {why}", hint=hint)


class _Compiler:
    def __init__(self, model, where: str):
        from onnx import numpy_helper

        self.where = where
        graph = model.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.graph = graph
        self.quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
        self.values: dict[str, _Value] = {}
        self.dq_consts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}
        self.layers: list[Layer] = []
        self.input_quant: Quant | None = None

    # ------------------------------------------------------------------ helpers
    def quant_of(self, value: _Value) -> Quant | None:
        return self.input_quant if value.layer < 0 else self.layers[value.layer].out_quant

    def _set_quant(self, value: _Value, quant: Quant, node) -> None:
        current = self.quant_of(value)
        if current is None:
            if value.layer < 0:
                self.input_quant = quant
            else:
                self.layers[value.layer].out_quant = quant
        elif current != quant:
            raise _refuse(node, f"re-quantizes a tensor already on the grid (scale {current.scale:.6g}, zero point "
                                f"{current.zero_point}) to scale {quant.scale:.6g}, zero point {quant.zero_point}; "
                                "the kernels keep one grid per tensor", hint="quantize GE with `edgetailor server "
                                                                             "compress --recipe int8`")

    def _qparams(self, node) -> Quant:
        scale = self.consts.get(node.input[1])
        zp = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.uint8(0)
        if scale is None or zp is None:
            raise _refuse(node, "has a scale or zero point computed at run time; the firmware needs constants")
        if np.size(scale) != 1 or np.size(zp) != 1:
            raise _refuse(node, "quantizes an activation per channel; the kernels take one scale per activation")
        if np.asarray(zp).dtype != np.uint8:
            raise _refuse(node, f"quantizes an activation to {np.asarray(zp).dtype}; the kernels run uint8 "
                                "activations (onnxruntime.quantization's QUInt8)")
        return Quant(float(np.float32(np.asarray(scale).reshape(()))), int(np.asarray(zp).reshape(())))

    def value(self, name: str, node) -> _Value:
        if name not in self.values:
            raise _refuse(node, f"reads {name!r}, which is neither the image nor a layer's output the kernels "
                                "compute")
        return self.values[name]

    def chain_input(self, node) -> _Value:
        """The layer's input, which must be the previous layer's output: the kernels run a plain chain."""
        value = self.value(node.input[0], node)
        if value.layer != len(self.layers) - 1:
            raise _refuse(node, f"reads {node.input[0]!r}, not the previous layer's output; the kernels run one "
                                "chain of layers (no branches or skip connections)")
        return value

    def add_layer(self, node, layer: Layer) -> None:
        for n in (*layer.in_shape, *layer.out_shape):
            if not 0 < n <= 0xFFFF:
                raise _refuse(node, f"has a dimension of {n}; the firmware's shapes are 1 to 65535")
        for n in (*layer.kernel, *layer.stride, *layer.pads):
            if not 0 <= n <= 0xFF:
                raise _refuse(node, f"has a kernel, stride or pad of {n}; the firmware stores 0 to 255")
        self.layers.append(layer)
        self.values[node.output[0]] = _Value(len(self.layers) - 1, layer.out_shape)

    def attrs(self, node) -> dict[str, Any]:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def weight(self, name: str, node, out_axis: int) -> tuple[np.ndarray | None, np.ndarray | None,
                                                                np.ndarray | None]:
        """(fp32 weight, int8 weight, per-output-channel scale) of a constant weight, its output channels
        first."""
        if name in self.dq_consts:
            q, scale, zp, axis = self.dq_consts[name]
            if q.dtype != np.int8:
                raise _refuse(node, f"has {q.dtype} weights; the kernels take symmetric int8 weights",
                              hint="quantize GE with `edgetailor server compress --recipe int8`")
            if np.any(np.asarray(zp) != 0):
                raise _refuse(node, "has weights with a nonzero zero point; the kernels take symmetric int8 weights",
                              hint="quantize GE with `edgetailor server compress --recipe int8` (symmetric "
                                   "per-channel weights)")
            n_out = q.shape[out_axis]
            scale = np.asarray(scale, np.float32).reshape(-1)
            if scale.size == 1:
                scale = np.full(n_out, scale[0], np.float32)
            elif scale.size != n_out or (axis % q.ndim) != out_axis:
                raise _refuse(node, "scales its weights along another axis than the output channels")
            return None, np.moveaxis(q, out_axis, 0).copy() if out_axis else q, scale
        if name in self.consts:
            if self.quantized:
                raise _refuse(node, "has float weights in a quantized GE; the int8 kernels need every Conv and "
                                    "Gemm quantized", hint="quantize GE with `edgetailor server compress --recipe "
                                                           "int8`, or export an fp32 GE")
            w = np.asarray(self.consts[name], np.float32)
            return (np.moveaxis(w, out_axis, 0).copy() if out_axis else w), None, None
        raise _refuse(node, "computes its weights at run time; the kernels take constant weights")

    def bias(self, layer: Layer, name: str | None, node) -> None:
        n_out = layer.out_shape[0]
        if not name:
            real = np.zeros(n_out, np.float32)
        elif name in self.dq_consts:
            q, scale, zp, _ = self.dq_consts[name]
            if q.dtype != np.int32 or np.any(np.asarray(zp) != 0):
                raise _refuse(node, "has a bias that is not int32 with zero point 0")
            grid = np.float64(layer.in_quant.scale) * layer.weight_scale.astype(np.float64)
            if not np.allclose(np.asarray(scale, np.float64).reshape(-1) * np.ones(n_out), grid, rtol=1e-5, atol=0):
                raise _refuse(node, "has a bias on another grid than input scale x weight scale")
            layer.bias_q = np.asarray(q, np.int32).reshape(n_out)
            return
        elif name in self.consts:
            real = np.asarray(self.consts[name], np.float32).reshape(-1)
        else:
            raise _refuse(node, "computes its bias at run time; the kernels take a constant bias")
        if real.size != n_out:
            raise _refuse(node, f"has {real.size} biases for {n_out} outputs")
        if self.quantized:
            layer._bias_real = real
        else:
            layer.bias = real.reshape(n_out).astype(np.float32)

    # -------------------------------------------------------------------- ops
    def compile(self) -> None:
        # Every op the kernels lack, named at once: a ViT fails on its first Shape, but the user wants the list.
        missing = [n for n in self.graph.node
                   if n.domain not in ("", "ai.onnx") or not hasattr(self, f"op_{n.op_type}")]
        if missing:
            kinds = sorted({n.op_type for n in missing})
            raise _refuse(missing[0], f"has no firmware kernel; {KERNELS_SAY}"
                          + (f". GE also uses {', '.join(k for k in kinds if k != missing[0].op_type)}"
                             if len(kinds) > 1 else ""))
        for node in self.graph.node:
            getattr(self, f"op_{node.op_type}")(node)

    def op_Constant(self, node) -> None:
        if node.output[0] not in self.consts:
            raise _refuse(node, "is a constant of a kind the exporter does not read")

    def op_QuantizeLinear(self, node) -> None:
        value = self.value(node.input[0], node)
        self._set_quant(value, self._qparams(node), node)
        self.values[node.output[0]] = value

    def op_DequantizeLinear(self, node) -> None:
        source = node.input[0]
        if source in self.consts:
            scale = self.consts.get(node.input[1])
            zp = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1, np.int8)
            if scale is None or zp is None:
                raise _refuse(node, "has a scale or zero point computed at run time")
            axis = int(self.attrs(node).get("axis", 1))
            self.dq_consts[node.output[0]] = (self.consts[source], np.asarray(scale), np.asarray(zp), axis)
            return
        value = self.value(source, node)
        quant = self._qparams(node)
        if self.quant_of(value) != quant:
            raise _refuse(node, "dequantizes with another scale or zero point than its QuantizeLinear")
        self.values[node.output[0]] = value

    def op_Identity(self, node) -> None:
        self.values[node.output[0]] = self.value(node.input[0], node)

    op_Dropout = op_Identity

    def op_Conv(self, node) -> None:
        x = self.chain_input(node)
        a = self.attrs(node)
        if a.get("group", 1) != 1:
            raise _refuse(node, f"is a grouped convolution (group {a['group']}); the kernels run group 1",
                          hint="use a LeNet-style GE with plain convolutions")
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            raise _refuse(node, f"is a dilated convolution {a['dilations']}; the kernels run dilation 1")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            raise _refuse(node, f"pads with auto_pad={a['auto_pad']!r}; export GE with explicit pads")
        w_float, w_q, w_scale = self.weight(node.input[1], node, 0)
        w = w_float if w_float is not None else w_q
        if w.ndim != 4:
            raise _refuse(node, f"is a {w.ndim - 2}-D convolution; the kernels run 2-D ones")
        out_c, in_c, kh, kw = (int(n) for n in w.shape)
        if in_c != x.shape[0]:
            raise _refuse(node, f"takes {in_c} input channels, but its input has {x.shape[0]}")
        sh, sw = (int(s) for s in a.get("strides", [1, 1]))
        top, left, bottom, right = (int(p) for p in a.get("pads", [0, 0, 0, 0]))
        out_h = (x.shape[1] + top + bottom - kh) // sh + 1
        out_w = (x.shape[2] + left + right - kw) // sw + 1
        if out_h < 1 or out_w < 1:
            raise _refuse(node, "has a kernel larger than its padded input")
        layer = Layer(OP_CONV2D, _name(node), x.shape, (out_c, out_h, out_w), (kh, kw), (sh, sw),
                      (top, left, bottom, right), weight=w_float, weight_q=w_q, weight_scale=w_scale)
        self._linear_input_quant(node, layer)
        self.bias(layer, node.input[2] if len(node.input) > 2 else None, node)
        self.add_layer(node, layer)

    def _linear_input_quant(self, node, layer: Layer) -> None:
        """An int8 Conv or Gemm reads a quantized activation; set its grid before the bias is checked."""
        if not self.quantized:
            return
        layer.in_quant = self.quant_of(self.values[node.input[0]])
        if layer.in_quant is None:
            raise _refuse(node, "reads a float activation in a quantized GE; the int8 kernels need every Conv "
                                "and Gemm input quantized", hint="quantize GE with `edgetailor server compress "
                                                                 "--recipe int8`")

    def op_Relu(self, node) -> None:
        x = self.chain_input(node)
        self.add_layer(node, Layer(OP_RELU, _name(node), x.shape, x.shape))

    def op_MaxPool(self, node) -> None:
        x = self.chain_input(node)
        a = self.attrs(node)
        if any(p != 0 for p in a.get("pads", [0, 0, 0, 0])) or a.get("ceil_mode", 0) != 0:
            raise _refuse(node, "pads or rounds up (ceil_mode); the max-pool kernel runs without either")
        if any(d != 1 for d in a.get("dilations", [1, 1])) or a.get("storage_order", 0) != 0:
            raise _refuse(node, "is dilated or returns indices; the max-pool kernel runs neither")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            raise _refuse(node, f"pads with auto_pad={a['auto_pad']!r}")
        if len(node.output) > 1 and node.output[1]:
            raise _refuse(node, "returns indices; the max-pool kernel does not")
        kh, kw = (int(k) for k in a["kernel_shape"])
        sh, sw = (int(s) for s in a.get("strides", [1, 1]))
        out = (x.shape[0], (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1)
        if out[1] < 1 or out[2] < 1:
            raise _refuse(node, "has a window larger than its input")
        self.add_layer(node, Layer(OP_MAXPOOL, _name(node), x.shape, out, (kh, kw), (sh, sw)))

    def op_Flatten(self, node) -> None:
        x = self.chain_input(node)
        if self.attrs(node).get("axis", 1) != 1:
            raise _refuse(node, "flattens from another axis than 1; the kernels keep the batch axis alone")
        self.add_layer(node, Layer(OP_FLATTEN, _name(node), x.shape, (int(np.prod(x.shape)), 1, 1)))

    def _flat_input(self, node) -> _Value:
        x = self.chain_input(node)
        if x.shape[1:] != (1, 1):
            raise _refuse(node, f"multiplies a {list(x.shape)} activation; the Linear kernel takes a flat vector "
                                "(a Flatten before it)")
        return x

    def op_Gemm(self, node) -> None:
        x = self._flat_input(node)
        a = self.attrs(node)
        if a.get("transA", 0) != 0 or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            raise _refuse(node, "transposes its input or scales (alpha, beta); the Linear kernel computes "
                                "x W^T + b")
        # transB=1: W is [out][in], as the kernel wants; transB=0: [in][out], so the output axis is 1
        self._linear(node, x, 0 if a.get("transB", 0) == 1 else 1, node.input[2] if len(node.input) > 2 else None)

    def op_MatMul(self, node) -> None:
        x = self._flat_input(node)
        if node.input[1] not in self.consts and node.input[1] not in self.dq_consts:
            raise _refuse(node, "multiplies two activations; the kernels run Conv, Relu, MaxPool, Flatten and "
                                "Gemm with constant weights (a LeNet-style GE)")
        self._linear(node, x, 1, None)

    def _linear(self, node, x: _Value, out_axis: int, bias: str | None) -> None:
        w_float, w_q, w_scale = self.weight(node.input[1], node, out_axis)
        w = w_float if w_float is not None else w_q
        if w.ndim != 2 or w.shape[1] != x.shape[0]:
            raise _refuse(node, f"has weights of shape {list(w.shape)} for an input of {x.shape[0]}")
        layer = Layer(OP_LINEAR, _name(node), x.shape, (int(w.shape[0]), 1, 1), weight=w_float, weight_q=w_q,
                      weight_scale=w_scale)
        self._linear_input_quant(node, layer)
        self.bias(layer, bias, node)
        if bias is None and not self.quantized:
            layer.bias = None           # MatMul: an Add may follow with the bias
        self.add_layer(node, layer)

    def op_Add(self, node) -> None:
        """MatMul + Add of a constant is a Linear layer with a bias (fp32 GEs)."""
        names = list(node.input)
        const = next((n for n in names if n in self.consts), None)
        other = next((n for n in names if n != const), None)
        head = self.layers[-1] if self.layers else None
        if (const is None or other is None or self.quantized or head is None or head.op != OP_LINEAR
                or head.bias is not None or self.values.get(other) is None
                or self.values[other].layer != len(self.layers) - 1):
            raise _refuse(node)
        bias = np.asarray(self.consts[const], np.float32).reshape(-1)
        if bias.size != head.out_shape[0]:
            raise _refuse(node)
        head.bias = bias.copy()
        self.values[node.output[0]] = self.values[other]

    # --------------------------------------------------------------- finishing
    def finish(self, logits: str, taps: dict[int, str]) -> None:
        if not self.layers:
            raise ExportError(f"{self.where} has no layers", hint=KERNELS_HINT)
        for layer in self.layers:
            if layer.op == OP_LINEAR and layer.bias is None and not self.quantized:
                layer.bias = np.zeros(layer.out_shape[0], np.float32)
        final = self.values.get(logits)
        if final is None or final.layer != len(self.layers) - 1:
            raise ExportError(f"{self.where}: GE's output {logits!r} is not the last layer's output",
                              hint=KERNELS_HINT)
        for code, name in taps.items():
            value = self.values.get(name)
            if value is None or value.layer < 0:
                raise ExportError(f"{self.where}: the feature tap {name!r} is not a layer's output",
                                  hint="re-export the bundle; its manifest and its GE do not belong together")
            layer = self.layers[value.layer]
            layer.tap = code if layer.tap in (TAP_NONE, code) else TAP_BOTH
        if self.quantized:
            self._finish_quantized()

    def _finish_quantized(self) -> None:
        layers = self.layers
        # A QuantizeLinear after a Relu or a MaxPool also sets the grid of the Conv before it (quantizing is
        # monotone, so relu(q(x)) = q(relu(x)) on the same grid); then pass-through layers keep their input's.
        for i in range(len(layers) - 2, -1, -1):
            if layers[i].out_quant is None and layers[i + 1].op in PASS_THROUGH:
                layers[i].out_quant = layers[i + 1].out_quant
        previous = self.input_quant
        for layer in layers:
            layer.in_quant = layer.in_quant or previous
            if layer.out_quant is None and layer.op in PASS_THROUGH:
                layer.out_quant = layer.in_quant
            if layer.in_quant is None or layer.out_quant is None:
                raise ExportError(f"GE layer {layer.node!r} ({OP_NAMES[layer.op]}) has a float "
                                  f"{'input' if layer.in_quant is None else 'output'} in a quantized GE; the int8 "
                                  "kernels need every activation on a uint8 grid",
                                  hint="quantize GE with `edgetailor server compress --recipe int8`")
            if layer.op in PASS_THROUGH and layer.in_quant != layer.out_quant:
                raise ExportError(f"GE layer {layer.node!r} ({OP_NAMES[layer.op]}) changes its tensor's grid; the "
                                  "int8 kernels keep it through Relu, MaxPool and Flatten",
                                  hint="quantize GE with `edgetailor server compress --recipe int8`")
            if layer.op in (OP_CONV2D, OP_LINEAR):
                grid = np.float64(layer.in_quant.scale) * layer.weight_scale.astype(np.float64)
                if layer.bias_q is None:
                    real = layer._bias_real if layer._bias_real is not None else np.zeros(layer.out_shape[0])
                    q = np.rint(real.astype(np.float64) / grid)
                    if not np.all(np.abs(q) < 2**31):
                        raise ExportError(f"GE layer {layer.node!r}: a bias does not fit the int32 grid of its "
                                          "input and weight scales", hint="re-quantize GE with `edgetailor server "
                                                                          "compress --recipe int8`")
                    layer.bias_q = q.astype(np.int32)
                layer.multiplier = (grid / np.float64(layer.out_quant.scale)).astype(np.float32)
            previous = layer.out_quant


def compile_ge(model, spec: InputSpec, logits: str, taps: dict[int, str], where: str = "ge.onnx") -> CompiledGE:
    """The firmware's layers for GE's ONNX graph (``onnx.ModelProto``); ``taps`` maps ET_TAP_LE / ET_TAP_GN to
    the graph outputs LE and GN read. Raises ExportError, naming the node, for anything the kernels do not run."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"{where} has {len(inputs)} inputs; the firmware feeds GE one image",
                          hint="re-export the bundle")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(spec.shape) != 3 or spec.shape[0] != 1 or len(dims) != 4 or dims[1:] != list(spec.shape):
        raise ExportError(f"{where} takes an input of shape {dims} and the manifest says {spec.shape}; the "
                          "firmware feeds GE one grey image (batch, 1, height, width)",
                          hint="the firmware runs GEs on one channel of uint8 pixels; re-export the bundle")
    compiler = _Compiler(model, where)
    compiler.values[inputs[0].name] = _Value(-1, tuple(int(d) for d in spec.shape))
    compiler.compile()
    compiler.finish(logits, taps)
    lut, q_lut = input_luts(spec, compiler.input_quant)
    if compiler.quantized and compiler.input_quant is None:
        raise ExportError(f"{where}: a quantized GE whose image is not quantized", hint=KERNELS_HINT)
    return CompiledGE(compiler.layers, compiler.quantized, (int(spec.shape[1]), int(spec.shape[2])), lut, q_lut,
                      compiler.input_quant, {code: next(i for i, layer in enumerate(compiler.layers)
                                                        if layer.tap in (code, TAP_BOTH)) for code in taps})


# ----------------------------------------------------------------- the numpy twin
def _windows(x: np.ndarray, layer: Layer, pad_value) -> np.ndarray:
    """(N, C, out_h, out_w, kh, kw) windows of a (N, C, H, W) batch."""
    top, left, bottom, right = layer.pads
    if any(layer.pads):
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=pad_value)
    view = np.lib.stride_tricks.sliding_window_view(x, layer.kernel, axis=(2, 3))
    return view[:, :, ::layer.stride[0], ::layer.stride[1]][:, :, :layer.out_shape[1], :layer.out_shape[2]]


def _requantize(acc: np.ndarray, layer: Layer, channel_axis: int) -> np.ndarray:
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    scaled = acc.astype(np.float32) * layer.multiplier.reshape(shape)
    return np.clip(np.rint(scaled) + layer.out_quant.zero_point, 0, 255).astype(np.int32)


def run_layers(ge: CompiledGE, pixels: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """What the firmware computes for uint8 images (N, H, W): float logits and the tapped features
    (dequantized in an int8 GE), by the same layers, tables and integer arithmetic. The requantization rounds
    ``float32(acc) * multiplier`` half to even; a kernel that rounds otherwise differs in the last unit."""
    pixels = np.asarray(pixels, np.uint8)
    q = ge.quantized
    x = (ge.input_q_lut[pixels].astype(np.int32) if q else ge.input_lut[pixels])[:, None]
    outputs = []
    for layer in ge.layers:
        if layer.op == OP_CONV2D:
            if q:
                win = _windows(x, layer, layer.in_quant.zero_point).astype(np.int64) - layer.in_quant.zero_point
                acc = np.einsum("nchwij,ocij->nohw", win, layer.weight_q.astype(np.int64), optimize=True)
                x = _requantize(acc + layer.bias_q[None, :, None, None], layer, 1)
            else:
                win = _windows(x, layer, 0.0)
                x = np.einsum("nchwij,ocij->nohw", win, layer.weight, optimize=True) + layer.bias[None, :, None, None]
                x = x.astype(np.float32)
        elif layer.op == OP_RELU:
            x = np.maximum(x, layer.in_quant.zero_point if q else np.float32(0))
        elif layer.op == OP_MAXPOOL:
            x = _windows(x, layer, 0).max(axis=(4, 5))
        elif layer.op == OP_FLATTEN:
            x = x.reshape(len(x), -1, 1, 1)
        else:
            flat = x.reshape(len(x), -1)
            if q:
                acc = (flat.astype(np.int64) - layer.in_quant.zero_point) @ layer.weight_q.astype(np.int64).T
                x = _requantize(acc + layer.bias_q[None], layer, 1)[:, :, None, None]
            else:
                x = (flat @ layer.weight.T + layer.bias[None]).astype(np.float32)[:, :, None, None]
        outputs.append(x)

    def real(i: int) -> np.ndarray:
        out = outputs[i].reshape(len(pixels), -1)
        if not q:
            return out
        quant = ge.layers[i].out_quant
        return ((out - quant.zero_point) * np.float32(quant.scale)).astype(np.float32)

    return real(len(ge.layers) - 1), {code: real(i) for code, i in ge.tap_layers.items()}


def check_against_onnxruntime(ge: CompiledGE, onnx_path, spec: InputSpec, logits: str, taps: dict[int, str],
                              pixels: np.ndarray) -> dict[str, Any]:
    """Run the layers' numpy twin and onnxruntime on the same glyphs, before anything is written: catches a
    wrong layout, pad, scale or tap. onnxruntime runs with its graph optimizations off, so that it computes
    what the ONNX operators define (dequantize, float Conv, quantize) rather than its fused integer kernels,
    whose u8 x s8 products saturate on CPUs without VNNI and move int8 outputs by tens of units.

    An fp32 GE must match to ``FP32_TOLERANCE``; an int8 GE, where a requantization may round the other way,
    must agree on the answer for ``INT8_AGREEMENT`` of the glyphs and on at most ``INT8_OFF_BY_MORE`` of the
    outputs by more than one unit of their grid."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = list(dict.fromkeys([logits, *taps.values()]))
    want = dict(zip(names, session.run(names, {session.get_inputs()[0].name: spec.normalize(pixels)})))
    got_logits, got_taps = run_layers(ge, pixels)
    got = {logits: got_logits, **{name: got_taps[code] for code, name in taps.items()}}
    units = {logits: ge.layers[-1].out_quant, **{name: ge.tap_quant(code) for code, name in taps.items()}}
    diffs = {name: np.abs(got[name] - want[name].reshape(len(pixels), -1)) for name in names}
    agreement = float((got_logits.argmax(1) == want[logits].argmax(1)).mean())
    result: dict[str, Any] = {"glyphs": int(len(pixels)), "agreement": agreement,
                              "max_abs_diff": {name: float(d.max()) for name, d in diffs.items()}}
    if ge.quantized:
        off = {name: float((d / np.float32(units[name].scale) > 1.01).mean()) for name, d in diffs.items()}
        result["off_by_more_than_one_unit"] = off
        worst = max(off, key=off.get)
        if agreement < INT8_AGREEMENT or off[worst] > INT8_OFF_BY_MORE:
            raise ExportError(f"the firmware's int8 layers agree with onnxruntime on {agreement:.1%} of "
                              f"{len(pixels)} replay glyphs, and differ on {off[worst]:.2%} of GE output "
                              f"{worst!r} by more than one unit",
                              hint="this is a bug in the exporter or an unusual QDQ graph; report it with the bundle")
        return result
    for name in names:
        scale = max(1.0, float(np.abs(want[name]).max()))
        if result["max_abs_diff"][name] > FP32_TOLERANCE * scale:
            raise ExportError(f"the firmware's layers differ from onnxruntime on GE output {name!r} by "
                              f"{result['max_abs_diff'][name]:.3g}",
                              hint="this is a bug in the exporter; report it with the bundle")
    return result
