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
from nora_edge.trt_profiles import check_profile, format_shapes, parse_shapes, profile_options, trt_precision

ALL = [TRT_EP, CUDA_EP, CPU_EP]


def test_auto_prefers_tensorrt_then_cuda_then_cpu(tmp_path):
    built = {"tensorrt": {}}  # a component built for TensorRT (its manifest meta has a tensorrt section)
    # "mixed": an fp16-compute label with no islands of its own -> the EP's fp16 flag ("fp16" itself is built
    # strongly typed: test_trt_precision_keeps_fp16_islands_strongly_typed)
    got = resolve_providers("auto", precision="mixed", meta=built, cache_dir=tmp_path, available=ALL)
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


# --- TensorRT precision and optimization profiles ---------------------------------------------------------
def test_trt_precision_keeps_fp16_islands_strongly_typed(tmp_path):
    """fp16 (fp32 islands) -> strongly typed, no flag (the EP then builds a STRONGLY_TYPED network); the other
    labels keep their flags; an explicit meta override wins and turns strong typing off."""
    cases = {
        "fp16": (True, False, False),
        "fp32": (False, False, False),
        "mixed": (False, True, False),
        "int8-qdq": (False, False, True),
        "int8": (False, False, False),
        "int4-rtn-b32+head-int8": (False, False, False),
    }
    for precision, (typed, fp16, int8) in cases.items():
        got = trt_precision(precision)
        assert (got.strongly_typed, got.fp16, got.int8) == (typed, fp16, int8), precision
        opts = tensorrt_options(precision, {}, tmp_path)
        assert (opts["trt_fp16_enable"], opts["trt_int8_enable"]) == (str(fp16), str(int8)), precision
    forced = trt_precision("fp16", {"tensorrt": {"trt_fp16_enable": "True"}})
    assert (forced.strongly_typed, forced.fp16, forced.int8) == (False, True, False)
    assert len(cases) == 6


def spec_inputs() -> tuple[TensorSpec, ...]:
    return (
        TensorSpec("x", "float32", (1, "seq", 8)),
        TensorSpec("pos", "int64", ("seq",)),
        TensorSpec("kv", "float32", (1, 2, 16, 4)),
    )


PROFILE = {
    "x": {"min": [1, 1, 8], "opt": [1, 1, 8], "max": [1, 12, 8]},
    "pos": {"min": [1], "opt": [1], "max": [12]},
}


def test_profile_shapes_round_trip_through_the_ep_option_strings(tmp_path):
    opts = tensorrt_options("fp32", {}, tmp_path, check_profile(PROFILE, spec_inputs()))
    assert (
        opts["trt_profile_min_shapes"] == "x:1x1x8,pos:1"
    )  # the onnxruntime docs' name:AxBxC,name2:D syntax
    assert opts["trt_profile_max_shapes"] == "x:1x12x8,pos:12"
    compared = 0
    for key in ("min", "opt", "max"):
        parsed = parse_shapes(opts[f"trt_profile_{key}_shapes"])
        assert parsed == {name: dims[key] for name, dims in PROFILE.items()}
        assert format_shapes(PROFILE, key) == opts[f"trt_profile_{key}_shapes"]
        compared += len(parsed)
    assert compared == 6
    assert profile_options({}) == {} and profile_options(None) == {}
    for bad in ("x", "x:", "x:1xa", ":1", "x:1,x:2"):
        with pytest.raises(InputError, match="malformed shape entry"):
            parse_shapes(bad)


def test_check_profile_names_what_is_wrong():
    inputs = spec_inputs()
    assert check_profile(PROFILE, inputs) == PROFILE
    cases = {
        "dynamic input\\(s\\) \\['pos'\\]": {"x": PROFILE["x"]},
        "not an input of the graph": {**PROFILE, "y": PROFILE["pos"]},
        "does not fit the graph input": {**PROFILE, "x": {**PROFILE["x"], "max": [1, 12, 9]}},
        "min <= opt <= max": {**PROFILE, "pos": {"min": [4], "opt": [1], "max": [12]}},
        "ranks differ": {**PROFILE, "pos": {"min": [1], "opt": [1], "max": [12, 1]}},
        "positive ints": {**PROFILE, "pos": {"min": [0], "opt": [1], "max": [12]}},
        "'min', 'opt' and 'max'": {**PROFILE, "pos": {"min": [1], "max": [12]}},
    }
    for message, profile in cases.items():
        with pytest.raises(BundleError, match=message):
            check_profile(profile, inputs, "tensorrt.profiles.decoder")
    assert len(cases) == 7


def test_open_session_reads_the_bundle_tensorrt_section(tmp_path):
    """The add graph's dynamic inputs a, b get a profile from a bundle-style tensorrt section: "auto" then
    offers TensorRT first with those shapes (CPU here), and a section missing an input is refused."""
    spec = add_graph(tmp_path / "g.onnx")
    ranges = {"min": [1], "opt": [4], "max": [64]}
    section = {"profiles": {"g": {"a": ranges, "b": ranges}}}
    sess = open_session("g", tmp_path / "g.onnx", spec, providers="cpu", threads=1, tensorrt=section)
    assert [p for p, _ in sess.requested] == [CPU_EP] and sess.providers == [CPU_EP]
    np.testing.assert_array_equal(
        sess.run({"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)})["y"], 2.0
    )
    from nora_edge.trt_profiles import component_profile

    profile = component_profile(section, "g", spec)
    got = resolve_providers("auto", cache_dir=tmp_path, available=ALL, profile=profile)
    assert [p for p, _ in got] == ALL
    assert parse_shapes(got[0][1]["trt_profile_opt_shapes"]) == {"a": [4], "b": [4]}
    assert component_profile(section, "other", spec) is None and component_profile(None, "g", spec) is None
    with pytest.raises(BundleError, match="tensorrt.profiles.g: no min/opt/max range .*'b'"):
        open_session(
            "g", tmp_path / "g.onnx", spec, providers="cpu", tensorrt={"profiles": {"g": {"a": ranges}}}
        )
    with pytest.raises(BundleError, match="tensorrt.profiles"):
        open_session("g", tmp_path / "g.onnx", spec, providers="cpu", tensorrt={"kv_cache": {}})
