"""The observations a policy actually meets in closed loop, recorded once and replayed by benchmarks.

Data flow: a bundle (or checkpoint) --``rollout.EpisodeRunner`` (the evaluation's own worker code, one process)-->
MetaWorld episodes of the planned (task, seed)s (``evaluate.plan``) with ``record_frames`` --> the frame seen at
every policy call (N, H, W, 3) uint8, with its task, instruction, episode seed and call index --> one ``.npz``
(atomic write) --:func:`load_inputs`--> :class:`ClosedLoopInputs`, e.g. for ``bench/multitoken_bench.py``: plain
vs multi-token decoding on exactly these inputs, side by side in one process.

Why replaying is enough for a lossless decoder: a decoder whose ids equal plain greedy's on every recorded frame
produces the same actions, hence the same next frames, so the recorded inputs are the closed loop it would see.

    python -m nora_edge.sim.closed_loop_inputs BUNDLE --calls 500 --out out/closed_loop_inputs.npz
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nora_edge.atomic import write_bytes_atomic
from nora_edge.errors import InputError

FIELDS = ("frames", "tasks", "instructions", "seeds", "calls")


@dataclass(frozen=True)
class ClosedLoopInputs:
    """Recorded policy inputs.

    Attributes:
        frames: (N, H, W, 3) uint8, the frame of each policy call in episode order.
        tasks, instructions: (N,) str, the task and the instruction of each call.
        seeds: (N,) int64, the episode seed of each call; calls: (N,) int64, the call's index in its episode.
        policy: the policy path that produced them.
    """

    frames: np.ndarray
    tasks: np.ndarray
    instructions: np.ndarray
    seeds: np.ndarray
    calls: np.ndarray
    policy: str

    def __post_init__(self) -> None:
        n = len(self.frames)
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise InputError(
                f"frames must be (N, H, W, 3) uint8, got {self.frames.shape} {self.frames.dtype}"
            )
        for name in FIELDS[1:]:
            if len(getattr(self, name)) != n:
                raise InputError(f"{name} has {len(getattr(self, name))} entries for {n} frames")

    def __len__(self) -> int:
        return len(self.frames)


def record_inputs(
    policy: str | Path,
    tasks: str | list[str],
    calls: int,
    seed: int = 0,
    max_steps: int = 200,
    max_episodes: int = 200,
    threads: int = 1,
    log=print,
) -> ClosedLoopInputs:
    """Run closed-loop episodes (tasks round-robin, ``evaluate.plan`` seeds) until ``calls`` policy calls are seen.

    Args:
        policy: bundle or checkpoint dir (``rollout.load_actor``).
        tasks: MetaWorld task names ("all" or a list). calls: policy calls to record (the last episode is kept whole, so N >= calls).
        seed: the evaluation seed (``evaluate.plan``); max_steps: env steps per episode at most;
        max_episodes: give up (InputError) when this many episodes did not reach ``calls``.

    Raises:
        InputError: bad counts, or an episode ended in an error (its text).
    """
    from .evaluate import parse_tasks, plan
    from .rollout import EpisodeRunner

    tasks = parse_tasks(tasks)
    for name, v in (("calls", calls), ("max_steps", max_steps), ("max_episodes", max_episodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive int, got {v!r}")
    runner = EpisodeRunner(str(policy), None, threads, None)
    per_task = -(-max_episodes // max(1, len(tasks)))
    episodes = plan(list(tasks), per_task, seed)
    # round-robin over the tasks: the plan is task-major
    order = sorted(episodes, key=lambda e: (e.k, tasks.index(e.task)))[:max_episodes]
    frames, meta, t0 = [], [], time.perf_counter()
    from .metaworld_env import make_env

    for ep in order:
        res = runner.run(ep, 0, max_steps, False, True)
        if res.status != "ok":
            raise InputError(f"episode {ep.task} seed {ep.seed} failed: {res.error}")
        instruction = make_env(ep.task).instruction
        if res.frames is None:  # an ok episode calls the policy at least once (run_episode)
            raise InputError(f"episode {ep.task} seed {ep.seed} recorded no frames")
        got = res.frames
        frames.append(got)
        meta += [(ep.task, instruction, ep.seed, i) for i in range(len(got))]
        log(f"  {ep.task} seed {ep.seed}: {len(got)} calls, success {res.success} ({len(meta)}/{calls}, "
            f"{time.perf_counter() - t0:.0f} s)")  # fmt: skip
        if len(meta) >= calls:
            break
    else:
        raise InputError(f"{len(order)} episodes gave {len(meta)} policy calls, fewer than {calls}")
    t, ins, s, c = zip(*meta, strict=True)
    return ClosedLoopInputs(
        np.concatenate(frames),
        np.array(t),
        np.array(ins),
        np.array(s, np.int64),
        np.array(c, np.int64),
        str(policy),
    )


def save_inputs(inputs: ClosedLoopInputs, path: str | Path) -> Path:
    """Write ``inputs`` to one compressed ``.npz`` (atomic)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: getattr(inputs, k) for k in FIELDS}, policy=np.array(inputs.policy))
    return write_bytes_atomic(Path(path), buf.getvalue())


def load_inputs(path: str | Path) -> ClosedLoopInputs:
    """Read a file written by :func:`save_inputs` (InputError naming a missing file or field)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"closed-loop inputs not found: {path} (python -m nora_edge.sim.closed_loop_inputs)")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in (*FIELDS, "policy") if k not in data.files]
        if missing:
            raise InputError(f"{path} lacks {missing}")
        return ClosedLoopInputs(**{k: data[k] for k in FIELDS}, policy=str(data["policy"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="closed_loop_inputs", description=__doc__.splitlines()[0])
    ap.add_argument("policy", type=Path, help="bundle or checkpoint dir")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--tasks", default="all", help="'all' or comma-separated MetaWorld tasks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=200)
    args = ap.parse_args(argv)
    try:
        inputs = record_inputs(args.policy, args.tasks, args.calls, args.seed, args.max_steps)
        path = save_inputs(inputs, args.out)
    except InputError as e:
        print(f"closed_loop_inputs: {e}", file=sys.stderr)
        return 2
    print(
        f"{len(inputs)} policy inputs from {len(set(zip(inputs.tasks, inputs.seeds, strict=True)))} episodes: {path}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
