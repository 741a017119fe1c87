"""`edgetailor export firmware` and `export firmware-samples`: the graph compiler, the replay code, the sample
file, and one whole export of the session's bundle, compiled with the C compiler when there is one."""

import json
import shutil
import subprocess
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgetailor.export.bundle import balanced_replay
from edgetailor.export.firmware import (c_float, c_string, decode_glyph, encode_glyph, encode_replay,
                                        export_firmware)
from edgetailor.export.firmware_graph import (OP_CONV2D, OP_FLATTEN, OP_LINEAR, OP_MAXPOOL, OP_RELU, TAP_BOTH, TAP_GN,
                                              TAP_LE, check_against_onnxruntime, compile_ge, input_luts, run_layers)
from edgetailor.export.firmware_samples import (HEADER, export_firmware_samples, firmware_samples_bytes,
                                                read_firmware_samples)
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import ConfigError, DataFormatError, ExportError, SampleError, TrustError
from edgetailor.toolkit.input_spec import InputSpec

SPEC = InputSpec(shape=[1, 8, 8], scale=1 / 255, mean=0.2, std=0.3)


# ------------------------------------------------------------------ replay code
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_zero_run_code_round_trips(height, width, ink, seed):
    rng = np.random.default_rng(seed)
    glyph = np.where(rng.random((height, width)) < ink, rng.integers(0, 256, (height, width)), 0).astype(np.uint8)
    code = encode_glyph(glyph)
    decoded, end = decode_glyph(code, 0, glyph.size)
    assert end == len(code) and np.array_equal(decoded, glyph.reshape(-1))


@pytest.mark.parametrize("glyph", [np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8),
                                   np.tile(np.array([0, 7], np.uint8), 392).reshape(28, 28)])
def test_zero_run_code_edges(glyph):
    data, offsets = encode_replay(np.stack([glyph, glyph[::-1]]))
    for i, start in enumerate(offsets):
        decoded, _ = decode_glyph(data, int(start), 784)
        assert np.array_equal(decoded, (glyph if i == 0 else glyph[::-1]).reshape(-1))
    if not glyph.any():
        assert len(data) == 2 * 2 * 4            # 784 zeros: [255 0] [255 0] [255 0] [19 0]


def test_zero_run_code_refuses_an_overrun():
    with pytest.raises(ExportError, match="covers more pixels"):
        decode_glyph(bytes([200, 0, 100, 0]), 0, 256)


# ------------------------------------------------------------------ C text
def test_c_constants_are_exact():
    for value in np.float32([0.1, -1.5e-30, 3.4e38, 1.0, -0.0, 1e-45]):
        text = c_float(value)
        assert text.endswith("f")
        assert np.float32(float.fromhex(text[:-1])) == value and np.signbit(np.float32(float.fromhex(text[:-1]))) \
            == np.signbit(value)
    with pytest.raises(ExportError, match="non-finite"):
        c_float(float("nan"))
    assert c_string('a"b\\c\nd??=é') == '"a\\"b\\\\c\\012d?\\?=\\303\\251"'


