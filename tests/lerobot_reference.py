"""NORA's README post-processing for LeRobot fine-tunes, written independently of nora_edge (float64), and a
LeRobot-format ``meta/stats.json`` writer for the tests that need one.

Formulas: LeRobot ``Unnormalize`` MIN_MAX (lerobot/common/policies/normalize.py), then declare-lab/nora
``inference/nora.py`` ``normalize_gripper_action(binarize=True)`` and ``invert_gripper_action`` on the last dim.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def nora_readme_actions(normalized: np.ndarray, mn: np.ndarray, mx: np.ndarray) -> np.ndarray:
    """(T, D) normalized -> robot actions as NORA's README does it (LeRobot MIN_MAX, gripper helpers)."""
    x = np.asarray(normalized, dtype=np.float64)
    a = (x + 1.0) / 2.0 * (mx - mn) + mn  # LeRobot Unnormalize, MIN_MAX
    g = a[..., -1]
    g = 2.0 * (g - 0.0) / (1.0 - 0.0) - 1.0  # normalize_gripper_action: [0, 1] -> [-1, 1]
    g = np.sign(g)  # binarize=True
    a[..., -1] = g * -1.0  # invert_gripper_action
    return a


def write_dataset(root: Path, dim: int, seed: int = 3, **override) -> tuple[Path, dict]:
    """A LeRobot dataset root with meta/stats.json (action + an observation feature, as LeRobot writes it);
    the gripper (last dim) spans [0, 1]. ``override`` replaces action fields (to plant bad statistics)."""
    rng = np.random.default_rng(seed)
    mn = rng.uniform(-1.0, 0.0, dim)
    mx = mn + rng.uniform(0.2, 1.5, dim)
    mn[-1], mx[-1] = 0.0, 1.0
    action = {
        "min": mn.tolist(),
        "max": mx.tolist(),
        "mean": ((mn + mx) / 2).tolist(),
        "std": ((mx - mn) / 4).tolist(),
        "count": [1234],
    }
    action.update(override)
    stats = {"action": action, "observation.state": {"min": [0.0] * 8, "max": [1.0] * 8}}
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "stats.json").write_text(json.dumps(stats))
    return root, action
