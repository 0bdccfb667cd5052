"""run_bench on the tiny NORA-Long bundle: the report agrees with its own raw samples (recomputed with the
statistics module), with an independent NoraPolicy run on the same frames (tokens, token classes, providers),
and with the PyTorch reference; every report carries the OpenVLA-7B section, one row per profile."""

from __future__ import annotations

import json
import statistics

import pytest

from nora_edge.bench.run import N_IMAGES, bench_images, run_bench
from nora_edge.errors import InputError
from nora_edge.profiles import list_profiles


@pytest.fixture(scope="module")
def report(tiny_bundle_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return run_bench(tiny_bundle_h5, steps=8, warmup=1, out=out, threads=1, progress=False), out


def test_report_files_are_written(report):
    res, out = report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["runtime"]["e2e"]["median"] == pytest.approx(res["runtime"]["e2e"]["median"])
    md = (out / "report.md").read_text()
    assert "actions/s" in md and "## Stages (ms)" in md and "## Roofline" in md
    for name in ("latency.png", "stages.png", "roofline.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_statistics_match_the_raw_samples(report):
    res, _ = report
    rt = res["runtime"]
    for stage, xs in res["samples"]["runtime"].items():
        if stage == "tokens" or not xs:
            continue
        assert rt["stages"][stage]["median"] == pytest.approx(statistics.median(xs), rel=1e-12), stage
        q = statistics.quantiles(xs, n=100, method="inclusive")
        assert rt["stages"][stage]["p99"] == pytest.approx(q[98], rel=1e-9), stage
    e2e = rt["e2e"]
    assert e2e["n"] == 8
    assert e2e["actions_per_s"] == pytest.approx(
        5 * 1e3 / statistics.median(res["samples"]["runtime"]["e2e"])
    )
    assert e2e["deadline_ms"] == pytest.approx(5 / 25 * 1e3)
    expect_miss = sum(x > 200 for x in res["samples"]["runtime"]["e2e"]) / 8
    assert e2e["deadline_miss_rate"] == expect_miss
    # one decode_step sample per generated token after the first
    tokens = res["samples"]["runtime"]["tokens"]
    assert len(res["samples"]["runtime"]["decode_step"]) == sum(t - 1 for t in tokens)
    assert res["memory"]["policy_rss_mb"] > 0 and res["memory"]["rss_peak_mb"] > 0
    assert 0 < res["memory"]["anon_rss_peak_mb"] < res["memory"]["rss_peak_mb"]
    assert res["bundle"]["size_bytes"] > 0 and res["bundle"]["horizon"] == 5


def test_tokens_and_token_classes_match_an_independent_policy_run(report, tiny_bundle_h5):
    from nora_edge.policy import NoraPolicy

    res, _ = report
    policy = NoraPolicy.load(tiny_bundle_h5, threads=1, forced_tokens="flag")
    images = bench_images(N_IMAGES, seed=0)
    outs = [policy.run_chunk(images[i % N_IMAGES], res["config"]["instruction"]) for i in range(8)]
    assert res["samples"]["runtime"]["tokens"] == [o.ids.size for o in outs]
    rt = res["runtime"]
    assert rt["malformed"] == 0  # constrained decoding always decodes
    totals = {c: sum(o.class_counts[c] for o in outs) for c in ("model", "repaired", "forced_continue")}
    assert rt["token_classes"] == totals and sum(totals.values()) == sum(o.ids.size for o in outs)
    n_tokens = sum(totals.values())
    assert rt["repaired_rate"] == totals["repaired"] / n_tokens
    assert rt["forced_rate"] == totals["forced_continue"] / n_tokens
    assert rt["repaired_chunk_rate"] == sum(o.repaired > 0 for o in outs) / 8
    assert rt["forced_chunk_rate"] == sum(o.forced > 0 for o in outs) / 8
    # the identity of what ran: decoding mode, head, forced-token rule, the provider each graph ran on
    cfg = res["config"]
    assert cfg["mode"] == "constrained" and cfg["forced_tokens"] == "flag" and cfg["head"] == "action"
    assert (
        cfg["providers"]
        == policy.providers
        == {
            "vision": ["CPUExecutionProvider"],
            "decoder": ["CPUExecutionProvider"],
        }
    )


def test_report_md_states_mode_providers_and_token_rates(report):
    res, out = report
    md = (out / "report.md").read_text()
    assert "decoding: constrained; forced tokens: flag" in md
    assert "execution providers: vision: CPUExecutionProvider; decoder: CPUExecutionProvider" in md
    rt = res["runtime"]
    assert (
        f"repaired {100 * rt['repaired_rate']:.1f}% of tokens ({100 * rt['repaired_chunk_rate']:.1f}% of chunks)"
        in md
    )
    assert f"malformed: {100 * rt['malformed_rate']:.1f}% of chunks" in md


def test_every_report_has_the_7b_section_one_row_per_profile(report):
    res, out = report
    sec = res["baseline7b"]
    profiles = list_profiles()
    assert sec["model"] == "OpenVLA-7B" and [r["profile"] for r in sec["rows"]] == profiles
    assert len(sec["rows"]) == len(profiles) == 5
    for row in sec["rows"]:
        plans = ("fp32", "int8", "int4") if row["profile"] == "host" else ("fp16", "int8", "int4")
        assert tuple(row["plans"]) == plans, row["profile"]
        assert row["plans"]["int4"]["actions_per_s"] == pytest.approx(1e3 / row["plans"]["int4"]["e2e_ms"])
        assert row["host_measured"] is None  # no baseline7b.json passed
    host = sec["rows"][0]
    assert host["bundle_actions_per_s"] == res["runtime"]["e2e"]["actions_per_s"]
    md = (out / "report.md").read_text()
    assert "## 7B baseline: OpenVLA-7B on every profile" in md
    section = md.split("## 7B baseline")[1].split("\n## ")[0]
    rows = [
        line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| profile |")
    ]
    assert [r.split(" | ")[0][2:] for r in rows] == profiles


def test_roofline_predicts_every_stage_on_every_profile(report):
    res, _ = report
    roof = res["roofline"]
    assert set(roof["host"]) == {"vision", "prefill", "decode_step"}
    assert roof["prompt_tokens"] > roof["cached_prefix_tokens"] > 0
    for profile, stages in roof["profiles"].items():
        assert all(ms > 0 for ms in stages.values()), profile
    # same graphs: the bigger Orin is faster at every stage
    for stage in ("vision", "prefill", "decode_step"):
        assert roof["profiles"]["orin-agx-64gb"][stage] < roof["profiles"]["orin-nano-8gb"][stage]


def test_reference_runs_interleaved_and_speedups_follow_the_samples(tiny_bundle_h5, tiny_ckpt_h5, tmp_path):
    res = run_bench(
        tiny_bundle_h5,
        reference=tiny_ckpt_h5,
        steps=2,
        warmup=0,
        out=tmp_path,
        threads=1,
        roofline=False,
        plots=False,
        progress=False,
    )
    ref = res["reference"]
    assert ref["e2e"]["n"] == 2 and len(res["samples"]["reference_e2e"]) == 2
    rt_med = statistics.median(res["samples"]["runtime"]["e2e"])
    ref_med = statistics.median(res["samples"]["reference_e2e"])
    assert res["speedup"]["e2e_median"] == pytest.approx(ref_med / rt_med, rel=1e-12)
    assert 0.0 <= ref["malformed_rate"] <= 1.0
    # HF generate has no automaton: nothing is repaired or forced, and the report does not claim measured zeros
    assert ref["token_classes"] is None and ref["repaired_rate"] is None and ref["forced_chunk_rate"] is None
    assert ref["tokens_per_chunk"]["median"] >= 1
    assert "vs PyTorch reference" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"warmup": -1}, "warmup must be an int >= 0"),
        ({"hz": 0}, "hz must be a positive number"),
        ({"max_regression": -0.1}, "max_regression must be a positive fraction"),
        ({"confirm_seconds": -1}, "confirm_seconds must be a number >= 0"),
        ({"confirm_steps": 0}, "confirm_steps must be an int >= 1"),
        ({"baseline7b": "absent/baseline7b.json"}, "missing file: absent/baseline7b.json"),
        ({"update_baseline": True}, "update_baseline needs against="),
    ],
)
def test_bad_options_are_refused(kwargs, match, tmp_path):
    with pytest.raises(InputError, match=match):
        run_bench(tmp_path / "no-bundle", out=tmp_path, progress=False, **kwargs)


