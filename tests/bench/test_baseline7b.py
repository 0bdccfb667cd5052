"""The 7B baseline report: headline numbers follow from the prediction rows, every profile and assumption is
listed, and the one-layer extrapolation runs on a scaled-down spec (real sizes are for ``make bench-real``)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nora_edge.bench import baseline7b
from nora_edge.bench.models import LmDims, nora_3b, openvla_7b
from nora_edge.bench.report import baseline_markdown
from nora_edge.profiles import list_profiles


@pytest.fixture(scope="module")
def result():
    return baseline7b.run_baseline(None, measure=False)


def test_headline_follows_from_the_rows(result):
    h = result["headline"]
    rows = {(r["profile"], r["model"], r["plan"]): r for r in result["predictions"]}
    nora = rows[("orin-agx-64gb", "NORA-Long-3B", "int4")]
    ovla = rows[("orin-agx-64gb", "OpenVLA-7B", "int4")]
    assert h["nora_long_int4_actions_per_s"] == pytest.approx(5e3 / nora["e2e_ms"])
    assert h["openvla_int4_actions_per_s"] == pytest.approx(1e3 / ovla["e2e_ms"])
    assert h["memory_ratio_openvla_over_nora"] == pytest.approx(ovla["memory_gb"] / nora["memory_gb"])
    assert h["nora_long_meets_25hz"] == (nora["e2e_ms"] <= 200.0)
    # a 7B model streams more weights per token than a 3B one on the same device
    assert ovla["stages"]["decode_token"] > nora["stages"]["decode_token"]
    assert h["memory_ratio_openvla_over_nora"] > 1


def test_every_profile_model_and_plan_is_predicted(result):
    seen = {(r["profile"], r["model"], r["plan"]) for r in result["predictions"]}
    for prof in list_profiles():
        plans = baseline7b.HOST_PLANS if prof == "host" else baseline7b.DEVICE_PLANS
        for model in ("NORA-Long-3B", "NORA-3B", "OpenVLA-7B"):
            for plan in plans:
                assert (prof, model, plan) in seen


def test_markdown_lists_headline_assumptions_and_sources(result):
    md = baseline_markdown(result)
    assert "## Headline (orin-agx-64gb" in md and "25 Hz" in md
    for a in result["assumptions"]:
        assert a in md
    for prof in list_profiles():
        assert f"### {prof}" in md
    assert "held out" in md  # the OpenVLA-7B check of the calibration


def test_extrapolation_runs_one_layer_of_each_kind():
    small = nora_3b(5)
    tower = replace(small.vision[0], hidden=64, intermediate=128, heads=4)
    lm = LmDims(3, 128, 256, 4, 2, 32, 600, tied=True, qkv_bias=True, head_rows=300)
    spec = replace(small, vision=(tower,), lm=lm, vision_linears=())
    res = baseline7b.measure_extrapolated(spec, "int4", threads=1, reps=1)
    assert res["label"] == baseline7b.EXTRAPOLATED
    assert set(res["layers"]) == {
        "qwen2.5-vl-vit.block(window=64)",
        "qwen2.5-vl-vit.block(window=full)",
        "vision extras (patch embeds, merger/projector)",
        "decoder layer (prefill)",
        "decoder layer (decode)",
        "output head",
    }
    layer = res["layers"]
    assert res["stages"]["prefill"] == pytest.approx(3 * layer["decoder layer (prefill)"])
    assert res["stages"]["vision"] == pytest.approx(
        28 * layer["qwen2.5-vl-vit.block(window=64)"]
        + 4 * layer["qwen2.5-vl-vit.block(window=full)"]
        + layer["vision extras (patch embeds, merger/projector)"]
    )


def test_openvla_is_one_action_per_inference_and_nora_long_five():
    assert openvla_7b().actions_per_inference == 1
    assert nora_3b(5).actions_per_inference == 5
