"""The Orin prediction anchored on TensorRT Edge-LLM's AGX Orin numbers, against independent references: the
published Qwen3-VL parameter totals (architecture dims), the fit's own least-squares algebra (in-sample
residuals), a hand-written float64 byte count of the decode steps (the held-out anchor and one NORA-Long
prediction), ``roofline.predict_inference`` (the plain path), and typed errors for bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nora_edge.bench import orin_anchors as A
from nora_edge.bench import orin_predict as P
from nora_edge.bench.models import NORA_3B_CONFIG
from nora_edge.bench.roofline import INT4_BLOCK, PrecisionPlan, predict_inference
from nora_edge.errors import InputError
from nora_edge.profiles import load_profile

# Published parameter totals: Qwen/Qwen3-VL-2B-Instruct (Hugging Face model API, safetensors total) and
# Qwen/Qwen3-VL-4B-Instruct (sum of p.numel() of the loaded transformers model), as quoted by public repositories.
PUBLISHED_PARAMS = {"Qwen3-VL-2B": 2_127_532_032, "Qwen3-VL-4B": 4_437_815_808}


def qwen3_vl_params(cfg: dict) -> int:
    """Parameters of a Qwen3VLForConditionalGeneration counted from its config (transformers' module layout):
    text: tied embedding, per layer q/k/v/o (no bias), q_norm/k_norm (head_dim each), SwiGLU, 2 RMSNorms; final
    norm. Vision: Conv3d patch embedding with bias, learned position embedding, per block LayerNorm x2 (w+b),
    qkv + proj with bias, fc1/fc2 with bias; final merger (LayerNorm over hidden) + one DeepStack merger per index
    (LayerNorm over hidden * merge^2), each fc1 (ctx -> ctx) and fc2 (ctx -> out) with bias."""
    t, v = cfg["text_config"], cfg["vision_config"]
    h, i, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    layer = h * q + 2 * h * kv + q * h + 2 * hd + 3 * h * i + 2 * h
    text = t["vocab_size"] * h + t["num_hidden_layers"] * layer + h
    vh, vi, m = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"]
    block = 2 * 2 * vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh)
    patch = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * vh + vh
    ctx = vh * m * m
    merger_linears = ctx * ctx + ctx + ctx * v["out_hidden_size"] + v["out_hidden_size"]
    mergers = (merger_linears + 2 * vh) + len(v["deepstack_visual_indexes"]) * (merger_linears + 2 * ctx)
    vision = v["depth"] * block + patch + v["num_position_embeddings"] * vh + mergers
    return text + vision


def test_architecture_dims_reproduce_the_published_parameter_totals():
    compared = 0
    for model, cfg in A.QWEN3_VL_CONFIGS.items():
        assert qwen3_vl_params(cfg) == PUBLISHED_PARAMS[model], model
        # the roofline's spec streams every weight except the few the count above adds on top of it
        spec = A.qwen3_vl_spec(model)
        v, t = cfg["vision_config"], cfg["text_config"]
        ctx = v["hidden_size"] * v["spatial_merge_size"] ** 2
        extra = (
            v["num_position_embeddings"] * v["hidden_size"]  # position embedding (interpolated, not a GEMM)
            + 2 * v["hidden_size"]
            + 2 * ctx * len(v["deepstack_visual_indexes"])  # merger norms
            + t["num_hidden_layers"] * 2 * t["head_dim"]  # q_norm / k_norm
        )
        assert spec.vision_params() + spec.lm.total_params() + extra == PUBLISHED_PARAMS[model]
        compared += 1
    assert compared == 2


def test_fit_reproduces_the_in_sample_anchors_within_the_log_spread():
    """Per phase the fit is eta = geomean(roofline / measured), so in log space each anchor's residual is its
    deviation from the phase mean: exact for a phase with one anchor, +-half the spread for two."""
    fit = A.fit_efficiency()
    compared = 0
    for phase in A.PHASES:
        mine = [a for a in A.ANCHORS if a.phase == phase]
        logs = np.array([math.log(A.roofline_ms(a.key) / a.measured_ms) for a in mine], dtype=np.float64)
        tol = float(np.max(np.abs(logs - logs.mean())))  # the largest residual least squares can leave
        assert fit.efficiency[phase] == pytest.approx(math.exp(logs.mean()), rel=1e-12)
        residuals = []
        for a in mine:
            pred, meas = fit.in_sample[a.key]
            assert meas == a.measured_ms
            residuals.append(math.log(pred / meas))
            assert abs(residuals[-1]) <= tol + 1e-12, a.key
            compared += 1
        assert sum(residuals) == pytest.approx(0.0, abs=1e-12)  # least squares: residuals cancel in log
        if len(mine) == 1:
            assert abs(residuals[0]) < 1e-12
    assert compared == len(A.ANCHORS) == 5
    assert all(0 < e <= 1 for e in fit.efficiency.values())  # below the roofline's peaks


def _decode_bytes(layers, h, q, kv, inter, past, bias, w_bpp, head_rows, head_bpp) -> float:
    """Bytes one decode step reads and writes in the fused roofline (float64, written out by hand): per layer the
    int4 qkv / o / gate_up / down weights (+ bias), their input and output rows, the fused attention's Q, K, V
    over past + 1 positions and its output, the elementwise passes (4h + i + 4 (q + kv) elements); then the
    final norm and the head."""
    e = 2.0
    lin = lambda n_in, n_out, b: n_in * n_out * w_bpp + (n_out * e if b else 0) + (n_in + n_out) * e  # noqa: E731
    per = lin(h, q + 2 * kv, bias) + lin(q, h, False) + lin(h, 2 * inter, False) + lin(inter, h, False)
    per += (2 * q + 2 * (past + 1) * kv) * e + (4 * h + inter + 4 * (q + kv)) * e
    head = 2 * h * e + h * head_rows * head_bpp + (h + head_rows) * e
    return np.float64(layers) * per + head


INT4_BPP = 0.5 + 2 / INT4_BLOCK


def test_held_out_anchor_error_matches_a_hand_computed_byte_ratio():
    """Decode is bandwidth bound everywhere, so with the 2B decode as the only decode anchor the 4B token time
    is the 2B's measured time x the ratio of the bytes each step moves."""
    held = A.hold_out()
    assert held["held_out"] == A.DEFAULT_HOLDOUT == "Qwen3-VL-4B/decode"
    assert held["fit"].anchors["decode"] == ("Qwen3-VL-2B/decode",)
    past = A.PROMPT_TOKENS + A.ANCHOR_OUTPUT_TOKENS // 2
    b2 = _decode_bytes(28, 2048, 2048, 1024, 6144, past, False, INT4_BPP, 151936, 2.0)
    b4 = _decode_bytes(36, 2560, 4096, 1024, 9728, past, False, INT4_BPP, 151936, 2.0)
    expect = (1e3 / 98.9) * b4 / b2
    assert held["predicted_ms"] == pytest.approx(expect, rel=1e-9)
    assert held["measured_ms"] == pytest.approx(1e3 / 54.7, rel=1e-12)
    assert held["error"] == pytest.approx(expect / (1e3 / 54.7) - 1, rel=1e-9)
    assert abs(held["error"]) < 0.15  # the anchored decode transfers across model size
    loo = A.leave_one_out()
    assert [r["held_out"] for r in loo] == [a.key for a in A.ANCHORS]
    assert [r["borrowed"] for r in loo] == ["prefill", None, None, None, None]  # vision has one anchor
    for r in loo:
        assert r["error"] == pytest.approx(r["predicted_ms"] / r["measured_ms"] - 1, rel=1e-12)
        assert r["held_out"] not in r["fit"].in_sample


def test_nora_long_decode_call_matches_an_independent_float64_recomputation():
    """One prediction by hand: the AGX Orin 64GB NORA-Long int4 decoder call = the 2B anchor's measured token
    time x NORA's step bytes / the 2B step bytes (same bandwidth, same fitted factor)."""
    t = NORA_3B_CONFIG["text_config"]
    n = 21
    past = 21 + 10 + 64 + (n - 1) // 2  # template + instruction + image tokens, mean of the decode steps
    nora = _decode_bytes(
        36, t["hidden_size"], 2048, 256, t["intermediate_size"], past, True, INT4_BPP, 2048, INT4_BPP
    )
    anchor_past = A.PROMPT_TOKENS + A.ANCHOR_OUTPUT_TOKENS // 2
    b2 = _decode_bytes(28, 2048, 2048, 1024, 6144, anchor_past, False, INT4_BPP, 151936, 2.0)
    got = P.predict_chunk("orin-agx-64gb", n)
    assert got["call_ms"] == pytest.approx((1e3 / 98.9) * nora / b2, rel=1e-9)
    # the chunk adds up, and 5 actions per chunk
    parts = got["vision_ms"] + got["prefill_ms"] + got["first_head_ms"] + (n - 1) * got["call_ms"]
    assert got["chunk_ms"] == pytest.approx(parts, rel=1e-12)
    assert got["actions_per_s"] == pytest.approx(5e3 / got["chunk_ms"], rel=1e-12)


@pytest.mark.parametrize("profile", P.ORIN_PROFILES)
def test_plain_path_is_predict_inference_at_equal_factors(profile):
    """With every phase at the same factor the plain chunk is the roofline's own end-to-end accounting."""
    eff = dict.fromkeys(A.PHASES, 0.5)
    got = P.predict_chunk(profile, 21, efficiency=eff)
    prof = A.with_phase_efficiency(load_profile(profile), 0.5, "test")
    ref = predict_inference(P.nora_long_spec(21), PrecisionPlan.preset("int4"), prof)
    assert got["chunk_ms"] == pytest.approx(ref["e2e_ms"], rel=1e-12)
    assert got["actions_per_s"] == pytest.approx(ref["actions_per_s"], rel=1e-12)


def test_multi_token_divides_the_calls_by_the_acceptance():
    plain = P.predict_chunk("orin-agx-64gb", 24)
    block1 = P.predict_chunk("orin-agx-64gb", 24, 1.0, 1)
    assert block1 == plain
    rows = [P.predict_chunk("orin-agx-64gb", 24, a, 4) for a in (1.0, 1.5, 2.0, 4.0)]
    for r in rows:
        assert r["calls"] == pytest.approx(23 / r["acceptance"], rel=1e-12)
        assert r["decode_ms"] == pytest.approx(r["calls"] * r["call_ms"], rel=1e-12)
        assert r["call_ms"] >= plain["call_ms"]  # 4 rows per call cost at least one
        assert r["call_ms"] < 1.1 * plain["call_ms"]  # ... and little more: weight streaming dominates
    speeds = [r["actions_per_s"] for r in rows]
    assert speeds == sorted(speeds) and rows[0]["actions_per_s"] < plain["actions_per_s"]


def test_section_uses_the_measured_token_distribution_and_lists_assumptions():
    tokens = {"median": 26.0, "p90": 31.0, "n": 40}
    sec = P.orin_section(tokens, 5, acceptances=(1.5, 2.0), block=4)
    assert sec["tokens_per_chunk"]["median"] == 26.0 and sec["tokens_per_chunk"]["source"].startswith(
        "measured"
    )
    rows = sec["rows"]
    assert len(rows) == len(P.ORIN_PROFILES) * 2 * 3
    for prof in P.ORIN_PROFILES:
        med = [r for r in rows if r["profile"] == prof and r["stat"] == "median"]
        p90 = [r for r in rows if r["profile"] == prof and r["stat"] == "p90"]
        assert [r["tokens_per_chunk"] for r in med + p90] == [26.0] * 3 + [31.0] * 3
        assert all(b["chunk_ms"] > a["chunk_ms"] for a, b in zip(med, p90, strict=True))
    head = sec["headline"]
    agx = {r["acceptance"]: r for r in rows if r["profile"] == "orin-agx-64gb" and r["stat"] == "median"}
    assert head["actions_per_s"] == {"plain": agx[1.0]["actions_per_s"], "1.5": agx[1.5]["actions_per_s"],
                                     "2": agx[2.0]["actions_per_s"]}  # fmt: skip
    need = head["acceptance_for_target"]
    assert P.predict_chunk("orin-agx-64gb", 26.0, need, 4)["actions_per_s"] == pytest.approx(25.0, rel=1e-9)
    assert head["held_out_error"] == sec["held_out"]["error"] == A.hold_out()["error"]
    text = "\n".join(P.orin_markdown(sec))
    assert f"prediction error {100 * head['held_out_error']:+.1f}%" in text
    assert text.count("| orin-") == len(rows) and "[assumed acceptance] are assumptions" in text
    assert any("is an INPUT, not a measurement" in a for a in sec["assumptions"])
    rec = {"acceptance": 1.8, "block": 7, "source": "multitoken_bench run X", "tokens_histogram": {"3": 2}}
    meas = P.orin_section(tokens, 5, acceptances=(), block=4, measured_acceptance=rec)
    row = [r for r in meas["rows"] if r["profile"] == "orin-agx-64gb" and r["stat"] == "median"][-1]
    assert row["mode"] == "multi-token [measured acceptance]" and row["acceptance"] == 1.8
    assert row["block"] == 7  # the measurement's own verify block, not the assumed rows'
    assert meas["headline"]["actions_per_s"]["1.8 (measured)"] == row["actions_per_s"]
    assert meas["assumptions"][-1].startswith("Measured acceptance 1.800 at block 7: multitoken_bench run X")
    assert "Tokens per chunk there (count of chunks): 3: 2" in "\n".join(P.orin_markdown(meas))
    with pytest.raises(InputError, match="measured_acceptance needs a source string"):
        P.orin_section(tokens, 5, measured_acceptance={**rec, "source": ""})
    with pytest.raises(InputError, match="exceeds block"):
        P.orin_section(tokens, 5, measured_acceptance={**rec, "acceptance": 8.0})
    other = P.orin_section({"median": 8.0, "p90": 9.0, "n": 3}, 1)  # a horizon-1 bundle's tokens do not count
    assert other["tokens_per_chunk"]["median"] == 21.0 and "horizon 1" in other["tokens_per_chunk"]["source"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"acceptance": -1.0, "block": 4}, r"acceptance = -1.0 .* below 1"),
        ({"acceptance": 0.5, "block": 4}, r"acceptance = 0.5"),
        ({"acceptance": 5.0, "block": 4}, r"acceptance = 5.0 exceeds block = 4"),
        ({"acceptance": 2.0, "block": 1}, r"acceptance = 2.0 exceeds block = 1"),
        ({"acceptance": float("nan"), "block": 4}, r"acceptance must be a finite number, got nan"),
        ({"acceptance": 1.0, "block": 0}, r"block .* got 0"),
        ({"tokens_per_chunk": 0}, r"tokens_per_chunk must be >= 1 .* got 0"),
        ({"profile_name": "orin-agx-128gb"}, r"profile 'orin-agx-128gb' has no anchored prediction"),
        ({"profile_name": "host"}, r"profile 'host' has no anchored prediction"),
    ],
)
def test_bad_inputs_raise_typed_errors_naming_the_value(kwargs, match):
    args = {"profile_name": "orin-agx-64gb", **kwargs}
    with pytest.raises(InputError, match=match):
        P.predict_chunk(**args)


