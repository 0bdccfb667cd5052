"""Device profiles: every shipped number has a source, estimates are marked, and the figures agree with the
arithmetic and the NVIDIA documents they come from (Jetson AGX Orin Series Technical Brief and data sheet, Orin NX
data sheet, Orin Nano Super Developer Kit data sheet: see each TOML's sources), recomputed here in float64."""

from __future__ import annotations

import tomllib

import pytest

from nora_edge.errors import InputError
from nora_edge.profiles import (
    PRECISIONS,
    PROFILE_DIR,
    ProfileError,
    list_profiles,
    load_profile,
    parse_profile,
)

ORIN = ["orin-agx-32gb", "orin-agx-64gb", "orin-nano-8gb", "orin-nx-16gb"]
# NVIDIA's Jetson module data (SMs = CUDA cores / 128, max GPU MHz, GB/s, capacity GB) and the dense tensor
# estimates derived from the AGX Orin Technical Brief (GPU 170 sparse INT8 TOPS on 16 SMs at 1.3 GHz):
# (SMs, MHz, GB/s, INT8 TOPS, FP16 TFLOPS, capacity GB)
TABLE = {
    "orin-agx-64gb": (16, 1300, 204.8, 85, 43, 64),
    "orin-agx-32gb": (14, 930, 204.8, 53, 27, 32),
    "orin-nx-16gb": (8, 918, 102.4, 30, 15, 16),
    "orin-nano-8gb": (8, 1020, 102, 33, 17, 8),
}


def test_shipped_profiles_are_listed():
    assert list_profiles() == sorted([*ORIN, "host"])


@pytest.mark.parametrize("name", ORIN)
def test_orin_profile_matches_the_module_table(name):
    p = load_profile(name)
    sms, mhz, bw, int8, fp16, cap = TABLE[name]
    assert p.gpu["sms"].value == sms
    assert p.gpu["clock_mhz"].value == mhz
    assert p.memory["bandwidth_gbs"].value == bw
    assert p.memory["capacity_gb"].value == cap
    assert p.peak_tflops["int8"].value == int8
    assert p.peak_tflops["fp16"].value == fp16
    # FP32 on CUDA cores: SMs x 128 lanes x 2 FLOP/FMA x clock
    assert p.peak_tflops["fp32"].value == pytest.approx(sms * 128 * 2 * mhz * 1e6 / 1e12, rel=1e-3)
    # INT4 weight-only runs on FP16 math
    assert p.peak_tflops["int4"].value == p.peak_tflops["fp16"].value
    # the dense FP16 tensor figure is the same per-SM-per-clock rate on every Orin (~2048 FLOP/clk/SM)
    per_sm_clock = fp16 * 1e12 / (sms * mhz * 1e6)
    assert 1900 < per_sm_clock < 2200


@pytest.mark.parametrize("name", ORIN)
def test_every_number_has_a_source_and_estimates_are_marked(name):
    raw = tomllib.loads((PROFILE_DIR / f"{name}.toml").read_text())
    p = load_profile(name)
    rows = p.sources()
    assert len(rows) == 10
    for field, value, source, estimate in rows:
        assert value > 0 and source, field
        section, key = field.split(".")
        assert raw[section][key]["source"] == source
        if "[est]" in source or "calibrated" in source or "carried over" in source:
            assert estimate, f"{field} reads like an estimate but is not marked"
    assert all(p.peak_tflops[k].estimate for k in PRECISIONS)
    assert all(q.estimate for q in p.efficiency.values())
    # published figures name the NVIDIA document they come from; estimates show their arithmetic or calibration
    published = [(f, s) for f, _, s, est in rows if not est]
    assert len(published) == 4  # capacity, bandwidth, SMs, clock
    for field, source in published:
        assert "NVIDIA Jetson" in source and ("data sheet" in source or "Technical Brief" in source), field
    assert all("TensorRT Edge-LLM" in q.source for q in p.efficiency.values())


def test_dense_tensor_estimates_follow_from_the_technical_brief():
    """AGX Orin 64GB GPU: 170 sparse INT8 TOPS (2:4 sparsity doubles the dense rate) on 16 SMs at 1.3 GHz gives
    the dense INT8 op/clk/SM the other Orin profiles scale by SMs x clock (FP16 at half the INT8 rate)."""
    per_sm_clock_int8 = 170e12 / 2 / (16 * 1.3e9)  # ~4087 op/clk/SM
    assert 4000 < per_sm_clock_int8 < 4200
    for name in ORIN:
        sms, mhz, _, int8, fp16, _ = TABLE[name]
        dense = sms * 4096 * mhz * 1e6 / 1e12
        assert abs(int8 - dense) <= 0.5, (name, int8, dense)
        assert abs(fp16 - dense / 2) <= 0.5, (name, fp16, dense / 2)


def test_unknown_profile_names_the_choices():
    with pytest.raises(InputError, match="unknown device profile 'orin-agx-128gb'.*orin-agx-64gb"):
        load_profile("orin-agx-128gb")


def _valid() -> dict:
    return tomllib.loads((PROFILE_DIR / "orin-nx-16gb.toml").read_text())


def test_missing_source_is_refused():
    data = _valid()
    del data["memory"]["bandwidth_gbs"]["source"]
    with pytest.raises(ProfileError, match=r"x.toml: field 'memory.bandwidth_gbs' has no 'source'"):
        parse_profile(data, "x.toml")


@pytest.mark.parametrize("value", [0, -3, "fast", True])
def test_impossible_values_are_refused(value):
    data = _valid()
    data["peak_tflops"]["int8"]["value"] = value
    with pytest.raises(ProfileError, match="peak_tflops.int8.value"):
        parse_profile(data, "x.toml")


def test_efficiency_above_one_is_refused():
    data = _valid()
    data["efficiency"]["memory"]["value"] = 1.5
    with pytest.raises(ProfileError, match=r"efficiency.memory = 1.5 must be in \(0, 1\]"):
        parse_profile(data, "x.toml")


def test_missing_table_is_refused():
    data = _valid()
    del data["peak_tflops"]
    with pytest.raises(ProfileError, match=r"missing table \[peak_tflops\]"):
        parse_profile(data, "x.toml")


def test_unknown_precision_is_an_input_error():
    with pytest.raises(InputError, match="unknown precision 'fp8'"):
        load_profile("orin-agx-64gb").peak_flops_per_s("fp8")


def test_gemv_rates_apply_to_one_row_products_only():
    data = _valid()
    data["gemv_tflops"] = {"int4": {"value": 0.5, "source": "a measured GEMV"}}
    prof = parse_profile(data, "x.toml")
    peak = prof.peak_flops_per_s("int4")
    assert peak != 0.5e12
    assert prof.rate_flops_per_s("int4", rows=1) == 0.5e12
    assert prof.rate_flops_per_s("int4", rows=8) == peak and prof.rate_flops_per_s("int4") == peak
    assert prof.rate_flops_per_s("int8", rows=1) == prof.peak_flops_per_s("int8")  # no GEMV rate given
    assert ("gemv_tflops.int4", 0.5, "a measured GEMV", False) in prof.sources()
    data["gemv_tflops"] = {"int3": {"value": 0.5, "source": "?"}}
    with pytest.raises(ProfileError, match=r"\[gemv_tflops\] keys \['int3'\]"):
        parse_profile(data, "x.toml")


def test_host_profile_measures_quantized_gemv_rates():
    host = load_profile("host")
    assert set(host.gemv_tflops) == {"int8", "int4"}
    for p, q in host.gemv_tflops.items():
        assert q.value > 0 and "GEMV 1x8192x" in q.source, (p, q)
