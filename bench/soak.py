"""Soak test: many steps on one policy; memory growth and latency stability over time (a `make` target, not CI).

Data flow: bundle -> NoraPolicy (``forced_tokens="flag"``: chunks the model did not fully choose are counted, not
refused) -> ``steps`` x run_chunk on rotating frames -> per-window RSS, latency percentiles and token classes ->
``soak.json`` + a verdict (RSS growth after warm-up < ``max_rss_growth``, p99 of the last window within
``max_p99_drift`` of the first).

Memory is judged from the end of the first window to the end: the first window still fills bounded caches
(onnxruntime arenas, the automaton's mask cache of at most 4096 states), a leak keeps growing after it.
The growth from the end of warm-up is reported beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from nora_edge.bench.report import write_json_atomic
from nora_edge.bench.run import DEFAULT_INSTRUCTION
from nora_edge.bench.stats import summarize
from nora_edge.bench.steps import bench_images, rss_mb
from nora_edge.errors import InputError


def run_soak(
    bundle: str | Path,
    *,
    steps: int = 10_000,
    windows: int = 10,
    warmup: int = 50,
    threads: int | None = 1,
    max_rss_growth: float = 0.02,
    max_p99_drift: float = 0.5,
    out: str | Path = Path("soak-out"),
    progress: bool = True,
) -> dict:
    """Run ``steps`` inferences and judge memory growth and latency drift.

    Args:
        bundle: bundle directory.
        steps: timed inferences (split into ``windows`` equal windows).
        warmup: untimed inferences first.
        max_rss_growth: allowed RSS growth (fraction) from the end of the first window to the end.
        max_p99_drift: allowed relative change of the window p99 (last vs first window).

    Returns:
        The soak record (also written to ``out/soak.json``); ``record["ok"]`` is the verdict.
    """
    from nora_edge.policy import NoraPolicy

    if steps < windows or windows < 2:
        raise InputError(f"soak needs steps >= windows >= 2, got steps={steps}, windows={windows}")
    policy = NoraPolicy.load(bundle, threads=threads, forced_tokens="flag")
    images = bench_images(16, seed=0)
    for i in range(warmup):
        policy.run_chunk(images[i % len(images)], DEFAULT_INSTRUCTION)
    rss0 = rss_mb()
    per_window = steps // windows
    lat, rss, win = [], [], []
    t_start = time.perf_counter()
    for w in range(windows):
        samples, flagged = [], 0
        for i in range(per_window):
            t0 = time.perf_counter()
            chunk = policy.run_chunk(images[(w * per_window + i) % len(images)], DEFAULT_INSTRUCTION)
            samples.append(1e3 * (time.perf_counter() - t0))
            flagged += chunk.flagged
        lat.extend(samples)
        rss.append(rss_mb())
        win.append({"window": w, "rss_mb": rss[-1], "flagged_chunks": flagged, **summarize(samples)})
        if progress:
            print(
                f"window {w + 1}/{windows}: rss {rss[-1]:.1f} MB, median {win[-1]['median']:.2f} ms, "
                f"p99 {win[-1]['p99']:.2f} ms, {flagged} chunks with tokens the model did not choose",
                flush=True,
            )
    growth = rss[-1] / rss[0] - 1  # steady state: from the end of the first window
    drift = win[-1]["p99"] / win[0]["p99"] - 1
    record = {
        "bundle": str(bundle),
        "steps": per_window * windows,
        "wall_s": time.perf_counter() - t_start,
        "rss_after_warmup_mb": rss0,
        "rss_end_mb": rss[-1],
        "rss_window1_mb": rss[0],
        "rss_growth": growth,
        "rss_growth_from_warmup": rss[-1] / rss0 - 1,
        "p99_drift": drift,
        "latency": summarize(np.asarray(lat)),
        "flagged_chunks": sum(w["flagged_chunks"] for w in win),
        "windows": win,
        "limits": {"max_rss_growth": max_rss_growth, "max_p99_drift": max_p99_drift},
        "ok": bool(growth < max_rss_growth and abs(drift) < max_p99_drift),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "soak.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nora_edge.bench.soak", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=Path("soak-out"))
    args = ap.parse_args(argv)
    r = run_soak(args.bundle, steps=args.steps, out=args.out)
    print(
        f"RSS growth {100 * r['rss_growth']:+.2f}% (limit {100 * r['limits']['max_rss_growth']:.0f}%), "
        f"p99 drift {100 * r['p99_drift']:+.1f}%, median {r['latency']['median']:.2f} ms, "
        f"p99 {r['latency']['p99']:.2f} ms over {r['steps']} steps ({r['flagged_chunks']} chunks held tokens the "
        f"model did not choose): {'PASS' if r['ok'] else 'FAIL'}"
    )
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
