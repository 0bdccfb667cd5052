"""The MetaWorld policy committed under policies/: NORA's checkpoint layout, its record, and that it acts.

The closed-loop checks run the PyTorch reference (``CheckpointActor``: ReferencePolicy + the chain its bundle
ships) with one torch thread, so the episodes are deterministic; the reference is MetaWorld's own success flag.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("metaworld", reason="the sim extra (metaworld) is not installed: pip install '.[sim]'")

from nora_edge.sim.evaluate import eval_seed  # noqa: E402
from nora_edge.sim.metaworld_env import TASKS, make_env  # noqa: E402
from nora_edge.sim.rollout import CheckpointActor, run_episode  # noqa: E402

POLICY = Path(__file__).resolve().parents[2] / "policies" / "metaworld-nora-long"
# episodes of `nora-edge eval --seed 0` (eval_seed(0, task, k)) on which the committed policy succeeds at
# 1 thread; the blank-image run of the same episodes must do worse
TASK, EPISODES = "window-open-v3", 3  # drawer-close is solved blind (push forward)


def test_layout_size_and_record():
    files = {p.name for p in POLICY.iterdir()}
    assert {"config.json", "model.safetensors", "norm_stats.json", "tokenizer.json", "fast"} <= files
    assert {"train_report.json", "loss.png", "README.md"} <= files
    size = sum(p.stat().st_size for p in POLICY.rglob("*") if p.is_file())
    assert size <= 20e6, f"committed policy is {size / 1e6:.1f} MB (limit 20 MB)"
    report = json.loads((POLICY / "train_report.json").read_text())
    assert report["command"].startswith("python -m nora_edge.sim.train ")
    assert report["tasks"] == list(TASKS)
    fast = json.loads((POLICY / "fast" / "processor_config.json").read_text())
    assert fast["time_horizon"] == 5 and fast["action_dim"] == 4
    stats = json.loads((POLICY / "norm_stats.json").read_text())
    assert list(stats) == ["metaworld"] and len(stats["metaworld"]["action"]["q01"]) == 4


@pytest.fixture(scope="module")
def actor():
    return CheckpointActor(POLICY, threads=1)


def test_the_policy_acts_and_needs_its_eyes(actor):
    env = make_env(TASK)
    seeds = [eval_seed(0, TASK, k) for k in range(EPISODES)]
    seen = [run_episode(actor, env, TASK, s, 150) for s in seeds]
    blind = [run_episode(actor, env, TASK, s, 150, blank_image=True) for s in seeds]
    assert [r.status for r in seen + blind] == ["ok"] * (2 * EPISODES)
    assert sum(r.success for r in seen) >= 2, [r.stop for r in seen]
    assert sum(r.success for r in blind) < sum(r.success for r in seen)
