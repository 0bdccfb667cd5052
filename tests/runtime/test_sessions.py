"""Provider resolution and the IO-binding session wrapper (a small ONNX graph built with onnx.helper)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from nora_edge.bundle import ComponentSpec, TensorSpec
from nora_edge.errors import BundleError, InputError
from nora_edge.sessions import CPU_EP, CUDA_EP, TRT_EP, open_session, resolve_providers, tensorrt_options

ALL = [TRT_EP, CUDA_EP, CPU_EP]


def test_auto_prefers_tensorrt_then_cuda_then_cpu(tmp_path):
    built = {"tensorrt": {}}  # a component built for TensorRT (its manifest meta has a tensorrt section)
    got = resolve_providers("auto", precision="fp16", meta=built, cache_dir=tmp_path, available=ALL)
    assert [p for p, _ in got] == ALL
    trt = got[0][1]
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"] == str(tmp_path)
    assert trt["trt_fp16_enable"] == "True" and trt["trt_int8_enable"] == "False"
    # a plain ONNX bundle: "auto" never hands it to TensorRT (explicitly naming TensorRT still does)
    assert [p for p, _ in resolve_providers("auto", precision="fp16", available=ALL)] == [CUDA_EP, CPU_EP]
    assert [p for p, _ in resolve_providers("tensorrt", cache_dir=tmp_path, available=ALL)] == [
        TRT_EP,
        CPU_EP,
    ]
    assert [p for p, _ in resolve_providers("auto", available=[CUDA_EP, CPU_EP])] == [CUDA_EP, CPU_EP]
    assert [p for p, _ in resolve_providers("auto", available=["AzureExecutionProvider", CPU_EP])] == [CPU_EP]


def test_explicit_providers(tmp_path):
    assert [p for p, _ in resolve_providers("cpu", available=ALL)] == [CPU_EP]
    assert [p for p, _ in resolve_providers(["cuda"], available=ALL)] == [CUDA_EP, CPU_EP]
    with pytest.raises(InputError, match="not available"):
        resolve_providers("cuda", available=[CPU_EP])
    with pytest.raises(InputError, match="unknown execution provider"):
        resolve_providers("tpu", available=ALL)
    with pytest.raises(InputError, match="empty"):
        resolve_providers([], available=ALL)


def test_tensorrt_flags_follow_precision_and_meta(tmp_path):
    assert tensorrt_options("int8-qdq", {}, tmp_path)["trt_int8_enable"] == "True"
    # dynamic int8 and "+head-int8" labels are CPU recipes: TensorRT's int8 mode must stay off for them
    assert tensorrt_options("int8", {}, tmp_path)["trt_int8_enable"] == "False"
    assert tensorrt_options("int4-rtn-b32+head-int8", {}, tmp_path)["trt_int8_enable"] == "False"
    assert tensorrt_options("fp32", {}, tmp_path)["trt_fp16_enable"] == "False"
    opts = tensorrt_options(
        "fp32", {"tensorrt": {"trt_fp16_enable": True, "trt_max_workspace_size": 1 << 30}}, tmp_path
    )
    assert opts["trt_fp16_enable"] == "True" and opts["trt_max_workspace_size"] == str(1 << 30)
    with pytest.raises(BundleError, match="tensorrt"):
        tensorrt_options("fp32", {"tensorrt": [1]}, tmp_path)


def add_graph(path) -> ComponentSpec:
    """y = a + b, z = a * 2 (float32, dynamic n)."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n"])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Add", ["a", "b"], ["y"]), helper.make_node("Mul", ["a", "two"], ["z"])]
    graph = helper.make_graph(nodes, "g", [a, b], [y, z], initializer=[two])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    spec = lambda n: TensorSpec(n, "float32", ("n",))  # noqa: E731
    return ComponentSpec(path.name, (), "fp32", (spec("a"), spec("b")), (spec("y"), spec("z")), {})


def test_session_runs_with_io_binding_and_keeps_ortvalues(tmp_path):
    spec = add_graph(tmp_path / "g.onnx")
    sess = open_session("g", tmp_path / "g.onnx", spec, providers="cpu", threads=1)
    a = np.arange(4, dtype=np.float32)
    out = sess.run({"a": a, "b": np.ones(4, np.float32)}, keep={"z"})
    np.testing.assert_array_equal(out["y"], a + 1)
    assert isinstance(out["z"], ort.OrtValue)
    again = sess.run({"a": out["z"], "b": a}, fetch=["y"])  # an OrtValue fed straight back
    np.testing.assert_array_equal(again["y"], 3 * a)


def test_manifest_mismatch_and_bad_threads(tmp_path):
    spec = add_graph(tmp_path / "g.onnx")
    wrong = ComponentSpec(spec.file, (), "fp32", spec.inputs, (TensorSpec("w", "float32", ("n",)),), {})
    with pytest.raises(BundleError, match="missing \\['w'\\]"):
        open_session("g", tmp_path / "g.onnx", wrong, providers="cpu")
    with pytest.raises(InputError, match="threads"):
        open_session("g", tmp_path / "g.onnx", spec, providers="cpu", threads=0)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="cannot load"):
        open_session("g", tmp_path / "bad.onnx", spec, providers="cpu")