# ------------------------------------------------------------------ graph compiler
def _model(nodes, inits, outputs, input_shape=(None, 1, 8, 8)):
    dims = ["batch" if d is None else d for d in input_shape]
    graph = helper.make_graph(nodes, "ge", [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _lenet_like(rng):
    """Conv (asymmetric pads, stride 2) -> Relu -> MaxPool -> Flatten ("feat") -> Gemm -> Relu ("hidden") -> Gemm."""
    inits = {"cw": rng.normal(0, 0.3, (3, 1, 3, 3)).astype(np.float32), "cb": rng.normal(0, 0.1, 3).astype(np.float32),
             "w1": rng.normal(0, 0.3, (6, 12)).astype(np.float32), "b1": rng.normal(0, 0.1, 6).astype(np.float32),
             "w2": rng.normal(0, 0.3, (4, 6)).astype(np.float32), "b2": rng.normal(0, 0.1, 4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["image", "cw", "cb"], ["c"], name="/conv", kernel_shape=[3, 3],
                              pads=[1, 0, 2, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"], name="/relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="/pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["feat"], name="/flatten", axis=1),
             helper.make_node("Gemm", ["feat", "w1", "b1"], ["g1"], name="/fc1", transB=1),
             helper.make_node("Relu", ["g1"], ["hidden"], name="/relu1"),
             helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], name="/fc2", transB=1)]
    return _model(nodes, inits, ["logits", "feat", "hidden"])


def test_compiles_a_lenet_like_graph_and_matches_onnxruntime(tmp_path):
    model = _lenet_like(np.random.default_rng(0))
    onnx.save(model, tmp_path / "ge.onnx")
    ge = compile_ge(model, SPEC, "logits", {TAP_LE: "feat", TAP_GN: "hidden"})
    assert [layer.op for layer in ge.layers] == [OP_CONV2D, OP_RELU, OP_MAXPOOL, OP_FLATTEN, OP_LINEAR, OP_RELU,
                                                 OP_LINEAR]
    conv = ge.layers[0]
    # (8 + 1 + 2 - 3) // 2 + 1 rows, (8 + 0 + 1 - 3) // 2 + 1 columns
    assert conv.out_shape == (3, 5, 4) and conv.pads == (1, 0, 2, 1)
    assert ge.layers[3].tap == TAP_LE and ge.layers[5].tap == TAP_GN and ge.tap_dim(TAP_LE) == 12
    assert ge.max_activation == max(layer.in_elements + layer.out_elements for layer in ge.layers)
    pixels = np.random.default_rng(1).integers(0, 256, (16, 8, 8)).astype(np.uint8)
    result = check_against_onnxruntime(ge, tmp_path / "ge.onnx", SPEC, "logits", {TAP_LE: "feat", TAP_GN: "hidden"},
                                       pixels)
    assert result["max_abs_diff"]["logits"] < 1e-5


def test_a_shared_tap_is_marked_both():
    ge = compile_ge(_lenet_like(np.random.default_rng(0)), SPEC, "logits", {TAP_LE: "feat", TAP_GN: "feat"})
    assert ge.layers[3].tap == TAP_BOTH and ge.tap_layers == {TAP_LE: 3, TAP_GN: 3}


def test_refuses_a_softmax_naming_the_node():
    inits = {"w": np.ones((4, 64), np.float32)}
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], name="/flatten"),
             helper.make_node("Gemm", ["flat", "w"], ["scores"], name="/fc", transB=1),
             helper.make_node("Softmax", ["scores"], ["logits"], name="/blocks.0/attn/Softmax")]
    with pytest.raises(ExportError, match=r"GE layer '/blocks.0/attn/Softmax' \(Softmax\) has no firmware kernel") as e:
        compile_ge(_model(nodes, inits, ["logits", "flat"]), SPEC, "logits", {TAP_LE: "flat", TAP_GN: "flat"})
    assert "LeNet-style" in e.value.hint


def test_refuses_grouped_convolutions_and_branches():
    inits = {"w": np.ones((2, 1, 3, 3), np.float32)}
    grouped = [helper.make_node("Conv", ["image", "w"], ["c"], name="/dw", kernel_shape=[3, 3], group=2)]
    with pytest.raises(ExportError, match=r"'/dw' \(Conv\) is a grouped convolution"):
        compile_ge(_model(grouped, {"w": np.ones((2, 1, 3, 3), np.float32)}, ["c"], (None, 1, 8, 8)),
                   SPEC, "c", {TAP_LE: "c"})
    branch = [helper.make_node("Conv", ["image", "w"], ["c"], name="/conv", kernel_shape=[3, 3]),
              helper.make_node("Relu", ["c"], ["r"], name="/relu"),
              helper.make_node("Add", ["c", "r"], ["logits"], name="/skip")]
    with pytest.raises(ExportError, match=r"'/skip' \(Add\) has no firmware kernel"):
        compile_ge(_model(branch, inits, ["logits"]), SPEC, "logits", {TAP_LE: "r"})