def test_bad_anchor_inputs_are_refused():
    with pytest.raises(InputError, match="unknown anchor 'Qwen3-VL-8B/decode'"):
        A.hold_out("Qwen3-VL-8B/decode")
    with pytest.raises(InputError, match="unknown anchor model 'Qwen3-VL-8B'"):
        A.qwen3_vl_spec("Qwen3-VL-8B")
    with pytest.raises(InputError, match="no anchor left to fit the 'decode' factor"):
        A.fit_efficiency(("Qwen3-VL-2B/decode", "Qwen3-VL-4B/decode"))
    with pytest.raises(InputError, match="efficiency must be a positive finite number, got -0.5"):
        A.with_phase_efficiency(load_profile("orin-agx-64gb"), -0.5, "test")
    with pytest.raises(InputError, match=r"acceptance = 3.0 exceeds block = 2"):
        P.orin_section(acceptances=(3.0,), block=2)


def test_profile_calibration_uses_the_same_published_figures():
    """``calibrate`` (the profiles' two global factors) and the anchors read the same Edge-LLM 0.10 rows."""
    from nora_edge.bench import calibrate

    assert calibrate.EDGE_LLM_VISION_MS == A.anchor("Qwen3-VL-2B/vision").measured_ms
    assert calibrate.EDGE_LLM_PREFILL_MS == A.anchor("Qwen3-VL-2B/prefill").measured_ms
    assert 1e3 / calibrate.EDGE_LLM_DECODE_TOK_S == A.anchor("Qwen3-VL-2B/decode").measured_ms
