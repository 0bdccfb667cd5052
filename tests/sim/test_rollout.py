"""sim.rollout: actors for a bundle and a checkpoint, identical post-processing, episodes, malformed chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("metaworld", reason="MetaWorld is an optional extra: pip install 'nora-edge[sim]'")

from nora_edge.actions.postprocess import Chain
from nora_edge.bundle import Bundle
from nora_edge.errors import InputError
from nora_edge.sim.metaworld_env import make_env
from nora_edge.sim.rollout import (
    GRAY,
    BundleActor,
    CheckpointActor,
    Chunk,
    load_actor,
    parse_export_args,
    policy_kind,
    run_episode,
)

TASK = "drawer-close-v3"  # the sim_policy fixture's task


def test_policy_kind_and_bad_path(sim_policy, tmp_path):
    assert policy_kind(sim_policy["bundle"]) == "bundle"
    assert policy_kind(sim_policy["checkpoint"]) == "checkpoint"
    with pytest.raises(InputError, match="neither a bundle"):
        policy_kind(tmp_path)


def test_parse_export_args():
    assert parse_export_args(
        ["--gripper", "rescale", "--no-validate", "--mask", "1,1,0", "--gripper", "invert"]
    ) == (
        ["rescale", "invert"],
        [True, True, False],
    )
    with pytest.raises(InputError, match="--gripper has no value"):
        parse_export_args(["--gripper"])
    with pytest.raises(InputError, match="0/1"):
        parse_export_args(["--mask", "1,2"])


def test_checkpoint_chain_is_the_bundle_chain(sim_policy):
    """Both paths turn the same normalized chunk into the same actions (the export's manifest chain)."""
    actor = CheckpointActor(sim_policy["checkpoint"], threads=1)
    bundle = Bundle.load(sim_policy["bundle"], verify=False)
    manifest = json.loads((sim_policy["bundle"] / "manifest.json").read_text())
    assert actor.chain.to_json() == manifest["postprocess"]
    from nora_edge.sim.train import EXPORT_ARGS

    gripper, mask = parse_export_args(EXPORT_ARGS)
    assert [s["op"] for s in manifest["postprocess"][1:]] == [f"gripper_{g}" for g in gripper]
    assert manifest["postprocess"][0].get("mask") == mask
    chain = Chain.from_json(manifest["postprocess"], InputError, "postprocess")
    x = np.random.default_rng(0).uniform(-1.2, 1.2, size=(64, 5, 4))
    x[..., -1] = np.random.default_rng(1).choice([0.0, 1.0, 0.3], size=(64, 5))
    got = actor.chain.apply(x, actor.stats)
    want = chain.apply(x, chain.stats_for(bundle.norm_stats, None))
    np.testing.assert_array_equal(got, want)
    assert got.size == 64 * 5 * 4


def test_checkpoint_without_report_needs_gripper(sim_policy, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(sim_policy["checkpoint"], ckpt)
    (ckpt / "train_report.json").unlink()
    with pytest.raises(InputError, match="gripper"):
        CheckpointActor(ckpt)
    assert CheckpointActor(ckpt, gripper=["rescale"]).chain.to_json()[1] == {
        "op": "gripper_rescale",
        "dim": -1,
    }


@pytest.mark.parametrize("kind", ["bundle", "checkpoint"])
def test_episode_runs_and_is_reproducible(sim_policy, kind):
    actor = load_actor(sim_policy[kind], threads=1)
    env = make_env(TASK)
    r1 = run_episode(actor, env, TASK, 12345, max_steps=10, record_frames=True)
    run_episode(actor, env, TASK, 999, max_steps=3)  # another episode in between
    r2 = run_episode(actor, env, TASK, 12345, max_steps=10, record_frames=True)
    assert r1.status == "ok", r1.error
    assert isinstance(actor, BundleActor if kind == "bundle" else CheckpointActor)
    assert r1.chunks == len(r1.chunk_s) == len(r1.tokens) == len(r1.chunk_steps) >= 1
    assert r1.steps == sum(r1.chunk_steps) <= 10
    if r1.malformed:  # the untrained checkpoint may emit no action tokens: never executed, counted
        assert r1.stop == "malformed" and r1.chunk_steps[-1] == 0 and "malformed chunk" in r1.error
    else:
        assert r1.stop in ("success", "max_steps")
    assert r1.frames.shape == (r1.chunks, 224, 224, 3) and r1.frames.dtype == np.uint8
    assert (r1.tokens, r1.steps, r1.success) == (r2.tokens, r2.steps, r2.success)
    np.testing.assert_array_equal(r1.frames, r2.frames)
    json.dumps(r1.to_json())


class _Recorder:
    """Test double of a policy: records what it saw and returns fixed chunks (or a malformed one)."""

    label = "recorder"

    def __init__(self, chunks):
        self.chunks, self.seen = list(chunks), []

    def reset(self):
        pass

    def chunk(self, image, instruction):
        self.seen.append((image.copy(), instruction))
        return self.chunks.pop(0)


def test_blank_image_feeds_gray_frames_and_steps_every_action():
    env = make_env(TASK)
    zero = Chunk(np.zeros((5, 4)), tokens=7, repaired=1, forced=2)
    actor = _Recorder([zero, zero, zero])
    r = run_episode(actor, env, TASK, 3, max_steps=12, blank_image=True)
    assert (r.steps, r.chunks, r.chunk_steps, r.tokens) == (12, 3, [5, 5, 2], [7, 7, 7])
    assert (r.repaired, r.forced, r.malformed, r.status) == (3, 6, 0, "ok")
    assert all(img.shape == (224, 224, 3) and (img == GRAY).all() and text == env.instruction
               for img, text in actor.seen)  # fmt: skip


def test_malformed_chunk_ends_the_episode_without_executing():
    env = make_env(TASK)
    good = Chunk(np.zeros((5, 4)), tokens=5)
    actor = _Recorder([good, Chunk(None, tokens=3, malformed=True, reason="no action tokens")])
    r = run_episode(actor, env, TASK, 4, max_steps=50)
    assert (r.steps, r.chunks, r.malformed, r.success, r.stop, r.status) == (
        5,
        2,
        1,
        False,
        "malformed",
        "ok",
    )
    assert "no action tokens" in r.error and env.env.curr_path_length == 5


def test_an_exception_is_reported_as_error():
    env = make_env(TASK)
    r = run_episode(_Recorder([Chunk(np.full((5, 3), 0.0), tokens=1)]), env, TASK, 5, max_steps=5)
    assert (r.status, r.stop, r.success) == ("error", "error", False) and "InputError" in r.error
    with pytest.raises(InputError, match="max_steps"):
        run_episode(_Recorder([]), env, TASK, 5, max_steps=0)


def test_nora_fallback_executes_nora_zeros_and_counts_them(sim_policy):
    """``nora_fallback``: a malformed reference chunk becomes NORA's own fallback (zeros, unnormalized with the
    q01/q99 formula, then the gripper steps), executed and counted; without it the episode ends."""
    actor = CheckpointActor(sim_policy["checkpoint"], threads=1, nora_fallback=True)
    env = make_env(TASK)
    frame = env.reset(6)
    c = actor.chunk(frame, env.instruction)
    if not c.malformed:
        pytest.skip("the 2-step fixture policy decoded this frame; nothing to fall back from")
    stats = actor.stats
    mid = 0.5 * (0.0 + 1.0) * (stats.q99 - stats.q01) + stats.q01  # NORA: unnormalize(zeros), float64
    assert c.fallback and c.actions.shape == (5, 4)
    grip = -np.sign(2.0 * 0.0 - 1.0)  # gripper left as produced (mask), then rescale, binarize, invert
    assert np.allclose(c.actions[:, :3], mid[:3], atol=1e-12) and (c.actions[:, 3] == grip).all()
    r = run_episode(actor, env, TASK, 6, max_steps=10)
    assert r.malformed >= 1 and r.steps == 10 and r.stop != "malformed"
