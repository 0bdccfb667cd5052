"""Closed-loop rollouts: one policy (a bundle or a checkpoint) drives one MetaWorld task for one episode.

Data flow: policy path --:func:`load_actor`--> :class:`BundleActor` (``nora_edge.policy.NoraPolicy``, torch-free,
``forced_tokens="flag"`` so repaired/forced tokens are counted, never raised) or :class:`CheckpointActor`
(``export.reference.ReferencePolicy``, torch) --``chunk(frame, instruction)``--> :class:`Chunk` ((T, D) actions,
tokens, repaired/forced counts, malformed flag) --:func:`run_episode`: reset env (seed) and actor; at each chunk
start render the frame (or a constant gray frame: the vision ablation), get T actions, execute them one by one,
stop at the first success--> :class:`EpisodeResult`.

Identical post-processing: a bundle applies its manifest's ``postprocess`` chain
(``nora_edge.actions.postprocess.Chain``). A checkpoint's normalized chunk (``ReferenceResult.normalized``) goes
through the chain the export would build (``export.lerobot_stats.build_chain``: q01_q99 unnormalize by the
checkpoint's norm stats, optional ``--mask``, then the ``--gripper`` steps) from the checkpoint's
``train_report.json`` ``export_args`` (``sim.train.EXPORT_ARGS``), or the caller's ``gripper=`` / ``mask=``.

Malformed chunks: the reference's greedy output may not decode into (T, D) (``ReferenceResult.well_formed``
False; NORA would silently send the q01..q99 midpoint); a bundle raises DetokenizationError. Either way the chunk
is never executed: the episode ends as a failure, ``stop="malformed"``, ``malformed=1`` and the reason in
``error``. Status "ok" means the episode ran to a verdict; "error" means an exception ended it (text in
``error``); "crashed" / "hung" are set by ``sim.evaluate`` when the worker process died or timed out.

Workers (local processes or Ray actors, ``sim.evaluate``) each hold one :class:`EpisodeRunner`: the actor loaded
once, envs from ``make_env`` (one per task per process), and the test-only fault seam (:func:`inject_fault`,
``NORA_EDGE_EVAL_FAULT="KIND:TASK:SEED"``).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nora_edge import names
from nora_edge.errors import DetokenizationError, InputError

FAULT_ENV = "NORA_EDGE_EVAL_FAULT"  # test-only fault injection, see sim.evaluate
FAULT_KINDS = ("crash", "hang", "crash1", "hang1")
STATUSES = ("ok", "crashed", "hung", "error")
STOPS = ("success", "max_steps", "malformed", "error")
GRAY = 128  # the blank frame's value (vision ablation)


@dataclass
class Chunk:
    """One policy call.

    Attributes:
        actions: (T, D) float64 robot actions, or None when malformed.
        tokens: generated ids in the chunk.
        repaired, forced: tokens the automaton substituted / emitted against the model's choice to end.
        malformed: the output did not decode into (T, D) (never executed); reason: why.
    """

    actions: np.ndarray | None
    tokens: int
    repaired: int = 0
    forced: int = 0
    malformed: bool = False
    reason: str = ""
    fallback: bool = False  # malformed, and ``actions`` hold NORA's fallback (executed, counted)


@dataclass
class EpisodeResult:
    """What one episode did.

    Attributes:
        task, seed: the episode; policy: the actor's label.
        success: MetaWorld's success at any executed step (the episode stops at the first).
        steps, chunks: env steps executed, policy calls made.
        chunk_s: (chunks,) wall seconds per policy call; chunk_steps: (chunks,) actions executed from each.
        tokens: (chunks,) generated ids per chunk.
        repaired, forced, malformed: totals over the episode.
        status: "ok" | "crashed" | "hung" | "error"; stop: "success" | "max_steps" | "malformed" | "error".
        error: the exception / malformed reason / worker failure text ("" when none).
        attempts: how many workers ran it (2 after a crash/hang rerun).
        frames: (chunks, H, W, 3) uint8 frames at chunk starts (only with ``record_frames``), else None.
        hold_steps: steps the robot held still waiting for a late chunk (simulated latency, ``sim.latency``).
        obs_age_steps: per executed chunk, steps between its frame and its first action (simulated latency;
            empty in the synchronous loop, where it is always 0). With a latency, a chunk computed but never
            executed (the episode ended first) has 0 in ``chunk_steps``.
    """

    task: str
    seed: int
    policy: str = ""
    success: bool = False
    steps: int = 0
    chunks: int = 0
    chunk_s: list[float] = field(default_factory=list)
    chunk_steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    repaired: int = 0
    forced: int = 0
    malformed: int = 0
    status: str = "ok"
    stop: str = "max_steps"
    error: str = ""
    attempts: int = 1
    frames: np.ndarray | None = None
    hold_steps: int = 0
    obs_age_steps: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        """Every field but ``frames`` (JSON-ready)."""
        d = {k: v for k, v in self.__dict__.items() if k != "frames"}
        return json.loads(json.dumps(d))


class BundleActor:
    """A bundle on onnxruntime (``NoraPolicy``, ``forced_tokens="flag"``)."""

    kind = "bundle"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from nora_edge.policy import NoraPolicy

        self.path = Path(path)
        self.label = self.path.name
        self.policy = NoraPolicy.load(self.path, threads=threads, forced_tokens="flag")

    def reset(self) -> None:
        """Forget queued actions (episode start)."""
        self.policy.reset()

    def chunk(self, image: np.ndarray, instruction: str) -> Chunk:
        """One chunk; an undecodable output is returned malformed, never raised."""
        try:
            out = self.policy.run_chunk(image, instruction)
        except DetokenizationError as e:
            ids = self.policy.last_ids
            return Chunk(None, 0 if ids is None else int(ids.size), malformed=True, reason=str(e))
        return Chunk(out.actions, int(out.ids.size), out.repaired, out.forced)


def parse_export_args(args: list[str]) -> tuple[list[str], list[bool] | None]:
    """``nora-edge export`` options -> (gripper steps, mask); other options are ignored.

    Raises:
        InputError: an option without its value or a mask that is not 0/1 per dimension.
    """
    gripper: list[str] = []
    mask = None
    it = iter(args)
    for a in it:
        if a in ("--gripper", "--mask"):
            v = next(it, None)
            if v is None:
                raise InputError(f"export_args: {a} has no value in {args!r}")
            if a == "--gripper":
                gripper.append(v)
            else:
                bits = v.split(",")
                if not all(b.strip() in ("0", "1") for b in bits):
                    raise InputError(f"export_args: --mask must be 0/1 per dimension, got {v!r}")
                mask = [b.strip() == "1" for b in bits]
    return gripper, mask


class CheckpointActor:
    """A NORA-format checkpoint on torch (``ReferencePolicy``) + the bundle's post-processing chain."""

    kind = "checkpoint"

    def __init__(
        self,
        path: str | Path,
        gripper: list[str] | None = None,
        mask: list[bool] | None = None,
        threads: int | None = None,
        nora_fallback: bool = False,
    ) -> None:
        import torch

        from nora_edge.export.lerobot_stats import build_chain
        from nora_edge.export.reference import ReferencePolicy

        if threads:
            torch.set_num_threads(int(threads))
        self.path = Path(path)
        self.label = self.path.name
        self.nora_fallback = nora_fallback
        report = self.path / "train_report.json"
        if gripper is None and report.is_file():
            gripper, mask = parse_export_args(
                json.loads(report.read_text(encoding="utf-8")).get("export_args", [])
            )
        if gripper is None:
            raise InputError(
                f"{self.path}: no train_report.json with export_args; pass gripper=[...] (e.g. ['rescale', "
                "'binarize', 'invert'], or [] for none) so the checkpoint's actions match its bundle's"
            )
        self.policy = ReferencePolicy.from_pretrained(self.path)
        ckpt = self.policy.checkpoint
        self.chain = build_chain(ckpt.action_dim, ckpt.norm_stats, gripper=tuple(gripper), mask=mask)
        self.stats = self.chain.stats_for(ckpt.norm_stats, None)

    def reset(self) -> None:
        """Nothing is queued between calls."""

    def chunk(self, image: np.ndarray, instruction: str) -> Chunk:
        """One chunk; a not-well-formed reference output is returned malformed (never executed)."""
        import torch

        with torch.inference_mode():
            r = self.policy.predict_action_chunk(image, instruction)
        if not r.well_formed:
            if self.nora_fallback:  # NORA's own behaviour: zeros, unnormalized and post-processed, executed
                zeros = np.zeros_like(r.normalized)
                return Chunk(self.chain.apply(zeros, self.stats), int(r.ids.size), malformed=True,
                             reason=str(r.reason), fallback=True)  # fmt: skip
            return Chunk(None, int(r.ids.size), malformed=True, reason=str(r.reason))
        return Chunk(self.chain.apply(r.normalized, self.stats), int(r.ids.size))


