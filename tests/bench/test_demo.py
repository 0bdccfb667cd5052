"""The demo end to end on the session's trained tiny NORA-Long checkpoint: every bundle built, benchmarked against
the reference and reported; a quantized bundle that fails to build fails the demo (and ``nora-edge demo``)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from nora_edge.bench.demo import PRECISIONS, DemoError, run_demo
from nora_edge.errors import InputError


def _table_rows(report_text: str, ckpt_name: str) -> list[str]:
    return [line for line in report_text.splitlines() if line.startswith(f"| {ckpt_name} ")]


def test_demo_builds_benches_and_reports_every_bundle(tiny_trained_ckpt_h5, tmp_path, capsys):
    report = run_demo(tmp_path, checkpoint=tiny_trained_ckpt_h5, steps=2, warmup=0, threads=1)
    assert PRECISIONS == ("fp32", "int8", "int4")
    assert report == tmp_path / "report.md"
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["requested"] == summary["built"] == list(PRECISIONS)
    assert summary["failed"] == {}
    built = 0
    for p in PRECISIONS:
        manifest = json.loads((tmp_path / f"bundle-{p}" / "manifest.json").read_text())
        assert manifest["export"]["precision"] == p
        bench = json.loads((tmp_path / f"bench-{p}" / "report.json").read_text())
        assert bench["runtime"]["e2e"]["n"] == 2 and bench["reference"]["e2e"]["n"] == 2
        assert bench["speedup"]["e2e_median"] > 0
        built += 1
    assert built == 3
    text = report.read_text()
    rows = _table_rows(text, tiny_trained_ckpt_h5.name)
    assert [r.split("|")[1].strip().rsplit(" ", 1)[1] for r in rows] == list(PRECISIONS)
    assert sum(f"(bench-{p}/report.md)" in text for p in PRECISIONS) == 3
    assert "FAILED" not in text
    out = capsys.readouterr().out
    assert str(report) in out and "FAILED" not in out


def test_precisions_must_include_fp32_once(tmp_path):
    with pytest.raises(InputError, match="must include fp32"):
        run_demo(tmp_path, precisions=["int8"])
    with pytest.raises(InputError, match="duplicate"):
        run_demo(tmp_path, precisions=["fp32", "int8", "int8"])


def _plant_overtight_int8_gate(monkeypatch) -> None:
    """Fault injection through the real quantizer: the int8 recipe demands a vision cosine of exactly 1.0, which
    an int8 vision graph cannot reach, so ``quantize_bundle``'s fidelity gate raises FidelityGateError."""
    from nora_edge.export.quantize import registry

    r = registry.RECIPES["int8"]
    tight = dataclasses.replace(r, fidelity=dataclasses.replace(r.fidelity, image_embeds_cosine_min=1.0))
    monkeypatch.setitem(registry.RECIPES, "int8", tight)


def test_a_quantized_bundle_that_fails_to_build_fails_the_cli_demo(
    tiny_trained_ckpt_h5, tmp_path, monkeypatch
):
    """``nora-edge demo`` as ``make demo`` runs it (default precisions), on a copy of the session's trained
    fixture placed where the demo reuses it, with the int8 gate planted to fail: exit 2 naming the bundle, the
    metric and the component; what was built is still benchmarked and the report says the demo failed."""
    from typer.testing import CliRunner

    from nora_edge.cli import app
    from nora_edge.export.train_fixture import FIXTURE_TRAIN_STEPS

    assert FIXTURE_TRAIN_STEPS[5] > 0
    shutil.copytree(tiny_trained_ckpt_h5, tmp_path / "ckpt-tiny-h5-trained")
    _plant_overtight_int8_gate(monkeypatch)
    result = CliRunner().invoke(app, ["demo", "--fixture", "--out", str(tmp_path), "--steps", "2"])
    assert result.exit_code == 2, result.output
    assert f"error: {DemoError.__name__}: demo failed:" in result.output
    assert "bundle-int8: FidelityGateError" in result.output
    assert "image_embeds_cosine_min" in result.output and "vision" in result.output
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["requested"] == list(PRECISIONS)
    assert summary["built"][0] == "fp32" and "int8" in summary["failed"] and "int8" not in summary["built"]
    assert sorted([*summary["built"], *summary["failed"]]) == sorted(PRECISIONS)  # every bundle accounted for
    text = (tmp_path / "report.md").read_text()
    assert "**DEMO FAILED:" in text and "- int8: FidelityGateError" in text
    assert len(_table_rows(text, "ckpt-tiny-h5-trained")) == len(summary["built"])
    for p in summary["built"]:
        assert (tmp_path / f"bench-{p}" / "report.json").is_file()
    assert not (tmp_path / "bundle-int8").exists() and not (tmp_path / "bench-int8").exists()


@pytest.mark.slow
def test_full_demo_from_a_fresh_fixture(tmp_path):
    """What ``make demo`` does: builds and trains the fixture itself; every bundle must build."""
    report = run_demo(tmp_path, steps=5, warmup=1)
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["built"] == list(PRECISIONS) and summary["failed"] == {}
    assert sum(f"(bench-{p}/report.md)" in report.read_text() for p in PRECISIONS) == 3
