"""The CI gate on real runs of the tiny bundle: an unchanged run passes; a run whose decode steps are slowed by 60%
(a busy wait injected after the policy's decoder forward, not edited numbers) fails after re-measurement, naming
the stage; a slowdown present only during the first pass (what another process on the core does) is re-measured
and not counted. Verdicts are recomputed from the raw samples the report holds.

The slowed stage is the decode step (~0.3 ms): its fastest sample stays clean even while other processes share
the core, so these verdicts hold on a loaded machine; the 4.6 ms vision stage is preempted on nearly every run
in such stretches (see ``nora_edge.bench.gate``), which is what the gate's re-measurement is for."""

from __future__ import annotations

import json
import statistics
import time

import pytest

from nora_edge.bench import gate
from nora_edge.bench.gate_baseline import stage_unit
from nora_edge.bench.run import run_bench
from nora_edge.errors import InputError

STEPS = 80  # the fastest of 80 samples: steady on a shared 2-vCPU VM (40 let a stage drift +17%)
WARMUP = 3
# a suspect that is not reproduced stops the re-measurement early; a real regression spends the whole budget
CONFIRM_STEPS = 40
SLOW_BUDGET_S = 3.0
SLOWDOWN = 0.60  # of the baseline's decode step, added to every decoder forward (4x the gate's 15% limit)


def slowed(fn, seconds: float, calls: int | None = None):
    """``fn`` followed by a busy wait: the stage takes ``seconds`` longer on its first ``calls`` calls (all: None).

    A busy wait, like the extra work of a real regression; a sleep idles the core, and the next stage (prefill)
    then starts on a descheduled thread with cold caches and reads up to ~15% slower.
    """
    done = [0]

    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        done[0] += 1
        if calls is None or done[0] <= calls:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
        return out

    return wrapper


@pytest.fixture(scope="module")
def runs(tiny_bundle_h5, tmp_path_factory):
    """Baseline (median of three runs), unchanged, slowed and first-pass-only slowed runs of one loaded policy
    (ORT on 1 thread); the slowdown is 60% of the baseline's decode step, added to every decoder forward (the
    prefill's too: +8% of it). Not 30%: the busy wait is wall time while the gate divides by the run's yardsticks.
    A clean-clone CI run hit a slower stretch of the host: its slowed run read the decode step +43% raw but its
    yardsticks +24%, so the 30% wait came out +14.7% normalized, under the 15% limit."""
    from nora_edge.policy import NoraPolicy

    tmp = tmp_path_factory.mktemp("gate")
    baseline = tmp / "ci.json"
    policy = NoraPolicy.load(tiny_bundle_h5, threads=1, forced_tokens="flag")
    kw = {
        "policy": policy,
        "steps": STEPS,
        "warmup": WARMUP,
        "threads": 1,
        "roofline": False,
        "plots": False,
        "progress": False,
        "against": baseline,
        "confirm_steps": CONFIRM_STEPS,
        "confirm_seconds": 20.0,
    }
    # the baseline as CI records it: the median of several runs (one run's fastest sample can be inflated when
    # another process holds the core throughout it)
    recorded = [run_bench(None, out=tmp / f"base{i}", **{**kw, "against": None}) for i in range(3)]
    gate.write_baseline(baseline, recorded)
    base = recorded[0]
    same = run_bench(None, out=tmp / "same", **kw)
    extra_s = SLOWDOWN * json.loads(baseline.read_text())["metrics"]["stages_ms"]["decode_step"] / 1e3
    forward = policy.decoder.forward
    # decoder forwards of the first pass: one per generated token (the prefill, then a step per further token);
    # tokens per frame are deterministic, and chunk i of a pass runs frame i % 4
    tokens = same["samples"]["runtime"]["tokens"]
    first_pass = sum(tokens[i % 4] for i in range(WARMUP)) + sum(tokens)
    policy.decoder.forward = slowed(forward, extra_s, calls=first_pass)
    transient = run_bench(None, out=tmp / "transient", **kw)
    policy.decoder.forward = slowed(forward, extra_s)
    slow = run_bench(None, out=tmp / "slow", **{**kw, "confirm_seconds": SLOW_BUDGET_S})
    policy.decoder.forward = forward
    return {
        "baseline": baseline,
        "base": base,
        "same": same,
        "slow": slow,
        "transient": transient,
        "tmp": tmp,
    }


def _row(result: dict, metric: str) -> dict:
    (row,) = [r for r in result["rows"] if r["metric"] == metric]
    return row


def test_unchanged_run_passes(runs):
    result = runs["same"]["gate"]
    assert result["ok"], result["text"]
    assert "PASS" in result["text"]


