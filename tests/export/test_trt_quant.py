"""Quantized `--target tensorrt` bundles (fp16, int8-qdq, int4-qdq) of the trained tiny fixture, run in onnxruntime CPU.

Reference: the fp32 TensorRT-flavor bundle of the same checkpoint (static KV decoder). Each quantized bundle must
load in NoraPolicy with its static-KV decoder, keep the manifest's ``tensorrt`` section, pass TensorRT's operator
tables (export/trt_support.py) for the versions its manifest lists, and carry a fidelity report (vs the fp32 bundle)
that passes the recipe's thresholds; the graphs must hold the promised form (Q/DQ pairs, blocked INT4
DequantizeLinear, fp16 weights). Nothing here builds a TensorRT engine or runs on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from nora_edge.bundle import Bundle
from nora_edge.errors import ExportError

TRT_RECIPES = ("fp16", "int8-qdq", "int4-qdq")


@pytest.fixture(scope="module")
def trt_bundles(tiny_trained_ckpt_h5: Path, trt_target_bundles, tmp_path_factory) -> dict[str, Path]:
    """{"fp32": the fp32 TensorRT bundle, recipe: its quantized bundle}; int4-qdq goes through export_bundle (the
    CLI's path: fp32 export in a temp dir, then the recipe), the others through quantize_bundle on "fp32"."""
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.quantize import quantize_bundle

    root = tmp_path_factory.mktemp("trt_quant")
    out = {"fp32": trt_target_bundles[0]}
    for name in ("fp16", "int8-qdq"):
        out[name] = quantize_bundle(out["fp32"], root / name, name)
    out["int4-qdq"] = export_bundle(
        tiny_trained_ckpt_h5, root / "int4-qdq", target="tensorrt", precision="int4-qdq", validate=False,
        progress=False,
    )  # fmt: skip
    return out


def _graph(b: Bundle, name: str) -> onnx.ModelProto:
    return onnx.load(str(b.file(b.components[name].file)))


def _const_matmuls(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


@pytest.mark.parametrize("recipe", TRT_RECIPES)
def test_bundle_loads_keeps_the_tensorrt_section_and_passes_its_gate(trt_bundles, recipe):
    from nora_edge.export.quantize import GATE_METRICS, check_fidelity, get_recipe
    from nora_edge.policy import NoraPolicy
    from nora_edge.static_kv import StaticDecoder

    src, b = Bundle.load(trt_bundles["fp32"]), Bundle.load(trt_bundles[recipe])
    assert b.manifest["export"]["target"] == "tensorrt" and b.manifest["export"]["precision"] == recipe
    assert b.components["decoder"].meta["kv_cache"] == "static"
    section, src_section = b.manifest["tensorrt"], src.manifest["tensorrt"]
    assert section["profiles"] == src_section["profiles"] and section["kv_cache"] == src_section["kv_cache"]
    assert section["precision"] == recipe
    # the gate, recomputed from the report's aggregates against the recipe's own thresholds
    report = json.loads((b.path / "fidelity_report.json").read_text())
    checks = check_fidelity(get_recipe(recipe).fidelity, report["aggregates"])
    assert len(checks) == len(GATE_METRICS) and all(c.passed for c in checks), [
        c for c in checks if not c.passed
    ]
    assert (
        b.manifest["validation"]["passed"] is True
        and not b.manifest["validation"]["accepted_despite_failure"]
    )
    # the static decoder's per-step logits were recorded (IO-bound runs), so the logits cosine is measured
    records = report["records"]
    assert len(records) == 8 and all(r["logits_cosine"] is not None for r in records)
    policy = NoraPolicy.load(b.path, providers="cpu", threads=1, forced_tokens="flag")
    assert isinstance(policy.decoder, StaticDecoder)
    chunk = policy.run_chunk(
        np.random.default_rng(7).integers(0, 256, (224, 224, 3), dtype=np.uint8), "pick up the red block"
    )
    assert (
        chunk.actions.shape == (b.codec.time_horizon, b.codec.action_dim) and np.isfinite(chunk.actions).all()
    )


@pytest.mark.parametrize("recipe", TRT_RECIPES)
def test_graphs_pass_the_tensorrt_tables(trt_bundles, recipe):
    """Every graph against every TRT_CHECK_VERSIONS table: standard domains only, named nodes; the int4-qdq
    decoder (opset 21) misses only 10.3's documented opset range (9..20), which its manifest says."""
    from nora_edge.export.pipeline import TRT_CHECK_VERSIONS
    from nora_edge.export.trt_support import check_graph

    b = Bundle.load(trt_bundles[recipe])
    checked = 0
    for name in ("vision", "decoder"):
        model = _graph(b, name)
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        assert all(n.name for n in model.graph.node)
        for version in TRT_CHECK_VERSIONS:
            report = check_graph(b.file(b.components[name].file), version)
            if recipe == "int4-qdq" and name == "decoder" and version == "10.3":
                assert [p.kind for p in report.problems] == ["opset"], report.format()
                assert version not in b.manifest["tensorrt"]["checked_versions"]
                assert "opset 21" in b.manifest["tensorrt"]["not_passed"][version]
            else:
                assert report.ok, report.format()
            checked += 1
    assert checked == 2 * len(TRT_CHECK_VERSIONS)
    want = ["latest"] if recipe == "int4-qdq" else list(TRT_CHECK_VERSIONS)
    assert b.manifest["tensorrt"]["checked_versions"] == want


def test_int4_qdq_decoder_is_blocked_int4_dequantize_into_matmul(trt_bundles):
    from nora_edge.export.quantize.int4_qdq import blocked_dq_pairs

    src, b = Bundle.load(trt_bundles["fp32"]), Bundle.load(trt_bundles["int4-qdq"])
    fp32, q = _graph(src, "decoder"), _graph(b, "decoder")
    assert next(i.version for i in q.opset_import if i.domain in ("", "ai.onnx")) == 21
    weights = {t.name: t for t in fp32.graph.initializer}
    matmuls = _const_matmuls(fp32)  # every constant-weight MatMul of the fp32 decoder, head included
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    int4 = [t for t in q.graph.initializer if t.data_type == TensorProto.INT4]
    pairs = blocked_dq_pairs(q)
    assert len(matmuls) == len(dqs) == len(int4) == len(pairs) == 15  # 2 layers x 7 + the head
    assert b.components["decoder"].precision == "int4-qdq-b128"
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    for dq, mm in pairs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        assert (
            attrs == {"axis": 0, "block_size": 128} and len(dq.input) == 2
        )  # no zero point (TensorRT: zero)
        src_mm = fp32_nodes[mm.name.removesuffix("_matmul_Q4")]
        w = weights[src_mm.input[1]]
        assert list(next(t for t in int4 if t.name == dq.input[0]).dims) == list(w.dims)
    assert not {n.op_type for n in q.graph.node} & {
        "MatMulNBits",
        "QuantizeLinear",
    }  # weight-only, standard ops
    assert b.components["vision"].precision == "int8-qdq"


def test_int8_qdq_graphs_hold_quantize_dequantize_pairs(trt_bundles):
    src, b = Bundle.load(trt_bundles["fp32"]), Bundle.load(trt_bundles["int8-qdq"])
    for name in ("vision", "decoder"):
        fp32, q = _graph(src, name), _graph(b, name)
        producer = {o: n for n in q.graph.node for o in n.output}
        inits = {t.name: t for t in q.graph.initializer}
        compared = 0
        for mm in (n for n in q.graph.node if n.op_type == "MatMul"):
            dq_w = producer.get(mm.input[1])
            if dq_w is None or dq_w.op_type != "DequantizeLinear" or dq_w.input[0] not in inits:
                continue
            assert inits[dq_w.input[0]].data_type == TensorProto.INT8  # per-channel symmetric weights
            dq_x = producer[mm.input[0]]  # the activation: DequantizeLinear(QuantizeLinear(x))
            assert dq_x.op_type == "DequantizeLinear" and producer[dq_x.input[0]].op_type == "QuantizeLinear"
            zps = [inits[n.input[2]] for n in (dq_w, dq_x) if len(n.input) > 2 and n.input[2] in inits]
            assert all(not onnx.numpy_helper.to_array(z).any() for z in zps)  # TensorRT: zero points zero
            compared += 1
        assert compared == len(_const_matmuls(fp32)) > 0, name


def test_fp16_graphs_are_fp16_with_float32_io(trt_bundles):
    from nora_edge.trt_profiles import trt_precision

    src, b = Bundle.load(trt_bundles["fp32"]), Bundle.load(trt_bundles["fp16"])
    for name in ("vision", "decoder"):
        fp32, q = _graph(src, name), _graph(b, name)
        io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]]  # noqa: E731
        assert io(q) == io(fp32)  # the runtime's float32 buffers (static KV included) bind unchanged
        kept = {k["name"] for k in b.manifest["quantization"]["components"][name]["nodes_kept_fp32"]}
        inits = {t.name: t.data_type for t in q.graph.initializer}
        by_node = {
            n.name: inits[n.input[1]] for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in inits
        }
        assert len(by_node) == len(_const_matmuls(fp32)) > 0  # every weight MatMul still there, named alike
        want = {n: TensorProto.FLOAT if n in kept else TensorProto.FLOAT16 for n in by_node}
        assert by_node == want  # fp16 weights except the calibrated fp32 islands
        spec = b.components[name]
        assert trt_precision(spec.precision, spec.meta).strongly_typed  # the fp32 islands keep their types


