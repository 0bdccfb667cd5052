"""``nora-edge bench``: time a bundle on this machine, optionally side by side with the PyTorch reference.

Data flow: bundle dir -> NoraPolicy (ORT) [+ ReferencePolicy on the checkpoint, imported lazily] -> microbench
(host peaks) -> warmup -> ``steps``
interleaved inferences on the same deterministic images (runtime and reference alternate who goes first) ->
per-stage samples from ``NoraPolicy.last_timings`` + wall-clock e2e + RSS + one yardstick sample per step
(``microbench.Yardstick``, the gate's ``unit_ms``) -> statistics (``stats``), speedups,
roofline of the bundle's graphs on every profile (``bundle_cost``) -> optional CI gate (``gate``) ->
report.json, report.md and PNG plots in ``out`` (atomic writes).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np

from nora_edge.bench import gate as G
from nora_edge.bench.bundle_cost import bundle_stage_costs, predict_bundle
from nora_edge.bench.microbench import Yardstick, host_profile, measure_host
from nora_edge.bench.report import bench_markdown, write_json_atomic, write_text_atomic
from nora_edge.bench.stats import deadline_miss_rate, jitter_ms, summarize
from nora_edge.errors import DetokenizationError, InputError
from nora_edge.profiles import list_profiles, load_profile

DEFAULT_INSTRUCTION = "pick up the black bowl and place it on the plate"
STAGES = ("preprocess", "vision", "prefill", "decode_step", "decode", "detokenize")
N_IMAGES = 4


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


def rss_mb() -> float:
    """Resident set size of this process in MB (psutil, from the bench extra)."""
    try:
        import psutil
    except ImportError as e:
        raise InputError("the bench needs psutil: pip install 'nora-edge[bench]'") from e
    return psutil.Process(os.getpid()).memory_info().rss / 1e6


def check_args(steps: int, warmup: int, hz: float, max_regression: float) -> None:
    for name, v, lo in (("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(f"{name} must be an int >= {lo}, got {v!r}")
    if isinstance(hz, bool) or not isinstance(hz, (int, float)) or not hz > 0:
        raise InputError(f"hz must be a positive number, got {hz!r}")
    if (
        isinstance(max_regression, bool)
        or not isinstance(max_regression, (int, float))
        or not max_regression > 0
    ):
        raise InputError(f"max_regression must be a positive fraction, got {max_regression!r}")


def load_reference(reference: str | Path, horizon: int, threads: int | None, quantization: str | None = None):
    """The PyTorch reference on the checkpoint (imports the export stage, i.e. torch); ``quantization``:
    None, "bnb-int8" or "bnb-nf4" (bitsandbytes, as users run NORA today)."""
    import torch

    from nora_edge.export.reference import ReferencePolicy

    if threads:
        torch.set_num_threads(threads)
    return ReferencePolicy.from_pretrained(reference, time_horizon=horizon, quantization=quantization)


class _Recorder:
    """Per-step samples of one policy kind."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {s: [] for s in (*STAGES, "e2e")}
        self.tokens: list[int] = []
        self.malformed = 0
        self.errors: list[str] = []


def run_runtime_step(policy, image, instruction: str, unnorm_key: str | None, rec: _Recorder) -> None:
    """One runtime inference; a DetokenizationError is counted as malformed (its actions are never used)."""
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


def run_reference_step(ref, image, instruction: str, unnorm_key: str | None, rec: _Recorder) -> None:
    """One reference inference (HF generate); a not-well-formed decode is counted as malformed."""
    t0 = time.perf_counter()
    res = ref.predict_action_chunk(image, instruction, unnorm_key)
    rec.samples["e2e"].append(1e3 * (time.perf_counter() - t0))
    rec.tokens.append(int(res.ids.size))
    if not res.well_formed:
        rec.malformed += 1
        rec.errors.append(str(res.reason)[:200])


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar.start()
    bar.add_task("steps", total=total)
    return bar


def summarize_kind(rec: _Recorder, steps: int, horizon: int, deadline_ms: float) -> dict:
    """Statistics of one policy kind's samples."""
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
        "errors": rec.errors[:5],
    }


