"""Calibrate the Orin efficiency factors against measured AGX Orin runs, and check them on held-out ones.

Data flow: the AGX Orin 64GB profile with its raw peaks (efficiency set to 1) + the analytic Qwen3-VL-2B spec ->
fit ``eff_compute`` to NVIDIA's TensorRT Edge-LLM 0.10 vision (36.2 ms) + prefill (45.7 ms) and ``eff_memory`` to its
INT4 decode rate (98.9 tok/s) by fixed-point iteration -> check the fitted profile on OpenVLA-7B (MLC INT4 336 ms per
action, FP16 840 ms), which played no part in the fit. The numbers stored in ``profiles/orin-*.toml`` are the
rounded output of :func:`calibrate_efficiency`; a test keeps the two in step. (``orin_anchors`` fits one factor per
phase on the same page's Qwen3-VL-2B and 4B rows, with one of them held out.)
"""

from __future__ import annotations

from dataclasses import replace

from nora_edge.bench.models import openvla_7b, qwen3_vl_2b_reference
from nora_edge.bench.roofline import PrecisionPlan, analytic_stage_costs, predict_inference, predict_stage_ms
from nora_edge.profiles import DeviceProfile, Quantity, load_profile

CALIBRATION_PROFILE = "orin-agx-64gb"
# Measured on Jetson AGX Orin 64GB, batch 1: NVIDIA's TensorRT Edge-LLM 0.10.0 performance-benchmarks page
# (nvidia.github.io/TensorRT-Edge-LLM/0.10.0/user_guide/performance/performance-benchmarks.html; JetPack 7.2,
# TensorRT 10.16), Qwen3-VL-2B INT4 AWQ + FP16 activations (the same figures as orin_anchors.ANCHORS).
EDGE_LLM_VISION_MS = 36.2  # vision encoder, 265 image tokens
EDGE_LLM_PREFILL_MS = 45.7  # 292 tokens
EDGE_LLM_DECODE_TOK_S = 98.9
# Jetson AI Lab OpenVLA tutorial (github.com/NVIDIA-AI-IOT/jetson-generative-ai-playground, docs/openvla.md):
# OpenVLA-7B on BridgeData V2, AGX Orin 64GB, JetPack 6.0: INT4 (MLC q4f16_ft) 336 ms, FP16 (HF) 840 ms
# per action.
OPENVLA_INT4_MS = 336.0
OPENVLA_FP16_MS = 840.0

# Edge-LLM keeps the vision tower and the (tied, 151936-row) lm_head in FP16; only decoder linears are INT4 [assumed].
EDGE_LLM_PLAN = PrecisionPlan("int4 (Edge-LLM)", vision="fp16", lm="int4", head="fp16", embed="fp16")


def with_efficiency(profile: DeviceProfile, compute: float, memory: float, source: str) -> DeviceProfile:
    """Copy of ``profile`` with new efficiency factors (marked as estimates)."""
    eff = {"compute": Quantity(compute, source, True), "memory": Quantity(memory, source, True)}
    return replace(profile, efficiency=eff)


def reference_fit(profile: DeviceProfile) -> dict[str, float]:
    """Predicted (vision, prefill, decode per token) ms of the Edge-LLM Qwen3-VL-2B run on ``profile``."""
    costs = analytic_stage_costs(qwen3_vl_2b_reference(), EDGE_LLM_PLAN)
    per = {s: predict_stage_ms(c, profile)["ms"] for s, c in costs.items()}
    return {
        "vision": per["vision"],
        "prefill": per["prefill"],
        "decode": per["decode_token"] + per["action_head"],
    }


def calibrate_efficiency(iterations: int = 50) -> dict:
    """Fit (eff_compute, eff_memory) on the AGX Orin 64GB profile.

    Returns:
        {"compute", "memory": fitted factors, "fit": {stage: (predicted_ms, measured_ms)},
        "holdout": {name: (predicted_ms, measured_ms)}}.
    """
    base = load_profile(CALIBRATION_PROFILE)
    eff_c = eff_m = 1.0
    measured = {
        "vision": EDGE_LLM_VISION_MS,
        "prefill": EDGE_LLM_PREFILL_MS,
        "decode": 1e3 / EDGE_LLM_DECODE_TOK_S,
    }
    for _ in range(iterations):
        prof = with_efficiency(base, eff_c, eff_m, "calibration in progress")
        pred = reference_fit(prof)
        eff_c = min(
            1.0, eff_c * (pred["vision"] + pred["prefill"]) / (measured["vision"] + measured["prefill"])
        )
        eff_m = min(1.0, eff_m * pred["decode"] / measured["decode"])
    fitted = with_efficiency(base, eff_c, eff_m, "calibrate_efficiency()")
    pred = reference_fit(fitted)
    return {
        "compute": eff_c,
        "memory": eff_m,
        "fit": {k: (pred[k], measured[k]) for k in measured},
        "holdout": holdout_check(fitted),
    }


def holdout_check(profile: DeviceProfile) -> dict[str, tuple[float, float]]:
    """OpenVLA-7B predicted vs measured ms per action on ``profile`` (MLC q4f16: head INT4, vision FP16)."""
    spec = openvla_7b()
    int4 = predict_inference(spec, PrecisionPlan.preset("int4"), profile)["e2e_ms"]
    fp16 = predict_inference(spec, PrecisionPlan.preset("fp16"), profile)["e2e_ms"]
    return {"openvla_7b_int4": (int4, OPENVLA_INT4_MS), "openvla_7b_fp16": (fp16, OPENVLA_FP16_MS)}


if __name__ == "__main__":  # pragma: no cover - a person runs this when a reference changes
    result = calibrate_efficiency()
    print(f"eff_compute = {result['compute']:.3f}, eff_memory = {result['memory']:.3f}")
    for name, (p, m) in {**result["fit"], **result["holdout"]}.items():
        print(f"  {name:18s} predicted {p:7.1f} ms  measured {m:7.1f} ms  ({100 * (p / m - 1):+.0f}%)")
