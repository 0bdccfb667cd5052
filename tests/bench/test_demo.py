"""run_demo end to end on the session's tiny NORA-Long checkpoint: bundle, bench with reference, summary."""

from __future__ import annotations

import json

import pytest

from nora_edge.bench.demo import available_precisions, run_demo
from nora_edge.errors import InputError


def test_demo_writes_the_summary_and_a_bench_report(tiny_ckpt_h5, tmp_path, capsys):
    report = run_demo(tmp_path, checkpoint=tiny_ckpt_h5, precisions=["fp32"], steps=2, warmup=0, threads=1)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    assert "speedup (median)" in text and "bench-fp32/report.md" in text
    bench = json.loads((tmp_path / "bench-fp32" / "report.json").read_text())
    assert bench["reference"]["e2e"]["n"] == 2
    assert bench["speedup"]["e2e_median"] > 0
    assert str(report) in capsys.readouterr().out


def test_fp32_is_always_offered_and_required(tmp_path):
    assert available_precisions()[0] == "fp32"
    with pytest.raises(InputError, match="must include fp32"):
        run_demo(tmp_path, precisions=["int8"])


@pytest.mark.slow
def test_full_demo_from_a_fresh_fixture(tmp_path):
    report = run_demo(tmp_path, steps=5, warmup=1)
    text = report.read_text()
    for p in available_precisions():
        assert f"bench-{p}" in text or f"{p}: not built" in text
