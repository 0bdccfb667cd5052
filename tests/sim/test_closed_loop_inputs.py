"""sim.closed_loop_inputs on real MetaWorld episodes of the tiny sim policy: the recorded frames are the frames the
evaluation's own episode loop feeds the policy (same seeds, rerun independently through rollout.run_episode), and
they survive the file round trip bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld", reason="MetaWorld is an optional extra: pip install 'nora-edge[sim]'")

from nora_edge.errors import InputError  # noqa: E402
from nora_edge.sim import closed_loop_inputs as cli  # noqa: E402

TASK = "drawer-close-v3"


def test_recorded_frames_are_the_closed_loop_inputs_and_round_trip(sim_policy, tmp_path):
    from nora_edge.sim.metaworld_env import configure_gl, make_env
    from nora_edge.sim.rollout import load_actor, run_episode

    inputs = cli.record_inputs(sim_policy["bundle"], [TASK], calls=3, max_steps=12, log=lambda s: None)
    assert len(inputs) >= 3 and set(inputs.tasks) == {TASK}
    # independently: the same episodes through the rollout loop with frame recording
    configure_gl()
    actor, env = load_actor(str(sim_policy["bundle"]), None, 1), make_env(TASK)
    compared = 0
    for seed in dict.fromkeys(inputs.seeds.tolist()):
        res = run_episode(actor, env, TASK, seed, 12, record_frames=True)
        mine = inputs.frames[inputs.seeds == seed]
        assert mine.shape == res.frames.shape and np.array_equal(mine, res.frames)
        assert inputs.calls[inputs.seeds == seed].tolist() == list(range(len(res.frames)))
        compared += len(mine)
    assert compared == len(inputs)
    assert set(inputs.instructions) == {env.instruction}
    back = cli.load_inputs(cli.save_inputs(inputs, tmp_path / "in.npz"))
    for name in cli.FIELDS:
        assert np.array_equal(getattr(back, name), getattr(inputs, name)), name
    assert back.policy == inputs.policy


def test_bad_arguments_and_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="calls must be a positive int"):
        cli.record_inputs(tmp_path, [TASK], calls=0)
    with pytest.raises(InputError, match="nope"):
        cli.record_inputs(tmp_path, ["nope"], calls=1)
    with pytest.raises(InputError, match="not found"):
        cli.load_inputs(tmp_path / "none.npz")
    np.savez(tmp_path / "bad.npz", frames=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(InputError, match="lacks"):
        cli.load_inputs(tmp_path / "bad.npz")
    with pytest.raises(InputError, match="uint8"):
        cli.ClosedLoopInputs(np.zeros((1, 2, 2, 3)), *([np.zeros(1)] * 4), "p")
