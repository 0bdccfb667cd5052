"""Smoke tests of the decoder-flavor benchmark's pieces on the tiny NORA-Long bundle's decoder (no timing asserts).

References: node counts against the op-type tally of the same file; a decode step's presents against its own
past inputs (the cache must be carried over unchanged) and its logits rows against the bundle manifest; the
ORT-fused graph and onnxruntime-genai's fp32 builder graph against our exported graph on the same inputs;
the builder's share-buffer run against its grow-by-concat run (same logits, new K/V written at position P).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from nora_edge.bench import decoder_flavors as df
from nora_edge.bench import decoder_flavors_build as build
from nora_edge.errors import InputError
from nora_edge.sessions import session_options

PAST = 12
HAVE_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])


def test_node_counts_structure(tiny_bundle_h5: Path, tmp_path: Path) -> None:
    counts = df.node_counts(tiny_bundle_h5 / "decoder.onnx", tmp_path)
    for stage in ("file", "optimized"):
        assert counts[stage]["nodes"] == sum(counts[stage]["ops"].values()) > 0
    assert counts["optimized"]["nodes"] <= counts["file"]["nodes"]
    assert "MatMul" in counts["file"]["ops"]


def test_decode_step_and_interleaved_timing(tiny_ckpt_h5: Path, tiny_bundle_h5: Path) -> None:
    dims = build.dims_from_config(tiny_ckpt_h5)
    rows = build.head_rows(tiny_bundle_h5)
    sess = _session(tiny_bundle_h5 / "decoder.onnx")
    runner = df.StepRunner(sess, dims, PAST, seed=3)
    runner()
    out = runner.outputs()
    assert out["logits"].shape == (1, rows.size)
    compared = 0
    for i in range(dims.layers):
        for kind in ("key", "value"):
            present = out[f"present.{i}.{kind}"]
            assert present.shape == (1, dims.kv_heads, PAST + 1, dims.head_dim)
            past = runner.feeds[f"past_key_values.{i}.{kind}"]
            np.testing.assert_array_equal(present[:, :, :PAST], past)
            compared += past.size
    assert compared == 2 * dims.layers * dims.kv_heads * PAST * dims.head_dim
    stats = df.time_interleaved(
        {"a": runner, "b": df.StepRunner(sess, dims, PAST, seed=3)}, steps=3, warmup=1
    )
    assert set(stats) == {"a", "b"} and all(s["n"] == 3 and s["median"] > 0 for s in stats.values())


def test_fused_flavor_matches_source(tiny_ckpt_h5: Path, tiny_bundle_h5: Path, tmp_path: Path) -> None:
    dims = build.dims_from_config(tiny_ckpt_h5)
    src = tiny_bundle_h5 / "decoder.onnx"
    fused, stats = build.ensure_fused(src, tmp_path / "fused.onnx", dims)
    assert json.loads(fused.with_suffix(".fusions.json").read_text()) == stats
    outs = []
    for path in (src, fused):
        r = df.StepRunner(_session(path), dims, PAST, seed=1, mrope_offsets=df.EQUALITY_OFFSETS)
        r()
        outs.append(r.outputs())
    diff = df.max_abs_diff(*outs)
    assert diff["compared"] == sum(v.size for v in outs[0].values())
    assert diff["logits"] < 1e-4 and diff["present"] < 1e-4, diff


def test_step_inputs_reject_bad_shapes(tiny_ckpt_h5: Path) -> None:
    dims = build.dims_from_config(tiny_ckpt_h5)
    with pytest.raises(InputError, match="mrope_offsets"):
        df.step_inputs(dims, 3, 0, mrope_offsets=(0, 5, 11))
    with pytest.raises(InputError, match="cache_len"):
        df.StepRunner(None, dims, PAST, cache_len=PAST)  # type: ignore[arg-type]


@pytest.mark.skipif(
    not HAVE_GENAI, reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)"
)
def test_builder_flavor_matches_ours(tiny_ckpt_h5: Path, tiny_bundle_h5: Path, tmp_path: Path) -> None:
    ok, why = build.genai_available()
    if not ok:
        pytest.skip(why)
    dims = build.dims_from_config(tiny_ckpt_h5)
    model = build.ensure_builder(tiny_ckpt_h5, tmp_path, "builder-fp32")
    rows = build.head_rows(tiny_bundle_h5)
    builder = _session(model)

    def step(sess: ort.InferenceSession, cache_len: int | None = None) -> df.StepRunner:
        r = df.StepRunner(sess, dims, PAST, seed=2, cache_len=cache_len, mrope_offsets=df.EQUALITY_OFFSETS)
        r()
        return r

    ours, plain = step(_session(tiny_bundle_h5 / "decoder.onnx")).outputs(), step(builder).outputs()
    theirs = {**plain, "logits": plain["logits"].reshape(1, -1)[:, rows]}
    diff = df.max_abs_diff(ours, theirs)
    assert diff["compared"] == sum(v.size for v in ours.values())
    assert diff["logits"] < 1e-4 and diff["present"] < 1e-4, diff

    shared = step(builder, cache_len=PAST + 4)
    out = shared.outputs()
    np.testing.assert_allclose(out["logits"], plain["logits"], rtol=0, atol=1e-6)
    for i in range(dims.layers):
        buf = shared.feeds[f"past_key_values.{i}.key"]  # the bound buffer, written in place
        assert out[f"present.{i}.key"].shape == buf.shape == (1, dims.kv_heads, PAST + 4, dims.head_dim)
        np.testing.assert_allclose(
            out[f"present.{i}.key"][:, :, PAST], plain[f"present.{i}.key"][:, :, PAST], atol=1e-6
        )


@pytest.mark.skipif(
    not HAVE_GENAI, reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)"
)
@pytest.mark.parametrize("variant", ["builder-fp32", "builder-int4-b128"])
def test_head_sliced_builder_keeps_rows(
    variant: str, tiny_ckpt_h5: Path, tiny_bundle_h5: Path, tmp_path: Path
) -> None:
    ok, why = build.genai_available()
    if not ok:
        pytest.skip(why)
    dims = build.dims_from_config(tiny_ckpt_h5)
    rows = build.head_rows(tiny_bundle_h5)
    full = build.ensure_builder(tiny_ckpt_h5, tmp_path, variant)
    sliced = build.ensure_head_sliced(full, rows, tmp_path / "sliced")
    outs = []
    for path in (full, sliced):
        r = df.StepRunner(_session(path), dims, PAST, seed=4, mrope_offsets=df.EQUALITY_OFFSETS)
        r()
        outs.append(r.outputs())
    assert outs[1]["logits"].shape == (1, 1, rows.size)
    outs[0]["logits"] = outs[0]["logits"][..., rows]
    diff = df.max_abs_diff(*outs)
    assert diff["compared"] == sum(v.size for v in outs[1].values())
    assert diff["logits"] < 1e-5 and diff["present"] == 0.0, diff


def test_profile_ops_structure(tiny_ckpt_h5: Path, tiny_bundle_h5: Path, tmp_path: Path) -> None:
    dims = build.dims_from_config(tiny_ckpt_h5)
    path = tiny_bundle_h5 / "decoder.onnx"
    prof = df.profile_ops({"a": path, "b": path}, dims, PAST, threads=1, steps=3, work_dir=tmp_path, warmup=1)
    assert set(prof) == {"a", "b"}
    for per_op in prof.values():
        ops = {k: v for k, v in per_op.items() if not k.startswith("(")}
        assert "MatMul" in ops and all(v >= 0 for v in ops.values())
        assert per_op["(all nodes)"] == pytest.approx(sum(ops.values()))
    assert not list(tmp_path.glob("ort_profile*"))  # profiles are parsed and removed
