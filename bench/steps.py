"""One bench step and its statistics: the step loop shared by the timed run and the gate's re-measurement.

Data flow: deterministic frames (:func:`bench_images`) -> :class:`StepLoop` (one runtime inference, the reference's
when present, then one yardstick sample; runtime and reference alternate who goes first) -> :class:`Recorder` per
policy kind (stage samples from ``NoraPolicy.last_timings``, wall-clock e2e, token classes, run-queue wait) ->
:func:`summarize_kind` (order statistics, deadline misses, malformed / repaired / forced_continue rates).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from nora_edge.bench.gate import contention
from nora_edge.bench.microbench import Yardstick
from nora_edge.bench.stats import deadline_miss_rate, jitter_ms, summarize
from nora_edge.errors import DetokenizationError, InputError
from nora_edge.generate import TOKEN_CLASSES, TOKEN_FORCED, TOKEN_REPAIRED

STAGES = ("preprocess", "vision", "prefill", "decode_step", "decode", "detokenize")
N_IMAGES = 4
RATE_KEYS = ("token_classes", "repaired_rate", "forced_rate", "repaired_chunk_rate", "forced_chunk_rate")


def bench_images(n: int, seed: int, size: int = 224) -> list[np.ndarray]:
    """``n`` deterministic (size, size, 3) uint8 frames: smooth colour gradients plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size  # (size, size)
    out = []
    for _ in range(n):
        base = np.stack(
            [np.sin(6.28 * (rng.random() * xx + rng.random() * yy) + rng.random() * 6.28) for _ in range(3)],
            axis=-1,
        )  # (size, size, 3)
        img = 127.5 * (base + 1) + rng.normal(0, 12, (size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def anon_rss_mb() -> float | None:
    """Anonymous resident memory of this process in MB (Linux ``RssAnon``: heap, arenas, arrays), None elsewhere.

    Unlike the RSS it leaves out mapped file pages (shared libraries, the mmapped embedding table), whose
    resident share follows the page cache: the same run read 155 MB RSS in a fresh venv and 138 MB in an
    older one, with identical RssAnon.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1e3
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_mb() -> float:
    """Resident set size of this process in MB (psutil, from the bench extra)."""
    try:
        import psutil
    except ImportError as e:
        raise InputError("the bench needs psutil: pip install 'nora-edge[bench]'") from e
    return psutil.Process(os.getpid()).memory_info().rss / 1e6


class Recorder:
    """Per-step samples of one policy kind; ``classes``: generated tokens per class (decoded chunks),
    ``chunks_with``: chunks holding at least one repaired / forced_continue token."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {s: [] for s in (*STAGES, "e2e")}
        self.tokens: list[int] = []
        self.malformed = 0
        self.errors: list[str] = []
        self.classes = dict.fromkeys(TOKEN_CLASSES, 0)
        self.chunks_with = dict.fromkeys((TOKEN_REPAIRED, TOKEN_FORCED), 0)
        self.wait_ms: list[float] = []  # run-queue wait of this thread during each inference


def run_queue_wait_ms() -> float | None:
    """Milliseconds this thread has waited on a run queue (Linux /proc/thread-self/schedstat), None elsewhere.

    A step whose inference waited had its core taken by another process for that long, somewhere in it.
    """
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as f:
            return int(f.read().split()[1]) / 1e6
    except (OSError, ValueError, IndexError):
        return None


def run_runtime_step(policy, image, instruction: str, unnorm_key: str | None, rec: Recorder) -> None:
    """One runtime inference; a DetokenizationError is counted as malformed (its actions are never used).

    The policy runs with ``forced_tokens="flag"``: a chunk holding tokens the model did not choose is timed like
    any other and its token classes are counted.
    """
    t0 = time.perf_counter()
    try:
        policy.run_chunk(image, instruction, unnorm_key)
    except DetokenizationError as e:
        rec.malformed += 1
        rec.errors.append(str(e)[:200])
        rec.samples["e2e"].append(1e3 * (time.perf_counter() - t0))
        return
    rec.samples["e2e"].append(1e3 * (time.perf_counter() - t0))
    lt = policy.last_timings
    for s in ("preprocess", "vision", "prefill", "decode", "detokenize"):
        rec.samples[s].append(1e3 * lt[s])
    rec.samples["decode_step"].extend(1e3 * t for t in lt["decode_steps"])
    rec.tokens.append(int(lt["new_tokens"]))
    for cls, n in lt["token_classes"].items():
        rec.classes[cls] += int(n)
        if cls in rec.chunks_with and n:
            rec.chunks_with[cls] += 1


def run_reference_step(ref, image, instruction: str, unnorm_key: str | None, rec: Recorder) -> None:
    """One reference inference (HF generate); a not-well-formed decode is counted as malformed."""
    t0 = time.perf_counter()
    res = ref.predict_action_chunk(image, instruction, unnorm_key)
    rec.samples["e2e"].append(1e3 * (time.perf_counter() - t0))
    rec.tokens.append(int(res.ids.size))
    if not res.well_formed:
        rec.malformed += 1
        rec.errors.append(str(res.reason)[:200])


def token_rates(rec: Recorder, steps: int, classified: bool = True) -> dict:
    """Token-class counts and rates: per token (of decoded chunks) and per chunk (share of all ``steps``); all
    None when the policy kind does not classify its tokens."""
    if not classified:
        return dict.fromkeys(RATE_KEYS)
    total = sum(rec.classes.values())
    return {
        "token_classes": dict(rec.classes),
        "repaired_rate": rec.classes[TOKEN_REPAIRED] / total if total else 0.0,
        "forced_rate": rec.classes[TOKEN_FORCED] / total if total else 0.0,
        "repaired_chunk_rate": rec.chunks_with[TOKEN_REPAIRED] / steps,
        "forced_chunk_rate": rec.chunks_with[TOKEN_FORCED] / steps,
    }


def summarize_kind(rec: Recorder, steps: int, horizon: int, deadline_ms: float, classes: bool = True) -> dict:
    """Statistics of one policy kind's samples; ``classes``: the kind classifies its tokens (the runtime; the
    reference's HF generate has no automaton, its rates are None)."""
    stages = {s: summarize(v) for s, v in rec.samples.items() if v}
    e2e = stages["e2e"]
    return {
        "stages": stages,
        "e2e": {
            **e2e,
            "jitter_ms": jitter_ms(e2e),
            "inferences_per_s": 1e3 / e2e["median"],
            "actions_per_s": 1e3 / e2e["median"] * horizon,
            "deadline_ms": deadline_ms,
            "deadline_miss_rate": deadline_miss_rate(rec.samples["e2e"], deadline_ms),
        },
        "tokens_per_chunk": summarize(rec.tokens) if rec.tokens else None,
        "malformed": rec.malformed,
        "malformed_rate": rec.malformed / steps,
        **token_rates(rec, steps, classes),
        "contention": contention(rec.wait_ms),
        "errors": rec.errors[:5],
    }


@dataclass
class StepLoop:
    """What one bench step runs: the policy (and reference) on rotating frames, then one yardstick sample."""

    policy: object
    ref: object | None
    images: list[np.ndarray]
    instruction: str
    unnorm_key: str | None
    yardstick: Yardstick

    def run(self, steps: int, rt: Recorder, rf: Recorder, bar=None) -> tuple[float, float | None]:
        """``steps`` steps (runtime and reference alternate who goes first); returns the peak RSS and peak
        anonymous RSS seen (MB; the latter None where the OS does not report it)."""
        rss_peak, anon_peak = 0.0, None
        for i in range(steps):
            img = self.images[i % N_IMAGES]
            for who in (0, 1) if i % 2 == 0 else (1, 0):
                if who == 0:
                    w0 = run_queue_wait_ms()
                    run_runtime_step(self.policy, img, self.instruction, self.unnorm_key, rt)
                    w1 = run_queue_wait_ms()
                    if w0 is not None and w1 is not None:
                        rt.wait_ms.append(w1 - w0)
                elif self.ref is not None:
                    run_reference_step(self.ref, img, self.instruction, self.unnorm_key, rf)
            rss_peak, anon = max(rss_peak, rss_mb()), anon_rss_mb()
            anon_peak = anon if anon_peak is None or anon is None else max(anon_peak, anon)
            self.yardstick.sample()
            if bar:
                bar.advance(bar.task_ids[0])
        return rss_peak, anon_peak

    def remeasure(self, steps: int) -> dict:
        """``steps`` more steps of :meth:`run` (the gate's confirmation, ``gate.Remeasure``)."""
        n0 = len(self.yardstick.samples["gemm"])
        rec = Recorder()
        self.run(steps, rec, Recorder())
        ys = self.yardstick.samples
        return {
            "stages": rec.samples,
            "unit_ms": ys["gemm"][n0:],
            "dispatch_ms": ys["dispatch"][n0:],
            "wait_ms": rec.wait_ms,
        }
