"""The scale-run summary reads what the bench, the bundle and /usr/bin/time wrote, and marks what is missing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nora_edge.bench.run import run_bench
from nora_edge.bench.summary import build_summary, main, read_time_file, render


@pytest.fixture(scope="module")
def run_dir(tiny_bundle_h5, tmp_path_factory):
    """A scale-run folder laid out as `make bench-real` writes it, with only the fp32 bundle present."""
    out = tmp_path_factory.mktemp("scale")
    shutil.copytree(tiny_bundle_h5, out / "bundle-real-fp32")
    report = run_bench(
        out / "bundle-real-fp32", steps=3, warmup=1, out=out / "bench-real-fp32", threads=1, progress=False
    )
    return out, report


def test_time_file_is_parsed_from_a_real_run(tmp_path):
    if not Path("/usr/bin/time").is_file():
        pytest.skip("/usr/bin/time (GNU time) is not installed")
    log = tmp_path / "t.time"
    with open(log, "w") as f:
        subprocess.run(
            ["/usr/bin/time", "-v", sys.executable, "-c", "b = bytearray(200_000_000)"], stderr=f, check=True
        )
    got = read_time_file(log)
    assert got["exit_status"] == 0 and 0 < got["wall_s"] < 60
    assert 0.2 <= got["peak_rss_gb"] < 1.0  # the 200 MB buffer plus the interpreter
    assert read_time_file(tmp_path / "absent.time") is None


def test_summary_matches_the_report_and_marks_missing_pieces(run_dir):
    out, report = run_dir
    s = build_summary(out)
    fp32, int8, _ = s["bundles"]
    b = fp32["bench"]
    assert b["e2e_p50_ms"] == report["runtime"]["e2e"]["p50"]
    assert b["stage_p50_ms"]["decode_step"] == report["runtime"]["stages"]["decode_step"]["p50"]
    assert b["profile_ms"] == report["roofline"]["profiles"]["orin-agx-64gb"]
    anchored = report["roofline"]["orin_anchored"]
    assert b["orin_anchored"]["actions_per_s"] == anchored["headline"]["actions_per_s"]
    assert b["orin_anchored"]["tokens_per_chunk"]["median"] == report["runtime"]["tokens_per_chunk"]["median"]
    assert fp32["size_gb"] * 1e9 == pytest.approx(report["bundle"]["size_bytes"], rel=0.01)
    assert fp32["build"] is None and int8["bench"] is None and int8["fidelity"] is None
    md = render(s)
    assert "| int8 | missing |" in md and "missing: run `python -m nora_edge.bench.baseline7b OUT`" in md
    plain = anchored["headline"]["actions_per_s"]["plain"]
    bench_md = (out / "bench-real-fp32" / "report.md").read_text()  # every bench report carries the section
    assert "## Orin prediction anchored on published measurements (NORA-Long int4)" in bench_md
    assert f"prediction error {100 * anchored['headline']['held_out_error']:+.1f}%" in bench_md
    assert f"| fp32 | {report['runtime']['tokens_per_chunk']['median']:g} (measured) | {plain:.1f} |" in md
    main([str(out)])
    assert (out / "summary.md").read_text() == md and (out / "summary.json").is_file()