def speedups(rt: dict, ref: dict) -> dict:
    """Reference / runtime ratios of the same run (> 1: the runtime is faster)."""
    r, f = rt["e2e"], ref["e2e"]
    out = {"e2e_median": f["median"] / r["median"], "e2e_p99": f["p99"] / r["p99"]}
    if rt["tokens_per_chunk"] and ref["tokens_per_chunk"]:
        rt_tok = r["median"] / rt["tokens_per_chunk"]["median"]
        ref_tok = f["median"] / ref["tokens_per_chunk"]["median"]
        out["per_generated_token"] = ref_tok / rt_tok
    return out


def roofline_section(policy, instruction: str, summary: dict, host, new_tokens: int) -> dict:
    """Predicted vs measured per stage on the host, and predictions on every device profile."""
    b = policy.bundle
    grid = np.asarray([b.components["vision"].meta.get("grid_thw", [1, 16, 16])], dtype=np.int64)
    prompt = policy.prompt.build(instruction, grid)
    prefix = int(policy.prompt.prefix_ids.size)
    costs = bundle_stage_costs(b, prompt.length, prefix, new_tokens, patches=int(np.prod(grid[0])))
    profiles = [host] + [load_profile(n) for n in list_profiles() if n != "host"]
    pred = predict_bundle(costs, profiles)
    host_rows = {}
    for stage, cost in costs.items():
        measured = summary["stages"].get(stage, {}).get("median")
        p = pred[host.name][stage]["ms"]
        fastest = summary["stages"].get(stage, {}).get("min")
        host_rows[stage] = {
            "predicted_ms": p,
            "measured_ms": measured,
            "measured_min_ms": fastest,
            "error": (p / measured - 1) if measured else None,
            "error_vs_min": (p / fastest - 1) if fastest else None,
            "achieved_gflops": cost.flops / measured / 1e6 if measured else None,
            **cost.summary(),
        }
    return {
        "prompt_tokens": prompt.length,
        "cached_prefix_tokens": prefix,
        "new_tokens": new_tokens,
        "host": host_rows,
        "profiles": {name: {s: v["ms"] for s, v in st.items()} for name, st in pred.items()},
    }


def bundle_section(bundle) -> dict:
    files = bundle.manifest["files"]
    return {
        "path": str(bundle.path),
        "size_bytes": int(sum(int(f["size"]) for f in files.values())),
        "precision": {k: c.precision for k, c in bundle.components.items()},
        "head": bundle.actions.head,
        "horizon": bundle.codec.time_horizon,
        "action_dim": bundle.codec.action_dim,
        "decoder": {k: bundle.components["decoder"].meta.get(k) for k in ("num_layers", "hidden_size")},
    }