def test_matmul_and_add_make_a_linear_layer():
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(64, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], name="/flatten"),
             helper.make_node("MatMul", ["flat", "w"], ["mm"], name="/mm"),
             helper.make_node("Add", ["mm", "b"], ["logits"], name="/add")]
    ge = compile_ge(_model(nodes, {"w": w, "b": b}, ["logits", "flat"]), SPEC, "logits", {TAP_LE: "flat"})
    assert ge.layers[-1].op == OP_LINEAR and np.array_equal(ge.layers[-1].weight, w.T)
    pixels = rng.integers(0, 256, (3, 8, 8)).astype(np.uint8)
    logits, _ = run_layers(ge, pixels)
    np.testing.assert_allclose(logits, SPEC.normalize(pixels).reshape(3, -1) @ w + b, rtol=1e-5, atol=1e-5)


def test_an_int8_qdq_graph_folds_into_integer_layers(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(3)
    onnx.save(_lenet_like(rng), tmp_path / "fp32.onnx")
    calibration = SPEC.normalize(rng.integers(0, 256, (32, 8, 8)).astype(np.uint8))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(calibration[i:i + 1] for i in range(len(calibration)))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {"image": row}

    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    taps = {TAP_LE: "feat", TAP_GN: "hidden"}
    ge = compile_ge(onnx.load(str(tmp_path / "int8.onnx")), SPEC, "logits", taps)
    assert ge.quantized and ge.input_q_lut is not None
    for layer in ge.layers:
        assert layer.in_quant is not None and layer.out_quant is not None
        if layer.op in (OP_CONV2D, OP_LINEAR):
            assert layer.weight_q.dtype == np.int8 and layer.bias_q.dtype == np.int32
            want = np.float64(layer.in_quant.scale) * layer.weight_scale / np.float64(layer.out_quant.scale)
            assert np.array_equal(layer.multiplier, want.astype(np.float32))
    pixels = rng.integers(0, 256, (64, 8, 8)).astype(np.uint8)
    result = check_against_onnxruntime(ge, tmp_path / "int8.onnx", SPEC, "logits", taps, pixels)
    assert result["agreement"] >= 0.99


def test_the_quantized_input_table_is_onnx_quantizelinear():
    """Every pixel value through InputSpec.normalize and then QuantizeLinear as onnxruntime computes it."""
    from edgetailor.export.firmware_graph import Quant

    quant = Quant(float(np.float32(0.0123)), 46)
    lut, q_lut = input_luts(SPEC, quant)
    assert np.array_equal(lut, SPEC.normalize(np.arange(256, dtype=np.uint8).reshape(1, 16, 16)).reshape(-1))
    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "q",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, [256])],
                              [numpy_helper.from_array(np.float32(quant.scale), "s"),
                               numpy_helper.from_array(np.uint8(46), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"x": lut})[0], q_lut)


# ------------------------------------------------------------------ sample files
def test_sample_file_round_trips_and_refuses_damage(tmp_path):
    rng = np.random.default_rng(4)
    images, labels = rng.integers(0, 256, (7, 28, 28)).astype(np.uint8), rng.integers(0, 10, 7)
    names = [str(i) for i in range(10)]
    blob = firmware_samples_bytes(images, labels, names)
    magic, version, height, width, n_labels, count, crc, labels_crc = HEADER.unpack_from(blob)
    assert (magic, version, height, width, n_labels, count) == (b"ETSM", 1, 28, 28, 10, 7)
    assert len(blob) == 24 + 7 * (1 + 784) and crc == zlib.crc32(blob[24:])
    assert labels_crc == zlib.crc32("\n".join(names).encode()) != zlib.crc32("\n".join(names[::-1]).encode())
    path = tmp_path / "s.etsm"
    path.write_bytes(blob)
    got_images, got_labels = read_firmware_samples(path)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    for damaged, match in [(b"ETSX" + blob[4:], "not a firmware sample file"),
                           (blob[:-1] + bytes([blob[-1] ^ 1]), "CRC-32"),
                           (blob[:-5], "header promises")]:
        path.write_bytes(damaged)
        with pytest.raises(DataFormatError, match=match):
            read_firmware_samples(path)


