"""Quantized bundles carry their own validation: fidelity vs the fp32 source, gated by the recipe's thresholds.

The bundle tests reuse the session's validated fp32 ``tiny_bundle`` (random weights: its fp32 export carries
graph-check validation numbers such as ``decoder_prefill``, which a quantized bundle must not repeat). A planted
over-tight threshold fails on any weights; the built-in int4 recipe fails on these random weights (measured:
decoder logits cosine ~0.95 against a 0.99 limit), which is what the CLI and export tests rely on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest

from nora_edge.bundle import Bundle, format_info
from nora_edge.errors import ExportError, InputError
from nora_edge.export.fidelity import REPORT_JSON, REPORT_MD
from nora_edge.export.quantize import (
    GATE_METRICS,
    FidelityGateError,
    FidelityThresholds,
    check_fidelity,
    get_recipe,
    quantize_bundle,
)
from nora_edge.export.quantize.recipes import BundleRecipe
from nora_edge.export.quantize.thresholds import gate_message, validation_section

PLANTED_FAILS = ["vision.image_embeds_cosine_min", "decoder.decoder_logits_cosine_mean"]


def planted_recipe() -> BundleRecipe:
    """int8 with two thresholds no quantized graph can meet (cosine exactly 1) and nothing else gated."""
    off = {f.name: None for f in dataclasses.fields(FidelityThresholds)}
    tight = FidelityThresholds(**{**off, "image_embeds_cosine_min": 1.0, "decoder_logits_cosine_mean": 1.0})
    return dataclasses.replace(get_recipe("int8"), name="int8-planted", fidelity=tight)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- thresholds and the check (no bundle) --------------------------------------------------------------
@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(FidelityThresholds)])
@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan, True, "0.9"])
def test_threshold_validation_names_field_and_value(field, bad):
    with pytest.raises(
        InputError, match=rf"FidelityThresholds\.{field} = {bad!r}: must be a number in \[0, 1\]"
    ):
        FidelityThresholds(**{field: bad})


def test_recipe_fidelity_field_is_checked_and_described():
    with pytest.raises(InputError, match=r"BundleRecipe\('x'\)\.fidelity = 0\.9: not a FidelityThresholds"):
        BundleRecipe("x", "x", fidelity=0.9)
    for r in (get_recipe(n) for n in ("fp32", "fp16", "int8", "int8-qdq", "int4", "int4-hqq", "mixed")):
        assert r.describe()["fidelity"] == dataclasses.asdict(r.fidelity)
        assert all(getattr(r.fidelity, m) is not None for m in GATE_METRICS)  # built-ins gate every metric
    assert get_recipe("fp32").fidelity.decoder_token_agreement_mean == 1.0  # fp32 copies the graphs: exact
    assert (
        get_recipe("int8").fidelity.decoder_logits_cosine_mean
        > get_recipe("int4").fidelity.decoder_logits_cosine_mean
    )


def test_check_directions_components_and_unmeasured_values():
    th = FidelityThresholds(gripper_flip_rate=None)
    agg = {
        "image_embeds_cosine_min": 0.98,  # below 0.99: fails (>=)
        "decoder_logits_cosine_mean": 0.99,  # equal to the limit: passes
        "decoder_token_agreement_mean": None,  # not measured: fails
        "action_err_frac_mean": 0.1,  # equal: passes (<=)
        "gripper_flip_rate": 0.9,  # not gated
        "malformed_rate_increase": 0.125,  # above 0: fails
        "repaired_rate_increase": -0.125,
        "forced_continue_rate_increase": 0.25,
    }
    checks = check_fidelity(th, agg)
    assert [c.metric for c in checks] == list(GATE_METRICS) and len(checks) == 8
    assert {c.metric: c.component for c in checks} == {k: m.component for k, m in GATE_METRICS.items()}
    assert [c.name for c in checks if c.passed is False] == [
        "vision.image_embeds_cosine_min",
        "decoder.decoder_token_agreement_mean",
        "end_to_end.malformed_rate_increase",
    ]
    assert [c.metric for c in checks if c.passed is None] == ["gripper_flip_rate"]
    failed = [c for c in checks if c.passed is False]
    msg = gate_message("out/q", "int4", "fp32", 8, failed)
    assert "vision metric image_embeds_cosine_min = 0.98 (must be >= 0.99)" in msg
    assert "decoder metric decoder_token_agreement_mean = not measured (must be >= 0.6)" in msg
    assert "end_to_end metric malformed_rate_increase = 0.125 (must be <= 0)" in msg
    v = validation_section(
        checks, {"n": 8, "n_action_compared": 7}, recipe="int4", source={}, accepted=True, report=None
    )
    assert v["status"] == "failed (accepted)" and v["accepted_despite_failure"] and not v["passed"]
    assert v["failed_metrics"] == [c.name for c in failed] and v["samples"] == 8


# --- on a real fp32 bundle ------------------------------------------------------------------------------
def test_planted_over_tight_threshold_fails_and_leaves_nothing(tiny_bundle, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(FidelityGateError) as info:
        quantize_bundle(tiny_bundle, out, planted_recipe(), n_calibration=2, n_fidelity=3)
    e = info.value
    assert isinstance(e, ExportError)
    assert [c.name for c in e.failures] == PLANTED_FAILS
    for c in e.failures:  # the message names metric, component and the measured value
        assert f"{c.component} metric {c.metric} = {c.value:.6g} (must be >= 1)" in str(e)
        assert c.value == e.report["aggregates"][c.metric] < 1.0
    assert "--accept-degraded" in str(e) and e.validation["status"] == "failed"
    assert list(tmp_path.iterdir()) == []  # no bundle at out, no temporary directory beside it


def test_failed_gate_keeps_an_existing_bundle_at_out(tiny_bundle, tmp_path):
    import shutil

    out = shutil.copytree(tiny_bundle, tmp_path / "q")
    before = sha256(out / "manifest.json")
    with pytest.raises(FidelityGateError):
        quantize_bundle(tiny_bundle, out, planted_recipe(), n_calibration=1, n_fidelity=1, overwrite=True)
    assert sha256(out / "manifest.json") == before and sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    Bundle.load(out)


def test_accept_degraded_writes_and_records_the_failure(tiny_bundle, tmp_path):
    with pytest.warns(UserWarning, match="accepted despite failure"):
        out = quantize_bundle(
            tiny_bundle, tmp_path / "q", planted_recipe(), n_calibration=2, n_fidelity=3, accept_degraded=True
        )
    b = Bundle.load(out)
    v = b.manifest["validation"]
    assert (
        v["status"] == "failed (accepted)" and v["accepted_despite_failure"] is True and v["passed"] is False
    )
    assert v["failed_metrics"] == PLANTED_FAILS and v["samples"] == 3 and v["recipe"] == "int8-planted"
    ref = {
        "bundle": tiny_bundle.name,
        "manifest_sha256": sha256(tiny_bundle / "manifest.json"),
        "precision": "fp32",
    }
    assert v["reference"] == ref
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["validation"] == v
    gated = [m for m in v["metrics"] if m["threshold"] is not None]
    assert [m["component"] + "." + m["metric"] for m in gated] == PLANTED_FAILS
    assert all(m["value"] == report["aggregates"][m["metric"]] for m in v["metrics"])
    text = format_info(b.info())
    assert "validation     FAILED (ACCEPTED)" in text
    assert f"accepted despite failure: yes (failed: {', '.join(PLANTED_FAILS)})" in text
    assert "| vision | image_embeds_cosine_min |" in (out / REPORT_MD).read_text()


def test_int4_info_shows_its_own_fidelity_not_the_fp32_export(tiny_bundle, tmp_path):
    src_validation = Bundle.load(tiny_bundle).manifest["validation"]
    fp32_stages = [k for k, r in src_validation.items() if isinstance(r, dict) and "passed" in r]
    assert fp32_stages, "the source must carry fp32 validation numbers for this test to mean anything"
    with pytest.warns(UserWarning, match="accepted despite failure"):  # random weights miss int4's limits
        out = quantize_bundle(tiny_bundle, tmp_path / "int4", "int4", accept_degraded=True)
    info = Bundle.load(out).info()
    v = info["validation"]
    assert v["kind"] == "quantized-fidelity" and v["recipe"] == "int4"
    assert not set(fp32_stages) & set(v), "fp32 export validation copied into the quantized bundle"
    text = format_info(info)
    assert not [s for s in fp32_stages if f"validation     {s}:" in text]
    assert "decoder_prefill" not in json.dumps(v) and "decoder_prefill" not in text
    report = json.loads((out / REPORT_JSON).read_text())
    agg = report["aggregates"]
    assert len(v["metrics"]) == len(GATE_METRICS) == 8
    for m in v["metrics"]:
        assert m["value"] == agg[m["metric"]]
        verdict = "pass" if m["passed"] else "FAIL"
        line = f"{m['component']:<11} {m['metric']:<30} {m['value']:>12.6g}  {m['op'] + ' ' + format(m['threshold'], 'g'):<10} {verdict}"
        assert line in text, line
    assert {k: v["reported"][k] for k in v["reported"]} == {k: agg[k] for k in v["reported"]}
    assert v["failed_metrics"] and "decoder.decoder_logits_cosine_mean" in v["failed_metrics"]


def test_no_held_out_samples_needs_the_accept_flag(tiny_bundle, tmp_path):
    with pytest.raises(InputError, match="no held-out samples"):
        quantize_bundle(tiny_bundle, tmp_path / "q", "int8", n_fidelity=0)
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(UserWarning, match="without fidelity validation"):
        out = quantize_bundle(
            tiny_bundle, tmp_path / "q", "int8", n_calibration=1, n_fidelity=0, accept_degraded=True
        )
    v = Bundle.load(out).manifest["validation"]
    assert v["status"] == "not measured (accepted)" and v["accepted_despite_failure"] and v["metrics"] == []
    assert REPORT_JSON not in Bundle.load(out).manifest["files"]


def test_cli_quantize_gate_accept_flag_and_info(tiny_bundle, tmp_path):
    from typer.testing import CliRunner

    from nora_edge.cli import app

    runner = CliRunner()
    out = tmp_path / "int4"
    res = runner.invoke(app, ["quantize", str(tiny_bundle), "--out", str(out), "--recipe", "int4"])
    assert res.exit_code == 2, res.output
    assert "FidelityGateError" in res.output and "decoder metric decoder_logits_cosine_mean" in res.output
    assert not out.exists()
    res = runner.invoke(
        app, ["quantize", str(tiny_bundle), "--out", str(out), "--recipe", "int4", "--accept-degraded"]
    )
    assert res.exit_code == 0, res.output
    assert "accepted despite failure: yes" in res.output and f"bundle written: {out}" in res.output
    shown = runner.invoke(app, ["info", str(out), "--json"])
    assert (
        shown.exit_code == 0
        and json.loads(shown.output)["validation"] == Bundle.load(out).manifest["validation"]
    )
    text = runner.invoke(app, ["info", str(out)]).output
    assert (
        "validation     FAILED (ACCEPTED): fidelity vs fp32 bundle" in text
        and "accepted despite failure: yes" in text
    )


def test_export_precision_int4_is_gated_too(tiny_ckpt, tmp_path):
    from nora_edge.export.pipeline import export_bundle

    with pytest.raises(FidelityGateError, match="decoder metric decoder_logits_cosine_mean"):
        export_bundle(tiny_ckpt, tmp_path / "int4", precision="int4", validate=False, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor the temporary fp32 export is left