def run_bench(
    bundle: str | Path | None,
    *,
    reference: str | Path | None = None,
    reference_quant: str | None = None,
    steps: int = 50,
    warmup: int = 5,
    hz: float = 25,
    out: str | Path = Path("bench-out"),
    against: str | Path | None = None,
    max_regression: float = 0.15,
    update_baseline: bool = False,
    threads: int | None = None,
    unnorm_key: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    seed: int = 0,
    policy=None,
    constrained: bool = True,
    roofline: bool = True,
    plots: bool = True,
    progress: bool = True,
) -> dict:
    """Benchmark a bundle; write report.json, report.md and plots into ``out``.

    Args:
        bundle: bundle directory (ignored when ``policy`` is given).
        reference: NORA checkpoint dir: run the PyTorch reference on the same inputs in the same run.
        reference_quant: load that reference through bitsandbytes: "bnb-int8" or "bnb-nf4" (None: fp32).
        steps / warmup: timed and untimed inferences.
        hz: control rate; an inference misses its deadline when it takes longer than horizon / hz.
        out: report directory (created).
        against: baseline JSON for the CI gate (compared after the run; see ``gate``).
        max_regression: allowed fractional slowdown (and memory growth) against the baseline.
        update_baseline: write this run as the new baseline at ``against``.
        threads: ORT intra-op threads (and torch threads for the reference); None = library defaults.
        policy: an already loaded NoraPolicy (for callers that wrap its stages).
        constrained: automaton-constrained decoding (the default runtime); False = HF-parity greedy, which
            generates the same tokens as the reference (like-for-like speedups on untrained fixtures).
        roofline: also predict the bundle's stages with the roofline (walks both graphs; a few seconds).

    Returns:
        The report dict (also in ``out/report.json``); ``result["gate"]["ok"]`` when ``against`` was given.
    """
    check_args(steps, warmup, hz, max_regression)
    if update_baseline and against is None:
        raise InputError("update_baseline needs against= (the baseline file to write)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rss_before = rss_mb()
    if policy is None:
        from nora_edge.policy import NoraPolicy

        if bundle is None:
            raise InputError("run_bench needs a bundle directory or a loaded policy")
        policy = NoraPolicy.load(bundle, threads=threads, constrained=constrained)
        policy_rss = rss_mb() - rss_before
    else:
        policy_rss = None
    horizon = policy.time_horizon
    if reference_quant is not None and reference is None:
        raise InputError(f"reference_quant={reference_quant!r} needs reference= (the checkpoint to load)")
    ref = load_reference(reference, horizon, threads, reference_quant) if reference is not None else None
    deadline_ms = 1e3 * horizon / hz
    images = bench_images(N_IMAGES, seed)
    host = host_profile(measure_host(threads))
    yardstick = Yardstick(threads)
    for i in range(warmup):
        img = images[i % N_IMAGES]
        run_runtime_step(policy, img, instruction, unnorm_key, _Recorder())
        if ref is not None:
            run_reference_step(ref, img, instruction, unnorm_key, _Recorder())
    rt, rf, rss_peak = _Recorder(), _Recorder(), rss_mb()
    bar = _progress(progress, steps)
    wall0 = time.perf_counter()
    for i in range(steps):
        img = images[i % N_IMAGES]
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for who in order:
            if who == 0:
                run_runtime_step(policy, img, instruction, unnorm_key, rt)
            elif ref is not None:
                run_reference_step(ref, img, instruction, unnorm_key, rf)
        rss_peak = max(rss_peak, rss_mb())
        yardstick.sample()
        if bar:
            bar.advance(bar.task_ids[0])
    wall = time.perf_counter() - wall0
    if bar:
        bar.stop()
    runtime = summarize_kind(rt, steps, horizon, deadline_ms)
    result = {
        "schema": 1,
        "bundle": bundle_section(policy.bundle),
        "config": {
            "steps": steps,
            "warmup": warmup,
            "hz": hz,
            "threads": threads,
            "instruction": instruction,
            "seed": seed,
            "deadline_ms": deadline_ms,
            "unnorm_key": unnorm_key,
            "reference": str(reference) if reference else None,
            "reference_quant": reference_quant,
        },
        "host": host_profile_json(host),
        "unit_ms": {"samples": yardstick.samples_ms, "min": yardstick.unit_ms},
        "runtime": runtime,
        "memory": {
            "policy_rss_mb": policy_rss,
            "rss_peak_mb": rss_peak,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        },
        "wall_s": wall,
        "reference": summarize_kind(rf, steps, horizon, deadline_ms) if ref is not None else None,
        "samples": {
            "runtime": {**rt.samples, "tokens": rt.tokens},
            "reference_e2e": rf.samples["e2e"] if ref is not None else [],
            "reference_tokens": rf.tokens,
        },
    }
    result["speedup"] = speedups(runtime, result["reference"]) if ref is not None else None
    if roofline and runtime["tokens_per_chunk"]:  # needs at least one decoded chunk for its lengths
        tokens = int(round(runtime["tokens_per_chunk"]["median"]))
        result["roofline"] = roofline_section(policy, instruction, runtime, host, tokens)
    if against is not None:
        if update_baseline:
            G.write_baseline(Path(against), result)
        result["gate"] = G.compare(result, G.load_baseline(Path(against)), max_regression).to_json()
    result["files"] = finish_outputs(result, out, plots)
    return result


def host_profile_json(host) -> dict:
    return {"name": host.name, "sources": host.sources()}


def finish_outputs(result: dict, out: Path, plots: bool) -> dict:
    """Write plots (optional), report.md and report.json; return their paths."""
    files = {}
    if plots:
        from nora_edge.bench.plots import write_plots

        files.update(write_plots(result, out))
    result["files"] = {k: str(v) for k, v in files.items()}
    files["report.md"] = write_text_atomic(out / "report.md", bench_markdown(result))
    files["report.json"] = out / "report.json"
    result["files"] = {k: str(v) for k, v in files.items()}
    write_json_atomic(out / "report.json", result)
    return result["files"]