def test_calibration_records_the_static_decoders_real_step_inputs(trt_bundles):
    """The recorded decoder feeds (IO-bound, K/V updated in place) reproduce the recorded logits when run
    functionally by a fresh onnxruntime session, and their cache positions tile the chunk's tokens."""
    from nora_edge import bundle as B
    from nora_edge.export.quantize.calibration import attach_recorders
    from nora_edge.policy import NoraPolicy
    from nora_edge.static_kv import CACHE_POSITION

    policy = NoraPolicy.load(trt_bundles["fp32"], providers="cpu", threads=1, forced_tokens="flag")
    _, rec = attach_recorders(policy, (B.LOGITS,))
    chunk = policy.run_chunk(
        np.random.default_rng(3).integers(0, 256, (224, 224, 3), dtype=np.uint8), "open the drawer"
    )
    assert len(rec.feeds) == len(rec.outputs) == len(chunk.ids)  # the prefill + one step per later id
    sess = ort.InferenceSession(str(policy.bundle.file("decoder.onnx")), providers=["CPUExecutionProvider"])
    nxt = int(rec.feeds[0][CACHE_POSITION][0])  # the prompt prefix was prefilled (and cached) at load
    assert nxt > 0
    k0 = policy.decoder.kv_names[0]
    first = rec.feeds[0][k0]  # (1, Hkv, MAX, hd): copied before the in-place write
    assert (np.abs(first[:, :, :nxt]).max(axis=-1) > 0).all() and not first[:, :, nxt:].any()
    for feed, out in zip(rec.feeds, rec.outputs, strict=True):
        pos = feed[CACHE_POSITION]
        np.testing.assert_array_equal(pos, np.arange(nxt, nxt + len(pos)))
        nxt += len(pos)
        got = sess.run([B.LOGITS], feed)[0]
        np.testing.assert_allclose(got, out[B.LOGITS], rtol=0, atol=1e-5)
    assert len(rec.feeds) > 1 and len(rec.feeds[0][CACHE_POSITION]) > 1  # a prefill, then decode steps


@pytest.mark.parametrize("recipe", ["int8", "int4", "int4-b32", "int4-hqq", "mixed"])
def test_non_tensorrt_recipes_are_refused(trt_bundles, tiny_trained_ckpt_h5: Path, tmp_path, recipe):
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.quantize import quantize_bundle

    match = f"recipe '{recipe}' cannot target TensorRT.*'fp16', 'int8-qdq', 'int4-qdq'"
    with pytest.raises(ExportError, match=match):
        export_bundle(
            tiny_trained_ckpt_h5, tmp_path / "x", target="tensorrt", precision=recipe, progress=False
        )
    with pytest.raises(ExportError, match=match):
        quantize_bundle(trt_bundles["fp32"], tmp_path / "y", recipe)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
