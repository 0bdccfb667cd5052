"""sim.latency: closed-loop episodes with a simulated inference latency, on the real MetaWorld env and the session's
tiny policy bundle. The executed action sequence, the hold steps, the frames the policy saw and the observation ages
are checked against the schedule restated here step by step."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld", reason="MetaWorld is an optional extra: pip install 'nora-edge[sim]'")

from nora_edge.errors import InputError
from nora_edge.sim.evaluate import EvalConfig
from nora_edge.sim.latency import hold_action, run_episode_delayed
from nora_edge.sim.metaworld_env import make_env
from nora_edge.sim.rollout import BundleActor

TASK = "drawer-close-v3"
MAX_STEPS = 40


class RecordingEnv:
    """The real env, recording every executed action and the step count at every frame render."""

    def __init__(self, env) -> None:
        self.env, self.actions, self.frame_steps = env, [], []

    @property
    def instruction(self) -> str:
        return self.env.instruction

    def reset(self, seed: int):
        self.actions.clear()
        self.frame_steps.clear()
        self.frame_steps.append(0)
        return self.env.reset(seed)

    def frame(self):
        self.frame_steps.append(len(self.actions))
        return self.env.frame()

    def step(self, action):
        self.actions.append(np.array(action, copy=True))
        return self.env.step(action)


class RecordingActor:
    """The real bundle actor, keeping every chunk it returned."""

    def __init__(self, actor) -> None:
        self.actor, self.chunks, self.label = actor, [], "recorded"

    def reset(self) -> None:
        self.actor.reset()
        self.chunks.clear()

    def chunk(self, image, instruction):
        c = self.actor.chunk(image, instruction)
        self.chunks.append(c)
        return c


def schedule(chunks, latency: int, max_steps: int, n_steps: int):
    """The executed actions, hold steps, request steps and observation ages the module docstring describes."""
    steps, queue, pending, k, out, holds, requests, ages, last = 0, [], (0, 0, 0), 1, [], 0, [0], [], None
    while steps < min(max_steps, n_steps):
        if not queue:
            if pending is None:
                pending = (steps + latency, k, steps)
                requests.append(steps)
                k += 1
            if pending[0] > steps:
                out.append(hold_action(last))
                steps, holds = steps + 1, holds + 1
                continue
            queue, ages, pending = list(chunks[pending[1]].actions), [*ages, steps - pending[2]], None
        last = queue.pop(0)
        out.append(last)
        steps += 1
        if pending is None and len(queue) <= latency and steps < max_steps:
            pending = (steps + latency, k, steps)
            requests.append(steps)
            k += 1
    return out, holds, requests, ages


@pytest.mark.parametrize("latency", [2, 7])
def test_delayed_episode_follows_the_schedule(sim_policy, latency):
    actor = RecordingActor(BundleActor(sim_policy["bundle"], threads=1))
    env = RecordingEnv(make_env(TASK))
    res = run_episode_delayed(actor, env, TASK, 3, MAX_STEPS, latency)
    assert res.status == "ok", res.error
    horizon = len(actor.chunks[0].actions)
    want, holds, requests, ages = schedule(actor.chunks, latency, MAX_STEPS, res.steps)
    assert len(env.actions) == len(want) == res.steps
    for i, (a, b) in enumerate(zip(env.actions, want, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {i}")
    assert res.hold_steps == holds and res.obs_age_steps == ages
    assert env.frame_steps == requests[: len(env.frame_steps)] and len(actor.chunks) == len(env.frame_steps)
    assert (
        res.chunks == len(actor.chunks) == len(res.chunk_steps)
        and sum(res.chunk_steps) == res.steps - res.hold_steps
    )
    if latency >= horizon:  # the next chunk is requested after the first action and still arrives late
        assert holds > 0 and max(ages) == latency
    else:  # requested with `latency` actions left: it arrives as the queue empties
        assert holds == 0 and ages[1:] and set(ages[1:]) == {latency}


def test_bad_latency_is_refused(sim_policy):
    with pytest.raises(InputError, match="latency_steps must be an int >= 1"):
        run_episode_delayed(None, None, TASK, 0, 10, 0)
    with pytest.raises(InputError, match="latency_steps must be an int >= 0"):
        EvalConfig(latency_steps=-1)


def test_eval_cli_runs_with_a_simulated_latency(sim_policy, tmp_path):
    """--latency-steps goes through the worker processes into every episode and the report."""
    import json

    from typer.testing import CliRunner

    from nora_edge.cli import app

    args = ["eval", str(sim_policy["bundle"]), "--env", "metaworld", "--tasks", TASK, "--episodes", "1",
            "--seed", "7", "--max-steps", "20", "--latency-steps", "3", "--out", str(tmp_path)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    (run,) = report["runs"]
    assert run["config"]["latency_steps"] == 3
    (ep,) = run["episodes"]
    assert ep["status"] == "ok" and ep["obs_age_steps"] and ep["obs_age_steps"][0] == 0
    assert (
        "Simulated latency: each chunk after the first arrives 3 env steps"
        in (tmp_path / "report.md").read_text()
    )