def test_bench_labels_the_bnb_reference(tiny_bundle_h5, tiny_ckpt_h5, tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    res = run_bench(
        tiny_bundle_h5, reference=tiny_ckpt_h5, reference_quant="bnb-nf4", steps=1, warmup=0, out=tmp_path,
        threads=1, roofline=False, plots=False, progress=False,
    )  # fmt: skip
    assert res["config"]["reference_quant"] == "bnb-nf4" and res["reference"]["e2e"]["n"] == 1
    assert "vs PyTorch reference (bnb-nf4, bitsandbytes)" in (tmp_path / "report.md").read_text()
    with pytest.raises(InputError, match="needs reference="):
        run_bench(tiny_bundle_h5, reference_quant="bnb-nf4", out=tmp_path, progress=False)


def test_anonymous_rss_counts_heap_memory_not_mapped_files(tmp_path):
    """The gate's memory metric: 40 MB of touched heap raise it by 40 MB; reading a 40 MB mapped file raises the
    RSS, not it (file pages follow the page cache, not the code)."""
    import mmap

    import numpy as np

    from nora_edge.bench.steps import anon_rss_mb, rss_mb

    if anon_rss_mb() is None:
        pytest.skip("no /proc/self/status RssAnon on this OS")
    blob = tmp_path / "blob"
    blob.write_bytes(np.random.default_rng(0).bytes(40_000_000))
    a0, r0 = anon_rss_mb(), rss_mb()
    with open(blob, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        touched = sum(mm[i] for i in range(0, len(mm), 4096))  # read one byte per page
        a1, r1 = anon_rss_mb(), rss_mb()
    # 40 MB of new anonymous memory, written: what a heap allocation is to the kernel. Not np.ones: after a long
    # test session malloc may hand back pages this process already holds (RssAnon then does not move; seen in CI)
    with mmap.mmap(-1, 40_000_000, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as anon:  # shared: RssShmem
        heap = np.frombuffer(anon, np.uint8)
        heap[:] = 1
        a2 = anon_rss_mb()
        written = int(heap[::4096].sum())
        del heap
    # the kernel batches its RSS counters per CPU / thread: a few MB of slack
    assert r1 - r0 > 30 and abs(a1 - a0) < 8, (r0, r1, a0, a1)
    assert a2 - a1 == pytest.approx(40, abs=8) and written == len(range(0, 40_000_000, 4096)) and touched >= 0
