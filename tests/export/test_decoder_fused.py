"""`export --decoder-graph fused`: onnxruntime-genai's builder graph adapted to the bundle (GroupQueryAttention over
KV buffers updated in place, MRotaryEmbedding, fused RMSNorm), validated like any export.

References: PyTorch (the export's own validation: prefill / decode / table logits and NORA's reference policy),
and the portable export of the same checkpoint run by the same NoraPolicy (greedy ids, token classes, actions).
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest

from nora_edge.bundle import Bundle
from nora_edge.errors import ExportError

FUSED_OPS = ("GroupQueryAttention", "MRotaryEmbedding", "SkipSimplifiedLayerNormalization")


@pytest.fixture(scope="module")
def bundles(fused_trained_bundle: Path, trt_target_bundles) -> tuple[Path, Path]:
    """(fused bundle, validated; the session's portable bundle of the same checkpoint)."""
    return fused_trained_bundle, trt_target_bundles[1]


def _ops(b: Bundle) -> collections.Counter:
    graph = onnx.load(b.file(b.components["decoder"].file), load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)


def test_manifest_graph_and_validation(bundles):
    fused, portable = Bundle.load(bundles[0]), Bundle.load(bundles[1])
    meta = fused.components["decoder"].meta
    assert fused.manifest["export"]["decoder_graph"] == "fused"
    assert meta["kv_cache"] == "shared" and meta["graph"] == "fused" and meta["max_len"] >= 512
    assert meta["builder"]["package"] == "onnxruntime-genai"
    v = fused.manifest["validation"]
    checks = ("decoder_prefill", "decoder_decode", "decoder_table", "policy")
    assert all(v[k]["passed"] for k in checks), {k: v[k] for k in checks}
    assert v["policy"]["pairs"] == 4
    ops, portable_ops = _ops(fused), _ops(portable)
    layers = int(meta["num_layers"])
    assert ops["GroupQueryAttention"] == layers and ops["MRotaryEmbedding"] == 2 * layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers  # post-attention of each + the next's input
    assert not any(portable_ops[op] for op in FUSED_OPS)
    assert sum(ops.values()) < sum(portable_ops.values()) / 2, (sum(ops.values()), sum(portable_ops.values()))
    # the head: action rows at the last position only
    out = {o.name: o for o in onnx.load(fused.file("decoder.onnx"), load_external_data=False).graph.output}
    assert out["logits"].type.tensor_type.shape.dim[1].dim_value == meta["num_rows"]


def test_greedy_ids_equal_the_portable_graph(bundles):
    from nora_edge.export.synthetic_task import instruction_list
    from nora_edge.policy import NoraPolicy
    from nora_edge.static_kv import StaticDecoder

    fused = NoraPolicy.load(bundles[0], providers="cpu", threads=1, forced_tokens="flag")
    portable = NoraPolicy.load(bundles[1], providers="cpu", threads=1, forced_tokens="flag")
    assert isinstance(fused.decoder, StaticDecoder) and fused.decoder.layout == "shared"
    assert fused.decoder.in_place and not isinstance(portable.decoder, StaticDecoder)
    rng = np.random.default_rng(5)
    compared = tokens = 0
    for k, instruction in enumerate(instruction_list()[:6]):
        image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        a, b = fused.run_chunk(image, instruction), portable.run_chunk(image, instruction)
        np.testing.assert_array_equal(a.ids, b.ids, err_msg=f"pair {k}")
        assert a.token_classes == b.token_classes
        np.testing.assert_allclose(a.actions, b.actions, rtol=0, atol=1e-9)
        compared, tokens = compared + 1, tokens + len(a.ids)
    assert compared == 6 and tokens >= 6


def test_kv_buffers_are_updated_in_place(bundles):
    """GroupQueryAttention writes the new rows into the very buffers bound as past (no copy), and a request
    longer than the buffers is refused before the graph runs."""
    from nora_edge.policy import NoraPolicy
    from nora_edge.static_kv import CacheOverflowError

    policy = NoraPolicy.load(bundles[0], providers="cpu", threads=1)
    dec = policy.decoder
    cache = dec.empty_cache()
    ptrs = {n: v.data_ptr() for n, v in cache.values.items()}
    s = 7
    embeds = dec.embed(np.arange(10, 10 + s))
    pos = np.broadcast_to(np.arange(s, dtype=np.int64), (3, 1, s)).copy()
    logits, after = dec.forward(embeds, pos, cache)
    assert after.length == s and np.isfinite(logits).all()
    written = 0
    for name, value in after.values.items():
        assert value.data_ptr() == ptrs[name], name
        rows = value.numpy()[0, :, :, :]  # (kv, slots, hd)
        assert np.abs(rows[:, :s]).max() > 0 and not rows[:, s:].any(), name  # rows 0..s-1 only
        written += 1
    assert written == 2 * dec.num_layers
    full = dataclasses.replace(after, length=dec.max_len - 2)
    with pytest.raises(CacheOverflowError, match="max_len"):
        dec.forward(embeds, pos, full)


def test_bad_options_are_refused(tiny_trained_ckpt_h5: Path, tmp_path):
    from nora_edge.export.pipeline import export_bundle

    with pytest.raises(ExportError, match="decoder_graph must be one of"):
        export_bundle(tiny_trained_ckpt_h5, tmp_path / "a", decoder_graph="builder", progress=False)
    with pytest.raises(ExportError, match="target 'onnxruntime' only"):
        export_bundle(
            tiny_trained_ckpt_h5, tmp_path / "b", decoder_graph="fused", target="tensorrt", progress=False
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_int4_recipe_keeps_the_fused_graph_and_passes_its_gate(bundles, tmp_path):
    """The weight-only int4 recipe quantizes every MatMul of the fused graph and meets its own fidelity
    thresholds against the fused fp32 bundle; the quantized bundle still runs its KV in place."""
    from nora_edge.export.quantize import quantize_bundle
    from nora_edge.policy import NoraPolicy
    from nora_edge.static_kv import StaticDecoder

    out = quantize_bundle(bundles[0], tmp_path / "int4", "int4")
    b = Bundle.load(out)
    assert b.manifest["validation"]["passed"] and b.components["decoder"].precision.startswith("int4")
    fp32_ops, ops = _ops(Bundle.load(bundles[0])), _ops(b)
    assert ops["GroupQueryAttention"] == fp32_ops["GroupQueryAttention"]
    layers = int(b.components["decoder"].meta["num_layers"])
    assert ops["MatMulNBits"] == 7 * layers + 1  # q, k, v, o, gate, up, down of every layer + the action head
    assert ops["MatMul"] == 0
    policy = NoraPolicy.load(out, providers="cpu", threads=1, forced_tokens="flag")
    assert isinstance(policy.decoder, StaticDecoder) and policy.decoder.in_place


def test_roofline_costs_match_the_portable_graph(bundles):
    """The bench's cost model reads the fused graph (MRotaryEmbedding taught to ORT's shape inference, KV slots
    costed at the rows GroupQueryAttention touches): same matrix FLOPs and weight bytes as the portable graph of
    the same checkpoint for prefill and decode, which compute the same products."""
    from nora_edge.bench.bundle_cost import bundle_stage_costs

    fused = bundle_stage_costs(Bundle.load(bundles[0]), 40, 12, 8)
    portable = bundle_stage_costs(Bundle.load(bundles[1]), 40, 12, 8)
    compared = 0
    for stage in ("prefill", "decode_step"):
        f, p = fused[stage], portable[stage]
        assert f.matmul_flops == pytest.approx(p.matmul_flops, rel=0.02), stage
        assert f.weight_bytes == pytest.approx(p.weight_bytes, rel=0.05), stage
        assert len(f.ops) < len(p.ops), stage
        compared += 1
    assert compared == 2