def policy_kind(path: str | Path) -> str:
    """ "bundle" (``manifest.json``) or "checkpoint" (``config.json``).

    Raises:
        InputError: ``path`` is neither.
    """
    p = Path(path)
    if (p / "manifest.json").is_file():
        return "bundle"
    if (p / names.CONFIG).is_file():
        return "checkpoint"
    raise InputError(f"{p}: neither a bundle (manifest.json) nor a checkpoint (config.json)")


def load_actor(
    path: str | Path,
    gripper: list[str] | None = None,
    threads: int | None = None,
    nora_fallback: bool = False,
):
    """A :class:`BundleActor` or :class:`CheckpointActor` for ``path`` (see :func:`policy_kind`)."""
    if policy_kind(path) == "bundle":
        return BundleActor(path, threads)
    return CheckpointActor(path, gripper, threads=threads, nora_fallback=nora_fallback)


def call_actor(actor, frame: np.ndarray, instruction: str, res: EpisodeResult, blank_image: bool, frames):
    """One policy call on ``frame`` (a gray frame instead with ``blank_image``): its time, tokens and token counts
    go into ``res``; the frame is appended to ``frames`` unless that is None. Returns the :class:`Chunk`."""
    if frames is not None:
        frames.append(frame)
    seen = np.full_like(frame, GRAY) if blank_image else frame
    t0 = time.perf_counter()
    c = actor.chunk(seen, instruction)
    res.chunk_s.append(time.perf_counter() - t0)
    res.chunks += 1
    res.tokens.append(c.tokens)
    res.repaired += c.repaired
    res.forced += c.forced
    if c.malformed:
        res.malformed += 1
    return c


