"""Evaluate a bundle or checkpoint in closed loop on MetaWorld tasks, in parallel, failures reported.

Data flow: (tasks, episodes, seed) --:func:`plan`--> the episode list (task, evaluation seed), identical for every
policy so two runs pair up --local worker processes (:func:`run_local`, spawn) or Ray actors
(:func:`run_ray`); each worker loads its actor once and keeps one env per task (``make_env``)-->
``sim.rollout.run_episode`` per episode --> one :class:`~nora_edge.sim.rollout.EpisodeResult` per planned
episode (asserted) --:func:`evaluate`--> :class:`EvalRun` --``sim.report``--> JSON / Markdown / PNG / GIF.

Failure handling: a worker that dies (crash) or exceeds ``timeout_s`` on one episode (hang) is killed and
replaced; the event is recorded in ``EvalRun.events`` and the episode is rerun once in a fresh worker; a second
failure makes it a failed episode with status "crashed" / "hung". Nothing is dropped.

Evaluation seeds: ``sha256("S:task:k") mod 2**39`` for episode k of ``task`` under ``--seed S``: independent of
which other tasks are evaluated, and always below ``sim.frames.FRAME_SEED_BASE`` (2**39, calibration / fidelity
frames) and ``sim.demos.DEMO_SEED_BASE`` (2**40), so never a
demonstration seed.

Test-only fault injection: ``NORA_EDGE_EVAL_FAULT="KIND:TASK:SEED"`` (KIND: crash / hang on every attempt,
crash1 / hang1 on the first attempt only; SEED may be ``*``), read by the parent and handed to workers.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path

from nora_edge.errors import InputError, NoraEdgeError

from .demos import DEMO_SEED_BASE
from .metaworld_env import MAX_STEPS, TASKS, check_task
from .rollout import FAULT_ENV, EpisodeResult, EpisodeRunner, parse_fault, policy_kind

EVAL_SEED_LIMIT = DEMO_SEED_BASE >> 1  # = sim.frames.FRAME_SEED_BASE: evaluation seeds live below it


class EvalError(NoraEdgeError):
    """The evaluation could not run (a policy that does not load, Ray missing or unreachable)."""


@dataclass(frozen=True)
class Episode:
    """One planned episode: ``index`` in the plan, ``task``, evaluation ``seed``, ``k``-th of its task."""

    index: int
    task: str
    seed: int
    k: int


@dataclass(frozen=True)
class EvalConfig:
    """How episodes run.

    Attributes:
        max_steps: env steps per episode; blank_image: gray frames (vision ablation); gif: record frames of
        the first N planned episodes; workers: parallel workers; timeout_s: seconds one episode may take
        before its worker is killed as hung; load_timeout_s: seconds a worker may take to load its policy;
        threads: inference threads per worker (None: cores // workers); nora_fallback: checkpoints only:
        execute NORA's own fallback for a malformed chunk (zeros, unnormalized: what NORA sends the robot),
        counted as malformed, instead of ending the episode; gripper: checkpoint gripper steps
        when it has no train_report.json; latency_steps: simulated inference latency in env steps (0: the
        synchronous loop; ``sim.latency``).
    """

    max_steps: int = MAX_STEPS
    blank_image: bool = False
    gif: int = 0
    workers: int = 1
    timeout_s: float = 600.0
    load_timeout_s: float = 600.0
    threads: int | None = None
    gripper: tuple[str, ...] | None = None
    nora_fallback: bool = False
    latency_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("max_steps", "workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive int, got {v!r}")
        v = self.latency_steps
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"latency_steps must be an int >= 0, got {v!r}")
        if isinstance(self.gif, bool) or not isinstance(self.gif, int) or self.gif < 0:
            raise InputError(f"gif must be an int >= 0, got {self.gif!r}")
        if not self.timeout_s > 0 or not self.load_timeout_s > 0:
            raise InputError(f"timeouts must be > 0, got {self.timeout_s!r}, {self.load_timeout_s!r}")

    def worker_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)


@dataclass
class EvalRun:
    """One policy's evaluation: ``results`` in plan order, worker ``events`` (crash/hang), timing."""

    policy: str
    kind: str
    label: str
    backend: str
    config: dict
    results: list[EpisodeResult]
    events: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def parse_tasks(text: str | list[str]) -> list[str]:
    """ "all" or "t1,t2" (or a list) -> task names (InputError naming an unknown one)."""
    items = text if isinstance(text, list) else [t.strip() for t in str(text).split(",") if t.strip()]
    if items == ["all"]:
        return list(TASKS)
    if not items:
        raise InputError(
            f"no tasks given in {text!r}; use 'all' or a comma-separated list of {sorted(TASKS)}"
        )
    return [check_task(t) for t in dict.fromkeys(items)]


def eval_seed(seed: int, task: str, k: int) -> int:
    """Evaluation seed of episode ``k`` of ``task`` under ``--seed seed``; always < 2**39 (no frame or demo seed)."""
    digest = hashlib.sha256(f"{seed}:{task}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_SEED_LIMIT


def plan(tasks: list[str], episodes: int, seed: int) -> list[Episode]:
    """Every (task, seed) to run, task-major; the same list for every policy given the same arguments."""
    for name, v in (("episodes", episodes), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "episodes" else 0):
            raise InputError(f"{name} must be an int >= {1 if name == 'episodes' else 0}, got {v!r}")
    eps = [(t, k) for t in tasks for k in range(episodes)]
    return [Episode(i, t, eval_seed(seed, t, k), k) for i, (t, k) in enumerate(eps)]


def _worker_main(conn, policy: str, gripper, threads: int, fault, nora_fallback: bool = False) -> None:
    """Local worker process: load, say ready, then run episodes until told to stop (None)."""
    try:
        runner = EpisodeRunner(policy, gripper, threads, fault, nora_fallback)
    except Exception as e:  # noqa: BLE001 - reported to the parent as a load error
        conn.send(("load_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while (job := conn.recv()) is not None:
        conn.send(("result", runner.run(*job)))


def _failed(ep: Episode, status: str, text: str, label: str) -> EpisodeResult:
    return EpisodeResult(ep.task, ep.seed, policy=label, status=status, stop="error", error=text, attempts=2)


class _Slot:
    def __init__(self, ctx, args) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        self.ready, self.job, self.since = False, None, time.monotonic()

    def stop(self, kill: bool) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self.conn.close()


def _worker_failed(
    events, pending, results, ep: Episode, attempt: int, kind: str, text: str, label: str
) -> None:
    """A worker crashed or hung on ``ep``: record the event, then rerun it once or count it as failed."""
    events.append({"event": kind, "task": ep.task, "seed": ep.seed, "attempt": attempt + 1, "detail": text})
    if attempt == 0:
        pending.appendleft((ep, 1))
    else:
        results[ep.index] = _failed(ep, kind, f"{kind} twice; last: {text}", label)


def _budget(slot: _Slot, cfg: EvalConfig) -> float:
    return cfg.timeout_s if slot.ready else cfg.load_timeout_s


def run_local(policy: str, episodes: list[Episode], cfg: EvalConfig, fault=None, label: str = ""):
    """Run ``episodes`` on ``cfg.workers`` spawned processes; returns (results in plan order, events)."""
    ctx = mp.get_context("spawn")
    args = (str(policy), cfg.gripper, cfg.worker_threads(), fault, cfg.nora_fallback)
    results: list[EpisodeResult | None] = [None] * len(episodes)
    pending = deque((ep, 0) for ep in episodes)
    events: list[dict] = []
    slots = [_Slot(ctx, args) for _ in range(min(cfg.workers, len(episodes)))]
    load_failures = 0

    def fail(slot: _Slot, kind: str, text: str) -> _Slot:
        nonlocal load_failures
        slot.stop(kill=True)
        if slot.job is None and slot.ready:  # died between episodes: nothing to rerun, still reported
            events.append(
                {"event": kind, "task": None, "seed": None, "attempt": 0, "detail": f"idle: {text}"}
            )
            return _Slot(ctx, args)
        if slot.job is None:
            load_failures += 1
            if load_failures >= 2:
                raise EvalError(f"{policy}: workers fail while loading the policy ({kind}: {text})")
            return _Slot(ctx, args)
        ep, attempt = slot.job
        _worker_failed(events, pending, results, ep, attempt, kind, text, label)
        return _Slot(ctx, args)

    try:
        while any(r is None for r in results):
            for s in slots:
                if s.ready and s.job is None and pending:
                    s.job, s.since = pending.popleft(), time.monotonic()
                    ep, attempt = s.job
                    job = (ep, attempt, cfg.max_steps, cfg.blank_image, ep.index < cfg.gif, cfg.latency_steps)
                    s.conn.send(job)
            limits = [s.since + _budget(s, cfg) for s in slots if s.job is not None or not s.ready]
            wait_s = max(0.0, min(limits) - time.monotonic()) if limits else 1.0
            mp_wait([s.conn for s in slots] + [s.proc.sentinel for s in slots], timeout=wait_s)
            for i, s in enumerate(slots):
                if s.conn.poll():
                    try:
                        what, payload = s.conn.recv()
                    except (EOFError, OSError):
                        slots[i] = fail(
                            s, "crashed", f"worker pid {s.proc.pid} died (exit {s.proc.exitcode})"
                        )
                        continue
                    if what == "load_error":
                        s.stop(kill=True)
                        raise EvalError(f"{policy}: the worker could not load the policy: {payload}")
                    if what == "ready":
                        s.ready, s.since = True, time.monotonic()
                    else:
                        results[s.job[0].index], s.job = payload, None
                elif not s.proc.is_alive():
                    s.proc.join()
                    slots[i] = fail(s, "crashed", f"worker pid {s.proc.pid} died (exit {s.proc.exitcode})")
                elif (s.job is not None or not s.ready) and time.monotonic() - s.since > _budget(s, cfg):
                    what = "hung on an episode" if s.ready else "hung while loading"
                    slots[i] = fail(s, "hung", f"worker pid {s.proc.pid} {what} for {_budget(s, cfg):g} s")
    finally:
        for s in slots:
            s.stop(kill=s.job is not None)
    return results, events


def run_ray(address: str, policy: str, episodes: list[Episode], cfg: EvalConfig, fault=None, label: str = ""):
    """Run ``episodes`` as Ray actors (one per worker) on the cluster at ``address`` ("local": start one on
    127.0.0.1 for this call, shut down after); same failure handling as :func:`run_local`."""
    if address == "local":
        # loopback only: with this Ray resolves the node IP to 127.0.0.1 and binds its gRPC servers there
        # (ray/_private/services.py get_node_ip_address; ray_constants.ENABLE_RAY_CLUSTER), children inherit it
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if "ray" in sys.modules:
            sys.modules["ray"]._private.ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        import ray
        from ray.exceptions import RayActorError
    except ImportError as e:
        raise EvalError("--ray needs Ray: pip install ray") from e
    if address == "local":
        ray.init(num_cpus=cfg.workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)  # fmt: skip
    else:
        ray.init(address=address, log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(EpisodeRunner)
    args = (str(policy), cfg.gripper, cfg.worker_threads(), fault, cfg.nora_fallback)
    results: list[EpisodeResult | None] = [None] * len(episodes)
    pending = deque((ep, 0) for ep in episodes)
    events: list[dict] = []

    def new_actor():
        actor = remote.remote(*args)
        try:
            ray.get(actor.ready.remote(), timeout=cfg.load_timeout_s)
        except Exception as e:  # noqa: BLE001 - RayActorError, GetTimeoutError or the load's own error
            ray.kill(actor)
            raise EvalError(f"{policy}: the Ray worker could not load the policy: {e}") from e
        return actor

    try:
        idle = [new_actor() for _ in range(min(cfg.workers, len(episodes)))]
        running: dict = {}  # ref -> (actor, ep, attempt, start)
        while any(r is None for r in results):
            while idle and pending:
                (ep, attempt), actor = pending.popleft(), idle.pop()
                ref = actor.run.remote(
                    ep, attempt, cfg.max_steps, cfg.blank_image, ep.index < cfg.gif, cfg.latency_steps
                )
                running[ref] = (actor, ep, attempt, time.monotonic())
            first = min(v[3] for v in running.values())
            done, _ = ray.wait(
                list(running), num_returns=1, timeout=max(0.0, first + cfg.timeout_s - time.monotonic())
            )
            for ref in list(running):
                actor, ep, attempt, start = running[ref]
                kind = text = None
                if ref in done:
                    try:
                        results[ep.index] = ray.get(ref)
                        idle.append(actor)
                    except RayActorError as e:
                        kind, text = "crashed", f"Ray actor died: {str(e).splitlines()[0]}"
                elif time.monotonic() - start > cfg.timeout_s:
                    kind, text = "hung", f"Ray actor hung after {cfg.timeout_s:g} s"
                else:
                    continue
                del running[ref]
                if kind is None:
                    continue
                ray.kill(actor)
                _worker_failed(events, pending, results, ep, attempt, kind, text, label)
                idle.append(new_actor())
    finally:
        ray.shutdown()
    return results, events


def evaluate(
    policy: str | Path,
    episodes: list[Episode],
    cfg: EvalConfig,
    ray_address: str | None = None,
) -> EvalRun:
    """Run every planned episode of ``policy`` (bundle or checkpoint dir); one result per episode, in order.

    Raises:
        InputError: ``policy`` is neither a bundle nor a checkpoint, bad options.
        EvalError: workers cannot load the policy; Ray missing or unreachable.
    """
    kind = policy_kind(policy)
    label = Path(policy).name
    fault = parse_fault(os.environ.get(FAULT_ENV))
    t0 = time.perf_counter()
    if ray_address:
        results, events = run_ray(ray_address, str(policy), episodes, cfg, fault, label)
    else:
        results, events = run_local(str(policy), episodes, cfg, fault, label)
    assert len(results) == len(episodes) and all(r is not None for r in results), "an episode was dropped"
    for r in results:
        r.policy = label
    cfg_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    backend = f"ray:{ray_address}" if ray_address else "local"
    return EvalRun(str(policy), kind, label, backend, cfg_json, results, events, time.perf_counter() - t0)


def run_eval(
    policy: str | Path,
    tasks: str | list[str],
    episodes: int,
    seed: int,
    cfg: EvalConfig = EvalConfig(),
    against: str | Path | None = None,
    ray_address: str | None = None,
    out: str | Path | None = None,
) -> dict[str, Path]:
    """Evaluate ``policy`` (and ``against`` on the same episodes), write the report; ``nora-edge eval``.

    Args:
        policy, against: bundle or checkpoint directories.
        tasks: "all", "t1,t2" or a list; episodes: per task; seed: evaluation seed set (>= 0).
        cfg: :class:`EvalConfig`; ray_address: Ray cluster address, "local", or None (local processes).
        out: report directory (default ``out/eval/<name>``).

    Returns:
        file kind -> path written (``sim.report.write_report``).
    """
    from .report import compare, write_report

    names = parse_tasks(tasks)
    for p in (policy, against):
        if p is not None:
            policy_kind(p)  # InputError before any worker starts
    eps = plan(names, episodes, seed)
    runs = [evaluate(policy, eps, cfg, ray_address)]
    if against is not None:
        runs.append(evaluate(against, eps, cfg, ray_address))
    name = runs[0].label + (f"_vs_{runs[1].label}" if against is not None else "")
    comparison = compare(runs[0], runs[1]) if against is not None else None
    return write_report(Path(out) if out is not None else Path("out/eval") / name, name, runs, comparison)
