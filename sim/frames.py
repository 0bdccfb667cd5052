"""Held-out MetaWorld observations for quantization calibration and fidelity reports.

Data flow: tasks x episodes, episode seeds from :data:`FRAME_SEED_BASE` (disjoint from demonstration seeds,
>= 2**40, and from evaluation seeds, below 2**39) --scripted expert rollout--> the frame at every chunk start
(every ``HORIZON`` steps: where the policy looks) + the task's instruction --:func:`write_sample_dir`-->
``DIR/instructions.jsonl`` + ``DIR/NNNN.npy`` (the format ``nora-edge quantize --calibration`` and
``export.quantize.load_calibration_dir`` read).

The expert's states are what a good policy visits, so these frames are the distribution the bundle sees in a
successful closed-loop run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nora_edge.errors import InputError

from .metaworld_env import MAX_STEPS, TASKS, check_task, make_env

FRAME_SEED_BASE = (
    1 << 39
)  # between evaluation seeds (< 2**39, sim.evaluate) and demonstration seeds (>= 2**40)
HORIZON = 5


def policy_view_samples(tasks: list[str], per_task: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """``per_task`` (frame, instruction) pairs per task from expert rollouts at chunk starts.

    Frames are taken round-robin across episodes (one episode gives up to ``MAX_STEPS / HORIZON`` frames), so
    they cover each phase of the task.

    Returns:
        list of ((224, 224, 3) uint8 frame, instruction), ``len(tasks) * per_task`` long, grouped by task.
    """
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
        raise InputError(f"per_task must be a positive int, got {per_task!r}")
    out: list[tuple[np.ndarray, str]] = []
    for ti, task in enumerate(tasks):
        env = make_env(check_task(task))
        frames: list[np.ndarray] = []
        episode = 0
        while len(frames) < per_task:
            env.reset(FRAME_SEED_BASE + seed * 1_000_003 + list(TASKS).index(task) * 10_007 + episode)
            episode += 1
            ep: list[np.ndarray] = []
            for t in range(MAX_STEPS):
                if t % HORIZON == 0:
                    ep.append(env.frame())
                if env.step(env.expert_action()).success:
                    break
            # spread the picks over the episode: every k-th chunk start, offset by the episode index
            k = max(1, len(ep) // 4)
            frames.extend(ep[(episode + ti) % k :: k][: per_task - len(frames)])
        out.extend((f, TASKS[task]) for f in frames)
    return out


def write_sample_dir(out: str | Path, samples: list[tuple[np.ndarray, str]]) -> Path:
    """Write ``samples`` as ``instructions.jsonl`` + ``NNNN.npy`` (index written last)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (frame, text) in enumerate(samples):
        name = f"{i:04d}.npy"
        np.save(root / name, frame, allow_pickle=False)
        lines.append(json.dumps({"image": name, "instruction": text}))
    tmp = root / "instructions.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(root / "instructions.jsonl")
    return root
