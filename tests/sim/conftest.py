"""Session fixtures for the closed-loop evaluation tests: one tiny MetaWorld policy, as checkpoint and bundle.

``sim_policy`` collects one scripted-expert demonstration of drawer-close (sim.demos, spawn pool), trains the
"sim-small" preset for 2 steps (sim.train) and exports it with ``sim.train.EXPORT_ARGS`` (no validation):
~40 s on 2 cores, built once per session. The policy is untrained: tests check the harness, not success.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TASK = "drawer-close-v3"


@pytest.fixture(scope="session")
def sim_policy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"checkpoint": dir, "bundle": dir} of a 2-step-trained drawer-close policy."""
    pytest.importorskip("metaworld", reason="MetaWorld is an optional extra: pip install 'nora-edge[sim]'")
    from nora_edge.sim.demos import collect
    from nora_edge.sim.train import EXPORT_ARGS, TrainConfig, train_policy

    root = tmp_path_factory.mktemp("sim_policy")
    demos = collect([TASK], 1, seed=0, workers=1, progress=False).save(root / "demos.npz")
    ckpt = root / "ckpt"
    train_policy(demos, ckpt, TrainConfig(steps=2, batch=2, preset="sim-small"), progress=False)
    bundle = root / "bundle"
    cli = Path(sys.executable).with_name("nora-edge")
    subprocess.run([str(cli), "export", str(ckpt), "--out", str(bundle), "--no-validate", *EXPORT_ARGS],
                   check=True, capture_output=True)  # fmt: skip
    return {"checkpoint": ckpt, "bundle": bundle}
