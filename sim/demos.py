"""Demonstrations from MetaWorld's scripted experts, stored as the policy will see them.

Data flow: tasks x episodes --(one worker process per task: :func:`collect_task`)--> per step: the frame the
policy would see (``SimEnv.frame``, 224x224 RGB) and the expert's (4,) action; each episode is cut
``TAIL_STEPS`` after its first success, failed episodes are dropped (and counted) --:func:`collect`--> one
:class:`Demos` (frames (N, 224, 224, 3) uint8, actions (N, 4) float64 in MetaWorld units, task / episode / step
index per row) --``save``/``load``--> ``demos.npz``.

Training chunks (:func:`action_chunks`): the actions ``t .. t+H-1`` of the same episode, the last action repeated
past the episode's end (NORA-Long: H = 5). Episode seeds are ``seed * 1_000_003 + task_index * 10_007 + k``
with ``seed`` distinct from every evaluation seed (``sim.rollout`` draws from a disjoint range).
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nora_edge.errors import InputError

from .metaworld_env import MAX_STEPS, TASKS, check_task, make_env

TAIL_STEPS = 5  # steps kept after the first success (success does not always persist: door-open, push)
DEMO_SEED_BASE = 1 << 40  # demonstration episode seeds live above this; evaluation seeds below it


def episode_seed(seed: int, task_index: int, k: int) -> int:
    """Seed of the ``k``-th demonstration episode of task ``task_index`` in demo set ``seed``."""
    return DEMO_SEED_BASE + seed * 1_000_003 + task_index * 10_007 + k


@dataclass
class Demos:
    """A demonstration set.

    Attributes:
        tasks: task names; ``task`` indexes into it.
        frames: (N, S, S, 3) uint8 frames (S = 224).
        actions: (N, 4) float64 expert actions in MetaWorld units.
        task, episode, step: (N,) int64 per row.
        failed: expert episodes that did not succeed within MAX_STEPS (dropped), per task.
    """

    tasks: list[str]
    frames: np.ndarray
    actions: np.ndarray
    task: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    failed: dict[str, int]

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (npz, uncompressed: frames compress poorly and load faster raw) via a temp file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            tasks=np.array(self.tasks),
            frames=self.frames,
            actions=self.actions,
            task=self.task,
            episode=self.episode,
            step=self.step,
            failed=np.array([self.failed.get(t, 0) for t in self.tasks]),
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Demos:
        """Read a file written by :meth:`save`."""
        with np.load(Path(path)) as z:
            tasks = [str(t) for t in z["tasks"]]
            return cls(
                tasks,
                z["frames"],
                z["actions"],
                z["task"],
                z["episode"],
                z["step"],
                dict(zip(tasks, (int(x) for x in z["failed"]), strict=True)),
            )

    @property
    def episodes(self) -> int:
        """Number of distinct (task, episode) pairs."""
        return len(set(zip(self.task.tolist(), self.episode.tolist(), strict=True)))


def collect_task(args: tuple[str, int, int, int]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, int]:
    """Run ``episodes`` expert episodes of one task (in a worker process).

    Args:
        args: (task, task_index, episodes, seed).

    Returns:
        (task, frames (n, S, S, 3) uint8, actions (n, 4), (n, 2) int64 [episode, step], failed episodes).
    """
    task, task_index, episodes, seed = args
    env = make_env(task)
    frames, actions, index, failed = [], [], [], 0
    for k in range(episodes):
        env.reset(episode_seed(seed, task_index, k))
        ep_frames, ep_actions, first = [], [], None
        for t in range(MAX_STEPS):
            ep_frames.append(env.frame())
            action = env.expert_action()
            ep_actions.append(action)
            if env.step(action).success and first is None:
                first = t
            if first is not None and t >= first + TAIL_STEPS:
                break
        if first is None:
            failed += 1
            continue
        frames.extend(ep_frames)
        actions.extend(ep_actions)
        index.extend((k, t) for t in range(len(ep_frames)))
    return task, np.stack(frames), np.array(actions), np.array(index, dtype=np.int64), failed


def collect(tasks: list[str], episodes: int, seed: int = 0, workers: int = 2, progress: bool = True) -> Demos:
    """Expert demonstrations for ``tasks``, ``episodes`` each, one process per task (``workers`` at a time).

    Raises:
        InputError: unknown task, or episodes < 1.
    """
    for t in tasks:
        check_task(t)
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise InputError(f"episodes must be a positive int, got {episodes!r}")
    jobs = [(t, list(TASKS).index(t), episodes, seed) for t in tasks]
    ctx = mp.get_context("spawn")  # a fresh GL state per worker
    with ctx.Pool(min(workers, len(jobs))) as pool:
        results = {}
        for task, fr, ac, ix, failed in _progress(
            pool.imap_unordered(collect_task, jobs), len(jobs), progress
        ):
            results[task] = (fr, ac, ix, failed)
    parts = [results[t] for t in tasks]
    return Demos(
        tasks=list(tasks),
        frames=np.concatenate([p[0] for p in parts]),
        actions=np.concatenate([p[1] for p in parts]),
        task=np.concatenate([np.full(len(p[1]), i, dtype=np.int64) for i, p in enumerate(parts)]),
        episode=np.concatenate([p[2][:, 0] for p in parts]),
        step=np.concatenate([p[2][:, 1] for p in parts]),
        failed={t: results[t][3] for t in tasks},
    )


def _progress(it, total: int, enabled: bool):
    """Wrap an iterator of finished tasks in a rich progress bar."""
    if not enabled:
        yield from it
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("demonstrations (tasks)"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as bar:
        job = bar.add_task("demos", total=total)
        for item in it:
            bar.advance(job)
            yield item


def action_chunks(demos: Demos, horizon: int) -> np.ndarray:
    """(N, horizon, 4) chunks: row i holds actions i .. i+horizon-1 of its episode, the last one repeated."""
    n = len(demos.actions)
    out = np.empty((n, horizon, demos.actions.shape[1]))
    key = demos.task * (1 << 32) + demos.episode  # (N,) episode identity
    for i in range(n):
        for h in range(horizon):
            j = i + h
            out[i, h] = demos.actions[j] if j < n and key[j] == key[i] else out[i, h - 1]
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m nora_edge.sim.demos OUT.npz [--tasks a,b] [--episodes N] [--seed S] [--workers K]``."""
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m nora_edge.sim.demos", description=main.__doc__)
    ap.add_argument("out")
    ap.add_argument("--tasks", default="all", help="comma-separated MetaWorld tasks, or 'all'")
    ap.add_argument("--episodes", type=int, default=50, help="expert episodes per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    tasks = list(TASKS) if a.tasks == "all" else a.tasks.split(",")
    t0 = time.perf_counter()
    demos = collect(tasks, a.episodes, seed=a.seed, workers=a.workers)
    demos.save(a.out)
    print(
        f"{demos.episodes} episodes, {len(demos.actions)} frames in {time.perf_counter() - t0:.0f} s "
        f"(expert failures dropped: {demos.failed}) -> {a.out}"
    )


if __name__ == "__main__":
    main()
