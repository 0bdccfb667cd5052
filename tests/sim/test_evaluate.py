"""sim.evaluate + sim.report end to end: real worker processes, real MetaWorld, the tiny sim policy.

Each evaluation runs one or two short episodes (--max-steps 10); crash and hang are injected for real in the
worker through the test-only ``NORA_EDGE_EVAL_FAULT`` seam.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("metaworld", reason="MetaWorld is an optional extra: pip install 'nora-edge[sim]'")

from nora_edge.errors import InputError  # noqa: E402
from nora_edge.sim.demos import DEMO_SEED_BASE  # noqa: E402
from nora_edge.sim.evaluate import (  # noqa: E402
    FAULT_ENV,
    EvalConfig,
    eval_seed,
    evaluate,
    parse_tasks,
    plan,
    run_eval,
)
from nora_edge.sim.metaworld_env import TASKS  # noqa: E402

TASK = "drawer-close-v3"  # the sim_policy fixture's task
EPISODE_FIELDS = {"task", "seed", "policy", "success", "steps", "chunks", "chunk_s", "chunk_steps", "tokens",
                  "repaired", "forced", "malformed", "status", "stop", "error", "attempts", "hold_steps",
                  "obs_age_steps"}  # fmt: skip
GROUP_FIELDS = {"episodes", "successes", "success_rate", "ci95", "ms_per_chunk", "ms_per_step",
                "tokens_per_chunk", "steps_mean", "repaired", "forced", "malformed", "status", "stop"}  # fmt: skip


def test_plan_seeds_are_deterministic_below_demo_seeds_and_independent_of_the_task_set():
    everything = plan(parse_tasks("all"), 20, seed=3)
    assert len(everything) == 20 * len(TASKS) and [e.index for e in everything] == list(
        range(len(everything))
    )
    assert all(0 <= e.seed < DEMO_SEED_BASE // 2 for e in everything)  # below frame and demo seeds
    assert len({e.seed for e in everything}) == len(everything)
    one = plan([TASK], 20, seed=3)
    assert [e.seed for e in one] == [e.seed for e in everything if e.task == TASK]
    assert one == plan([TASK], 20, seed=3) and [e.seed for e in plan([TASK], 20, 4)] != [e.seed for e in one]
    assert eval_seed(3, TASK, 0) == one[0].seed


def test_bad_options_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="nope"):
        parse_tasks("drawer-close-v3,nope")
    with pytest.raises(InputError, match="episodes"):
        plan([TASK], 0, 0)
    with pytest.raises(InputError, match="workers"):
        EvalConfig(workers=0)
    with pytest.raises(InputError, match="neither a bundle"):
        run_eval(tmp_path, TASK, 1, 0)


def _check_report(paths, n_runs: int, episodes: int) -> dict:
    report = json.loads(paths["json"].read_text())
    assert len(report["runs"]) == n_runs
    for run in report["runs"]:
        assert len(run["episodes"]) == episodes
        assert all(set(e) == EPISODE_FIELDS for e in run["episodes"])
        assert set(run["summary"]["overall"]) == GROUP_FIELDS
        assert run["summary"]["overall"]["episodes"] == episodes
    assert paths["markdown"].read_text().startswith("# MetaWorld evaluation")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


@pytest.mark.parametrize("kind", ["bundle", "checkpoint"])
def test_smoke_one_episode(sim_policy, tmp_path, kind):
    paths = run_eval(sim_policy[kind], TASK, 1, seed=0, cfg=EvalConfig(max_steps=10, gif=1), out=tmp_path)
    report = _check_report(paths, 1, 1)
    ep = report["runs"][0]["episodes"][0]
    assert ep["status"] == "ok" and ep["attempts"] == 1 and ep["seed"] == eval_seed(0, TASK, 0)
    assert report["runs"][0]["kind"] == kind and report["runs"][0]["events"] == []
    assert paths["gif0"].read_bytes()[:6] == b"GIF89a"


def test_cli_paired_against_itself(sim_policy, tmp_path):
    """bundle vs itself on the same 2 episodes: identical outcomes, difference 0, no discordant pairs."""
    from typer.testing import CliRunner

    from nora_edge.cli import app

    b = str(sim_policy["bundle"])
    args = ["eval", b, "--env", "metaworld", "--tasks", TASK, "--episodes", "2", "--seed", "7", "--workers", "2",
            "--against", b, "--max-steps", "10", "--out", str(tmp_path)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "report.md") in res.output
    report = _check_report({"json": tmp_path / "report.json", "markdown": tmp_path / "report.md",
                            "png": tmp_path / "success.png"}, 2, 2)  # fmt: skip
    a, b2 = (r["episodes"] for r in report["runs"])
    assert [(e["seed"], e["success"], e["steps"], e["tokens"]) for e in a] == [
        (e["seed"], e["success"], e["steps"], e["tokens"]) for e in b2
    ]
    c = report["comparison"]["overall"]
    assert (c["n"], c["diff"], c["a_only"], c["b_only"]) == (2, 0.0, 0, 0) and c["low"] < 0 < c["high"]
    bad = CliRunner().invoke(app, ["eval", b, "--env", "gym", "--tasks", TASK])
    assert bad.exit_code == 2 and "only 'metaworld'" in bad.output


def test_crash_is_reported_rerun_and_counted(sim_policy, monkeypatch):
    eps = plan([TASK], 2, seed=0)
    monkeypatch.setenv(FAULT_ENV, f"crash:{TASK}:{eps[0].seed}")  # every attempt of episode 0 dies
    run = evaluate(sim_policy["bundle"], eps, EvalConfig(max_steps=5, timeout_s=120))
    assert len(run.results) == 2
    r0, r1 = run.results
    assert (r0.status, r0.success, r0.attempts, r0.stop) == (
        "crashed",
        False,
        2,
        "error",
    ) and "twice" in r0.error
    assert (r1.status, r1.attempts) == ("ok", 1)
    assert [(e["event"], e["seed"], e["attempt"]) for e in run.events] == [
        ("crashed", eps[0].seed, 1),
        ("crashed", eps[0].seed, 2),
    ]


def test_hang_is_killed_and_rerun(sim_policy, monkeypatch):
    eps = plan([TASK], 1, seed=0)
    monkeypatch.setenv(FAULT_ENV, f"hang1:{TASK}:*")  # the first attempt hangs, the rerun works
    run = evaluate(sim_policy["bundle"], eps, EvalConfig(max_steps=5, timeout_s=4))
    (r,) = run.results
    assert (r.status, r.attempts) == ("ok", 2)
    assert [(e["event"], e["attempt"]) for e in run.events] == [("hung", 1)] and "hung" in run.events[0][
        "detail"
    ]


def test_ray_local(sim_policy, monkeypatch):
    pytest.importorskip("ray", reason="Ray is optional (pip install ray); --ray is untested without it")
    eps = plan([TASK], 2, seed=0)
    monkeypatch.setenv(FAULT_ENV, f"crash1:{TASK}:{eps[1].seed}")
    run = evaluate(sim_policy["bundle"], eps, EvalConfig(max_steps=5, timeout_s=60), ray_address="local")
    local = evaluate(sim_policy["bundle"], eps[:1], EvalConfig(max_steps=5))
    assert run.backend == "ray:local" and len(run.results) == 2
    assert [(r.status, r.attempts) for r in run.results] == [("ok", 1), ("ok", 2)]
    assert [(e["event"], e["seed"]) for e in run.events] == [("crashed", eps[1].seed)]
    assert (run.results[0].tokens, run.results[0].steps) == (local.results[0].tokens, local.results[0].steps)