# ------------------------------------------------------------------ --replay-size
def test_replay_subset_is_class_balanced_and_in_order():
    labels = np.array([3, 0, 1, 0, 2, 1, 3, 0, 2, 2, 1, 3, 0])
    replay = LabeledImages(np.arange(13, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8), labels,
                           ["a", "b", "c", "d"])
    subset = balanced_replay(replay, 9)               # 9 // 4 = 2 of each class, the first ones
    assert list(subset.images[:, 0, 0]) == [0, 1, 2, 3, 4, 5, 6, 8]
    assert np.bincount(subset.labels).tolist() == [2, 2, 2, 2]
    with pytest.raises(ConfigError, match="one glyph of each of the 4 classes"):
        balanced_replay(replay, 3)


# ------------------------------------------------------------------ a whole export
@pytest.fixture(scope="module")
def firmware_export(bundle_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("firmware") / "fw"
    return export_firmware(bundle_dir, out, max_samples=64)


def test_exports_the_session_bundle(firmware_export, bundle_dir):
    report = firmware_export
    model = report.out / "model"
    header = (model / "edgetailor_model.h").read_text()
    summary = json.loads((model / "model.json").read_text())
    assert not report.quantized and report.check["agreement"] == 1.0
    assert f'#define ET_MODEL_BUNDLE_ID "{report.bundle_id}"' in header and "#define ET_MAX_SAMPLES 64" in header
    assert summary["bytes"]["flash_estimate"] == report.flash_bytes
    assert report.replay_bytes < report.replay_raw_bytes
    assert (report.out / "libedgetailor" / "include" / "edgetailor.h").is_file()
    with pytest.raises(ExportError, match="already exists"):
        export_firmware(bundle_dir, report.out)
    with pytest.raises(ExportError, match="--int8 was asked for"):
        export_firmware(bundle_dir, report.out.with_name("int8"), int8=True)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")
def test_the_model_source_compiles(firmware_export):
    out = firmware_export.out
    proc = subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-c",
                           str(out / "model" / "edgetailor_model.c"), "-I", str(out / "libedgetailor" / "include"),
                           "-I", str(out / "model"), "-o", str(out / "model.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_trusted_keys_are_checked(bundle_dir, tmp_path):
    from edgetailor.toolkit.bundle import sign_bundle
    from edgetailor.toolkit.signing import generate_key

    signed = tmp_path / "signed"
    shutil.copytree(bundle_dir, signed)
    generate_key(tmp_path / "ours")
    generate_key(tmp_path / "theirs")
    sign_bundle(signed, tmp_path / "ours" / "signing.key", make_zip=False)
    with pytest.raises(TrustError, match="none of --trusted-keys"):
        export_firmware(signed, tmp_path / "a", trusted_keys=[tmp_path / "theirs" / "signing.pub"])
    with pytest.raises(TrustError, match="not signed"):
        export_firmware(bundle_dir, tmp_path / "b", trusted_keys=[tmp_path / "ours" / "signing.pub"])
    assert export_firmware(signed, tmp_path / "c", trusted_keys=[tmp_path / "ours" / "signing.pub"]).notes == []


def test_samples_are_prepared_and_labelled_by_the_bundle(bundle_dir, user, tmp_path):
    np.savez(tmp_path / "mine.npz", x=user.train.images, y=user.train.labels)
    report = export_firmware_samples(tmp_path / "mine.npz", bundle_dir, tmp_path / "mine.etsm")
    images, labels = read_firmware_samples(tmp_path / "mine.etsm")
    assert report.count == len(user.train) == len(images) and np.array_equal(labels, user.train.labels)
    np.savez(tmp_path / "odd.npz", x=user.train.images[:2], y=np.array([1, 12]))
    with pytest.raises(SampleError, match="'12'"):
        export_firmware_samples(tmp_path / "odd.npz", bundle_dir, tmp_path / "odd.etsm")
    assert not (tmp_path / "odd.etsm").exists()
