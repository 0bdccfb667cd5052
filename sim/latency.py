"""Closed-loop episodes under a simulated inference latency: what success looks like when a chunk arrives
``latency_steps`` control steps after the frame it was computed from.

Data flow (:func:`run_episode_delayed`; the asynchronous execution of ``nora_edge.async_chunks``, in env steps):
  reset --> the first chunk, from the first frame, before the episode clock starts (a robot waits for its first
  plan) --> execute its actions one per env step; when at most ``latency_steps`` actions are left and nothing is
  in flight, the policy sees the current frame and its chunk is scheduled to arrive ``latency_steps`` steps later
  --> when the queue is empty: the arrived chunk becomes the queue (its observation age in steps is recorded), or,
  when it has not arrived yet, the robot holds (zero motion, the last gripper command) for one step, counted in
  ``hold_steps`` --> stop at the first success or ``max_steps`` (hold steps count: the clock runs while waiting).

The chunk is computed when its frame is taken (a simulation needs no real waiting); only its use is delayed. With
``latency_steps`` 0 the plain synchronous loop (``rollout.run_episode``) runs instead. Malformed chunks end the
episode as in the synchronous loop, when they would have arrived.
"""

from __future__ import annotations

import traceback

import numpy as np

from nora_edge.errors import InputError

from .rollout import EpisodeResult, call_actor


def hold_action(last: np.ndarray) -> np.ndarray:
    """MetaWorld's (dx, dy, dz, gripper) hold: no motion, the last gripper command kept."""
    out = np.zeros_like(last)
    out[-1] = last[-1]
    return out


def run_episode_delayed(
    actor,
    env,
    task: str,
    seed: int,
    max_steps: int,
    latency_steps: int,
    blank_image: bool = False,
    record_frames: bool = False,
) -> EpisodeResult:
    """One episode with chunks arriving ``latency_steps`` env steps after their frame (module docstring).

    Returns:
        :class:`~nora_edge.sim.rollout.EpisodeResult` with ``hold_steps`` and ``obs_age_steps`` (per chunk, the
        steps between its frame and its first executed action; 0 for the first chunk).
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise InputError(f"max_steps must be a positive int, got {max_steps!r}")
    if isinstance(latency_steps, bool) or not isinstance(latency_steps, int) or latency_steps < 1:
        raise InputError(f"latency_steps must be an int >= 1, got {latency_steps!r}")
    res = EpisodeResult(task, int(seed), policy=getattr(actor, "label", ""))
    frames = []

    def call(frame: np.ndarray):
        return call_actor(actor, frame, env.instruction, res, blank_image, frames if record_frames else None)

    try:
        actor.reset()
        pending = (0, call(env.reset(int(seed))), 0)  # (arrival step, chunk, observation step)
        queue: list[np.ndarray] = []
        last, done, executing = None, 0, False
        while res.steps < max_steps and not res.success:
            if not queue:
                if pending is None:  # nothing in flight: ask now
                    pending = (res.steps + latency_steps, call(env.frame()), res.steps)
                arrival, c, obs_step = pending
                if arrival > res.steps:  # not there yet: hold for one step
                    step = env.step(hold_action(last))
                    res.steps += 1
                    res.hold_steps += 1
                    if step.success:
                        res.success, res.stop = True, "success"
                    continue
                pending = None
                if executing:
                    res.chunk_steps.append(done)
                if c.malformed and not c.fallback:
                    res.chunk_steps.append(0)
                    executing = False
                    res.stop, res.error = "malformed", f"malformed chunk {res.chunks}: {c.reason}"
                    break
                queue, done, executing = list(c.actions), 0, True
                res.obs_age_steps.append(res.steps - obs_step)
            last = queue.pop(0)
            step = env.step(last)
            res.steps += 1
            done += 1
            if step.success:
                res.success, res.stop = True, "success"
                break
            if pending is None and len(queue) <= latency_steps and res.steps < max_steps:
                pending = (res.steps + latency_steps, call(env.frame()), res.steps)
        if executing:
            res.chunk_steps.append(done)
        res.chunk_steps += [0] * (res.chunks - len(res.chunk_steps))  # computed, never executed: 0 actions
    except Exception as e:  # noqa: BLE001 - any failure ends the episode and is reported, never hidden
        res.status, res.stop = "error", "error"
        res.error = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3).splitlines()[-1]}"
    if record_frames and frames:
        res.frames = np.stack(frames)
    return res
