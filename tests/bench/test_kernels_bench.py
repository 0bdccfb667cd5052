"""Smoke test of the kernels benchmark (bench/kernels_bench.py): a tiny run, the report's structure and checks.

Data flow: libnora_fast built into a temp folder (make, library targets only) + the tiny NORA-Long bundle
--kernels_bench.main (16 chunks, --quick)--> kernels_bench.json / .md --> every path timed, the correctness counts
the benchmark takes before timing (C coefficients vs the published tokenizers + scipy decode, C vs numpy ids)
equal to the number of chunks / tokens compared. Timings are never asserted.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from nora_edge.bench import kernels_bench
from nora_edge.bench.kernels_paths import BINDING_DECODE, BINDING_SELECT

REPO = Path(__file__).resolve().parents[2]
CHUNKS = 16
DECODE_PATHS = (
    "C per chunk (ctypes)",
    "numpy (ByteTable + Chain)",
    "published",
    f"C batch {CHUNKS} (ctypes)",
)
SELECT_PATHS = ("C batch 1 (ctypes)", "numpy (generate.greedy step)")


@pytest.fixture(scope="module")
def native_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libnora_fast.so (+ .a) built from kernels/ into a temp folder."""
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.skip("make and cc are needed to build libnora_fast")
    build = tmp_path_factory.mktemp("kernels-build")
    targets = [str(build / "libnora_fast.so"), str(build / "libnora_fast.a")]
    subprocess.run(["make", "-s", "-C", str(REPO / "kernels"), f"BUILD={build}", *targets], check=True)
    return build / "libnora_fast.so"


def test_kernels_bench_report(native_lib: Path, tiny_bundle_h5: Path, tmp_path: Path) -> None:
    out = tmp_path / "kb"
    argv = ["--out", str(out), "--chunks", str(CHUNKS), "--quick", "--bundle", str(tiny_bundle_h5)]
    report = kernels_bench.main([*argv, "--lib", str(native_lib)])

    on_disk = json.loads((out / "kernels_bench.json").read_text())
    assert on_disk["command"] == report["command"] and "--chunks 16" in report["command"]
    assert on_disk["machine"]["cpu"] and on_disk["machine"]["cores"] >= 1
    assert len(on_disk["codecs"]) == 2  # the fitted FAST+-like codec and the bundle's own
    compared = 0
    for res in on_disk["codecs"]:
        dec, sel = res["decode"], res["select"]
        assert set(DECODE_PATHS) <= set(dec["us"]), dec["us"].keys()
        assert {*SELECT_PATHS, f"C batch {CHUNKS} (ctypes)"} <= set(sel["us"]), sel["us"].keys()
        for summary in [*dec["us"].values(), *sel["us"].values()]:
            assert summary["n"] >= 1 and 0 < summary["median"] <= summary["p99"]
        assert dec["us"]["published"]["n"] == CHUNKS  # one sample per chunk per repeat (1 under --quick)
        # outputs were checked against each other before timing: the counts equal what was compared
        c = dec["check"]
        assert c["chunks"] == CHUNKS
        assert c["status_ok"] == c["coefficients_equal_published"] == c["status_ok_timed"] == CHUNKS
        assert c["max_abs_c_vs_numpy"] < 1e-3 and c["max_abs_numpy_vs_published"] < 1e-9
        s = sel["check"]
        assert s["tokens"] >= CHUNKS
        assert (
            s["status_ok"] == s["c_equals_sequence"] == s["c_equals_numpy"] == s["state_equal"] == s["tokens"]
        )
        compared += c["chunks"] + s["tokens"]
        if (
            on_disk["binding_library"] is not None
        ):  # nora_edge.kernels loaded a library: its rows are checked too
            assert c["runtime_path_equals_numpy_bitwise"] == CHUNKS and s["binding_equals_c"] == s["tokens"]
            assert BINDING_DECODE in dec["us"] and BINDING_SELECT in sel["us"]
        assert all(math.isfinite(v) and v > 0 for v in res["ratios"].values())
        if shutil.which("valgrind"):
            modes = res["callgrind"]
            assert set(modes) == {"decode-batch", "decode-each", "select-each", "select-batch"}
            assert all(m["ir_per_unit"] > 0 for m in modes.values())
        else:
            assert res["callgrind"] == {"skipped": "valgrind not installed"}
    assert compared >= 4 * CHUNKS
    share = on_disk["step_share"]
    assert share["decode_step_us"] > 0 and share["tokens_per_chunk"] > 0
    assert math.isfinite(share["c_percent"]) and math.isfinite(share["numpy_percent"])

    text = (out / "kernels_bench.md").read_text()
    assert report["command"] in text and "| path | median µs | p99 µs | samples |" in text
    assert "share of the steps' time" in text