def test_stage_slowed_by_60_percent_fails_after_remeasurement_and_is_named(runs):
    result = runs["slow"]["gate"]
    assert not result["ok"], result["text"]
    failed = [r["metric"] for r in result["rows"] if r["status"] == "REGRESSION"]
    assert "decode_step (norm)" in failed, result["text"]
    step = _row(result, "decode_step (norm)")
    assert step["change"] > 0.15 and step["first_change"] > 0.15
    assert "reproduced when re-measured" in step["note"]
    conf = result["confirmation"]
    assert "decode_step" in conf["stages"] and conf["reproduced"]["decode_step"] is True
    # the budget was spent before failing: rounds ran until confirm_seconds passed
    assert conf["seconds"] >= SLOW_BUDGET_S and conf["rounds"] >= 1
    assert _row(result, "memory (anon_rss_peak_mb)")["change"] < 0.15
    assert "re-measured" in result["text"] and "decode_step" in result["text"] and "FAIL" in result["text"]


def test_confirmation_numbers_follow_from_the_raw_samples(runs):
    base = json.loads(runs["baseline"].read_text())["metrics"]["normalized"]["decode_step"]
    for name in ("slow", "transient"):
        rep = runs[name]
        conf, summary = rep["confirmation"], rep["gate"]["confirmation"]
        # each re-measured step: one inference (a decode step per token after the first), one yardstick sample;
        # chunk i of a round runs frame i % 4, whose token count the first pass recorded
        tokens = rep["samples"]["runtime"]["tokens"]
        per_round = sum(tokens[i % 4] - 1 for i in range(conf["steps_per_round"]))
        assert len(conf["samples"]["decode_step"]) == conf["rounds"] * per_round, name
        assert summary["samples"]["decode_step"] == len(conf["samples"]["decode_step"]), name
        assert len(conf["unit_ms"]) == conf["rounds"] * conf["steps_per_round"] == summary["unit_samples"], (
            name
        )
        assert len(conf["dispatch_ms"]) == len(conf["unit_ms"]), name
        # the decode step is divided by the geometric mean of both yardsticks (gate_baseline.STAGE_UNITS)
        first = rep["samples"]["runtime"]["decode_step"]
        units = {u: min(rep[u]["samples"] + conf[u]) for u in ("unit_ms", "dispatch_ms")}
        unit = (units["unit_ms"] * units["dispatch_ms"]) ** 0.5
        pooled = min(first + conf["samples"]["decode_step"]) / unit
        row = _row(rep["gate"], "decode_step (norm)")
        assert row["current"] == pytest.approx(pooled, rel=1e-12), name
        assert row["change"] == pytest.approx(pooled / base - 1, rel=1e-12), name
        unit0 = (min(rep["unit_ms"]["samples"]) * min(rep["dispatch_ms"]["samples"])) ** 0.5
        assert row["first_pass"] == pytest.approx(min(first) / unit0, rel=1e-12)
        assert summary["after"]["decode_step"]["change"] == row["change"]


def test_first_pass_only_slowdown_is_remeasured_and_not_counted(runs):
    rep = runs["transient"]
    result = rep["gate"]
    step = _row(result, "decode_step (norm)")
    assert step["first_change"] > 0.15, result["text"]  # flagged in the first pass ...
    assert step["status"] == "ok" and "not reproduced when re-measured" in step["note"], result["text"]
    assert result["ok"], result["text"]  # ... not reproduced
    conf = result["confirmation"]
    assert conf["reproduced"]["decode_step"] is False and conf["after"]["decode_step"]["change"] <= 0.15
    md = (runs["tmp"] / "transient" / "report.md").read_text()
    assert "re-measured" in md and "decode_step" in md and "not reproduced" in md


