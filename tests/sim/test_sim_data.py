"""MetaWorld tasks, demonstrations and the training targets of the sim policy (nora_edge.sim).

References: MetaWorld's own env and scripted experts (success flags), an independent per-episode loop for the
action chunks, NORA's published normalization formula in float64, and the runtime's post-processing chain
(``nora_edge.actions.postprocess``) as the inverse the bundle will apply.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld", reason="the sim extra (metaworld) is not installed: pip install '.[sim]'")

from nora_edge.actions.normalize import NormStats  # noqa: E402
from nora_edge.actions.postprocess import Chain  # noqa: E402
from nora_edge.errors import InputError  # noqa: E402
from nora_edge.export.lerobot_stats import build_chain  # noqa: E402
from nora_edge.sim import demos as D  # noqa: E402
from nora_edge.sim import train as T  # noqa: E402
from nora_edge.sim.metaworld_env import MAX_STEPS, TASKS, make_env  # noqa: E402
from nora_edge.sim.rollout import parse_export_args  # noqa: E402


def test_every_task_expert_succeeds_on_fresh_seeds():
    """The task set is only meaningful if MetaWorld's scripted expert solves each task on fresh goals."""
    solved = 0
    for task in TASKS:
        env = make_env(task)
        for seed in (3, 4):
            env.reset(seed)
            for _ in range(MAX_STEPS):
                if env.step(env.expert_action()).success:
                    solved += 1
                    break
    assert solved == 2 * len(TASKS)


def test_reset_is_seeded_and_goals_are_fresh():
    env = make_env("drawer-close-v3")
    a = env.reset(11)
    vec_a = env.env._last_rand_vec.copy()
    b = env.reset(11)
    assert np.array_equal(a, b) and a.shape == (224, 224, 3) and a.dtype == np.uint8
    vecs = []
    for s in range(12, 20):
        env.reset(s)
        vecs.append(env.env._last_rand_vec.copy())
    distinct = {tuple(np.round(v, 6)) for v in [vec_a, *vecs]}
    assert len(distinct) == 9  # every seed draws its own object position


def test_bad_actions_and_tasks_are_refused():
    env = make_env("drawer-close-v3")
    env.reset(0)
    with pytest.raises(InputError, match="action"):
        env.step(np.zeros(3))
    with pytest.raises(InputError, match="action"):
        env.step(np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(InputError, match="unknown MetaWorld task"):
        make_env("fly-to-the-moon-v3")
    with pytest.raises(InputError, match="seed"):
        env.reset(-1)


def _chunks_by_episode(demos: D.Demos, horizon: int) -> np.ndarray:
    """Independent reference: per episode, pad with the last action and slide a window."""
    out = []
    for t, e in dict.fromkeys(zip(demos.task.tolist(), demos.episode.tolist(), strict=True)):
        acts = demos.actions[(demos.task == t) & (demos.episode == e)]
        padded = np.concatenate([acts, np.repeat(acts[-1:], horizon - 1, axis=0)])
        out.extend(padded[i : i + horizon] for i in range(len(acts)))
    return np.stack(out)


def test_demos_cut_after_success_and_chunks_match_reference():
    task_index = list(TASKS).index("handle-press-v3")
    task, frames, actions, index, failed = D.collect_task(("handle-press-v3", task_index, 2, 0))
    assert failed == 0 and len(frames) == len(actions) == len(index)
    env = make_env("handle-press-v3")
    checked = 0
    for k in range(2):
        rows = actions[index[:, 0] == k]
        env.reset(D.episode_seed(0, task_index, k))
        first = None
        for t, a in enumerate(rows):  # replaying the stored actions reproduces the success step
            if env.step(a).success and first is None:
                first = t
        assert first is not None and len(rows) == first + D.TAIL_STEPS + 1
        checked += 1
    assert checked == 2
    demos = D.Demos(
        [task], frames, actions, np.zeros(len(actions), np.int64), index[:, 0], index[:, 1], {task: failed}
    )
    got, ref = D.action_chunks(demos, 5), _chunks_by_episode(demos, 5)
    assert got.shape == ref.shape == (len(actions), 5, 4)
    assert np.array_equal(got, ref)


def test_training_targets_invert_through_the_bundle_chain():
    """normalize(nora_actions(a)) run through the chain the sim bundle ships gives back MetaWorld's action."""
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.uniform(-1, 1, (400, 3)), rng.choice([-1.0, 1.0], (400, 1))], axis=1)
    acts = T.nora_actions(a)
    assert set(np.unique(acts[:, 3])) == {0.0, 1.0}  # NORA: 1 open, 0 closed
    assert np.array_equal(acts[:, 3] == 0.0, a[:, 3] == 1.0)  # MetaWorld +1 closes
    entry = T.norm_stats_entry(acts)
    x = T.normalize(acts, entry)
    q01, q99 = np.quantile(acts[:, :3], 0.01, axis=0), np.quantile(acts[:, :3], 0.99, axis=0)
    ref = np.clip(2 * (acts[:, :3] - q01) / (q99 - q01) - 1, -1, 1)  # NORA / OpenVLA BOUNDS_Q99
    assert np.allclose(x[:, :3], ref, atol=1e-12, rtol=0)
    gripper, mask = parse_export_args(T.EXPORT_ARGS)
    stats = NormStats("metaworld", np.array(entry["action"]["q01"]), np.array(entry["action"]["q99"]))
    built = build_chain(4, {"metaworld": stats}, gripper=tuple(gripper), mask=mask)
    chain = Chain.from_json(built.to_json(), InputError, "sim chain")
    back = chain.apply(x, stats)
    inside = np.all((a[:, :3] >= q01) & (a[:, :3] <= q99), axis=1)  # clipping loses the 1% tails, as in NORA
    assert inside.sum() > 350
    assert np.allclose(back[inside, :3], a[inside, :3], atol=1e-9)
    assert np.array_equal(back[:, 3], a[:, 3])