def run_episode(
    actor,
    env,
    task: str,
    seed: int,
    max_steps: int,
    blank_image: bool = False,
    record_frames: bool = False,
) -> EpisodeResult:
    """Run one closed-loop episode.

    Args:
        actor: from :func:`load_actor` (``reset()``, ``chunk(frame, instruction) -> Chunk``).
        env: ``nora_edge.sim.metaworld_env.SimEnv`` of ``task``.
        task, seed: the episode (``env.reset(seed)``).
        max_steps: env steps at most.
        blank_image: feed a constant gray (H, W, 3) frame instead of the render (vision ablation).
        record_frames: keep the rendered frame at each chunk start (for a GIF).

    Returns:
        :class:`EpisodeResult`; an exception ends the episode with status "error" and its text.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise InputError(f"max_steps must be a positive int, got {max_steps!r}")
    res = EpisodeResult(task, int(seed), policy=getattr(actor, "label", ""))
    frames = []
    try:
        frame = env.reset(int(seed))
        actor.reset()
        while res.steps < max_steps and not res.success:
            if res.chunks:
                frame = env.frame()
            c = call_actor(actor, frame, env.instruction, res, blank_image, frames if record_frames else None)
            if c.malformed and not c.fallback:
                res.chunk_steps.append(0)
                res.stop, res.error = "malformed", f"malformed chunk {res.chunks}: {c.reason}"
                break
            done = 0
            for action in c.actions:
                if res.steps >= max_steps:
                    break
                step = env.step(action)
                res.steps += 1
                done += 1
                if step.success:
                    res.success, res.stop = True, "success"
                    break
            res.chunk_steps.append(done)
    except Exception as e:  # noqa: BLE001 - any failure ends the episode and is reported, never hidden
        res.status, res.stop = "error", "error"
        res.error = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3).splitlines()[-1]}"
    if record_frames and frames:
        res.frames = np.stack(frames)
    return res


def parse_fault(spec: str | None) -> tuple[str, str, str] | None:
    """``KIND:TASK:SEED`` -> (kind, task, seed) or None (InputError when malformed)."""
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in FAULT_KINDS:
        raise InputError(f"{FAULT_ENV}={spec!r}: expected KIND:TASK:SEED with KIND in {FAULT_KINDS}")
    return parts[0], parts[1], parts[2]


def inject_fault(fault, ep, attempt: int) -> None:
    """Test seam: die or hang here when ``fault`` names this episode (and attempt)."""
    if fault is None:
        return
    kind, task, seed = fault
    if task != ep.task or seed not in ("*", str(ep.seed)) or (kind.endswith("1") and attempt > 0):
        return
    if kind.startswith("crash"):
        os._exit(70)
    time.sleep(10**6)


class EpisodeRunner:
    """What each worker holds: the actor (loaded once) and one env per task (``make_env`` caches them)."""

    def __init__(self, policy: str, gripper, threads: int, fault, nora_fallback: bool = False) -> None:
        """Load the actor.

        Args:
            policy: bundle or checkpoint dir; gripper: checkpoint gripper steps or None; threads: inference
            threads; fault: :func:`parse_fault` output or None.
        """
        from .metaworld_env import configure_gl

        configure_gl()
        self.actor = load_actor(
            policy, list(gripper) if gripper is not None else None, threads, nora_fallback
        )
        self.fault = fault

    def ready(self) -> bool:
        """True once loaded (Ray: the driver waits on it to tell load failures from episode failures)."""
        return True

    def run(
        self, ep, attempt: int, max_steps: int, blank: bool, record: bool, latency_steps: int = 0
    ) -> EpisodeResult:
        """Run episode ``ep`` (``.task``, ``.seed``); ``attempt`` 0 first, 1 for the rerun after a crash/hang;
        ``latency_steps`` > 0 delays every chunk after the first by that many env steps (``sim.latency``)."""
        from .metaworld_env import make_env

        inject_fault(self.fault, ep, attempt)
        try:
            env = make_env(ep.task)
        except Exception as e:  # noqa: BLE001 - the episode fails with the reason; the worker lives on
            err = f"{type(e).__name__}: {e}"
            return EpisodeResult(
                ep.task, ep.seed, status="error", stop="error", error=err, attempts=attempt + 1
            )
        if latency_steps:
            from .latency import run_episode_delayed

            res = run_episode_delayed(
                self.actor, env, ep.task, ep.seed, max_steps, latency_steps, blank, record
            )
        else:
            res = run_episode(self.actor, env, ep.task, ep.seed, max_steps, blank, record)
        res.attempts = attempt + 1
        return res