def test_cli_reaches_the_runs_verdict_from_the_saved_report(runs, capsys):
    tmp, baseline = runs["tmp"], runs["baseline"]
    assert gate.main([str(tmp / "same" / "report.json"), "--against", str(baseline)]) == 0
    # the saved report carries the re-measured samples: the CLI pools them like the run did
    assert gate.main([str(tmp / "transient" / "report.json"), "--against", str(baseline)]) == 0
    assert "not reproduced" in capsys.readouterr().out
    assert gate.main([str(tmp / "slow" / "report.json"), "--against", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "decode_step (norm)" in out and "re-measured" in out and "reproduced when re-measured" in out
    assert gate.main([str(tmp / "same" / "report.json"), "--against", str(tmp / "missing.json")]) == 2


def test_token_rates_are_informational_rows(runs):
    rep = runs["same"]
    rates = {r["key"]: r for r in rep["gate"]["rates"]}
    assert len(rates) == len(gate.RATES) == 5
    for key, r in rates.items():
        assert r["current"] == rep["runtime"][key] and r["baseline"] == runs["base"]["runtime"][key], key
    assert all(r["status"] != "REGRESSION" for r in rep["gate"]["rows"] if "rate" in r["metric"])
    assert "repaired per token" in rep["gate"]["text"] and "forced_continue per chunk" in rep["gate"]["text"]


def test_update_baseline_rewrites_the_file(runs, tmp_path):
    target = tmp_path / "new.json"
    result = gate.check(runs["tmp"] / "slow" / "report.json", target, update_baseline=True)
    assert result.ok  # a run compared with itself
    stored = json.loads(target.read_text())
    assert (
        stored["metrics"]["stages_ms"]["decode_step"]
        == runs["slow"]["runtime"]["stages"]["decode_step"]["min"]
    )
    assert stored["identity"]["mode"] == "constrained" and stored["identity"]["head"] == "action"


def test_baseline_is_the_median_of_several_bench_processes(runs, tmp_path, capsys):
    names = ("base", "same", "slow")
    target = tmp_path / "median.json"
    dirs = {"base": "base0", "same": "same", "slow": "slow"}
    argv = [str(runs["tmp"] / dirs[n] / "report.json") for n in names]
    argv += ["--against", str(target), "--update-baseline"]
    assert gate.main(argv) == 0
    stored = json.loads(target.read_text())
    assert len(stored["runs"]) == 3 and "median over 3 bench process(es)" in stored["note"]
    for stage in ("vision", "prefill", "decode_step", "e2e"):
        norm = [
            runs[n]["runtime"]["stages"][stage]["min"]
            / stage_unit({u: runs[n][u]["min"] for u in ("unit_ms", "dispatch_ms")}, stage)
            for n in names
        ]
        assert stored["metrics"]["normalized"][stage] == pytest.approx(statistics.median(norm), rel=1e-12)
        assert [r["normalized"][stage] for r in stored["runs"]] == pytest.approx(norm, rel=1e-12)
    memory = [runs[n]["memory"]["anon_rss_peak_mb"] for n in names]
    assert stored["metrics"]["memory_kind"] == "anon_rss_peak_mb" and all(m > 0 for m in memory)
    assert stored["metrics"]["memory_mb"] == statistics.median(memory)
    # the one slowed process out of three does not become the baseline
    slow = runs["slow"]["runtime"]["stages"]["decode_step"]["min"] / stage_unit(
        {u: runs["slow"][u]["min"] for u in ("unit_ms", "dispatch_ms")}, "decode_step"
    )
    assert stored["metrics"]["normalized"]["decode_step"] < slow
    assert "median of 3 bench process(es)" in capsys.readouterr().out


def test_reports_for_different_settings_make_no_baseline(runs, tmp_path):
    other = json.loads(json.dumps(runs["same"]))
    other["config"]["threads"] = None
    with pytest.raises(
        InputError, match=r"bench reports 0 and 1 were recorded for different settings: \['threads'\]"
    ):
        gate.write_baseline(tmp_path / "b.json", [runs["base"], other])
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("config", "threads", None),
        ("config", "mode", "hf-parity"),
        ("config", "providers", {"vision": ["CUDAExecutionProvider"], "decoder": ["CPUExecutionProvider"]}),
        ("bundle", "head", "full"),
        ("unit_ms", "yardstick", "fp32 MatMul 64x1024x1024 + 1x2048x4096"),  # the earlier yardstick
        ("dispatch_ms", "yardstick", "another chain"),
    ],
)
def test_baseline_for_other_settings_is_refused_naming_the_field(runs, section, field, value):
    other = json.loads(json.dumps(runs["same"]))
    other[section][field] = value
    name = "dispatch_yardstick" if section == "dispatch_ms" else field
    with pytest.raises(InputError, match=f"baseline was recorded for other settings: {name} \\(baseline"):
        gate.compare(other, gate.load_baseline(runs["baseline"]))


def test_baseline_with_another_memory_kind_is_refused(runs):
    stored = gate.load_baseline(runs["baseline"])
    stored["metrics"]["memory_kind"] = "rss_peak_mb"
    with pytest.raises(
        InputError, match="baseline memory is 'rss_peak_mb', this run's is 'anon_rss_peak_mb'"
    ):
        gate.compare(runs["same"], stored)


def test_malformed_baseline_is_refused(tmp_path):
    bad = tmp_path / "b.json"
    bad.write_text('{"schema": 7}')
    with pytest.raises(InputError, match="field 'schema' must be 1"):
        gate.load_baseline(bad)


def test_unreadable_report_is_an_input_error(tmp_path):
    bad = tmp_path / "report.json"
    bad.write_text("{ not json")
    with pytest.raises(InputError, match=r"report.json: not valid JSON"):
        gate.check(bad, tmp_path / "b.json")
    with pytest.raises(InputError, match="bench report not found"):
        gate.check(tmp_path / "absent.json", tmp_path / "b.json")


def test_policy_that_refuses_chunks_is_refused(tiny_bundle_h5, tmp_path):
    from nora_edge.policy import NoraPolicy

    policy = NoraPolicy.load(tiny_bundle_h5, threads=1)  # forced_tokens="raise"
    with pytest.raises(InputError, match="forced_tokens='flag'"):
        run_bench(None, policy=policy, out=tmp_path, progress=False)
