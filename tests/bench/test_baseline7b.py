"""The 7B baseline report: headline numbers follow from the prediction rows, every profile and assumption is
listed, and the one-layer extrapolation runs on a scaled-down spec (real sizes are for ``make bench-real``)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nora_edge.bench import baseline7b
from nora_edge.bench.models import LmDims, nora_3b, openvla_7b
from nora_edge.bench.report import baseline_markdown
from nora_edge.errors import InputError
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


def _small(spec):
    """``spec`` with every layer shrunk (the real sizes take minutes and GBs: ``make bench-real``)."""
    towers = tuple(replace(t, hidden=64, intermediate=128, heads=4) for t in spec.vision)
    lm = LmDims(2, 128, 256, 4, 2, 32, 600, tied=False, qkv_bias=False, head_rows=300)
    return replace(spec, vision=towers, lm=lm, vision_linears=())


@pytest.fixture(scope="module")
def host_measurement():
    from nora_edge.bench.microbench import measure_host

    return measure_host(1, reps=2)


def test_bench_section_has_openvla_on_every_profile_and_the_host_measurement(host_measurement, tmp_path):
    from nora_edge.bench.microbench import host_profile
    from nora_edge.bench.report import write_json_atomic

    measured = [
        baseline7b.host_comparison(_small(openvla_7b()), "int4", host_measurement, reps=1),
        baseline7b.host_comparison(
            _small(nora_3b(5)), "int4", host_measurement, reps=1
        ),  # not OpenVLA: skipped
    ]
    path = write_json_atomic(tmp_path / "baseline7b.json", {"host_comparison": measured})
    host = host_profile(host_measurement)
    sec = baseline7b.bench_section(host, path, {"host": 100.0})
    assert [r["profile"] for r in sec["rows"]] == list_profiles() and len(sec["rows"]) == 5
    rows = {r["profile"]: r for r in sec["rows"]}
    assert rows["host"]["host_measured"] == {
        "int4": {
            "e2e_ms": measured[0]["measured"]["e2e_ms"],
            "predicted_e2e_ms": measured[0]["predicted"]["e2e_ms"],
            "label": baseline7b.EXTRAPOLATED,
        }
    }
    assert all(r["host_measured"] is None for name, r in rows.items() if name != "host")
    # the rows are the baseline report's own predictions for OpenVLA-7B (same profiles, same plans)
    full = baseline7b.prediction_rows([openvla_7b()], [host, *baseline7b.device_profiles()], ("int4",))
    for p in full:
        assert rows[p["profile"]]["plans"]["int4"]["e2e_ms"] == pytest.approx(p["e2e_ms"], rel=1e-12)
    int4 = rows["host"]["plans"]["int4"]["actions_per_s"]
    assert rows["host"]["bundle_over_openvla_int4"] == pytest.approx(100.0 / int4)
    assert sec["measured_from"] == str(path)


def test_bench_section_refuses_a_file_that_is_not_a_baseline7b_result(host_measurement, tmp_path):
    from nora_edge.bench.microbench import host_profile

    bad = tmp_path / "b.json"
    bad.write_text('{"predictions": []}')
    with pytest.raises(InputError, match="field 'host_comparison' must be a list"):
        baseline7b.bench_section(host_profile(host_measurement), bad)
    bad.write_text('{"host_comparison": [{"model": "OpenVLA-7B", "precision": "int4"}]}')
    with pytest.raises(InputError, match=r"host_comparison\[0\] lacks"):
        baseline7b.bench_section(host_profile(host_measurement), bad)
