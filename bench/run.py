"""``nora-edge bench``: time a bundle on this machine, optionally side by side with the PyTorch reference.

Data flow: bundle dir -> NoraPolicy (ORT, ``forced_tokens="flag"``: chunks the model did not fully choose are
timed and counted, not refused) [+ ReferencePolicy on the checkpoint, imported lazily] -> warmup -> ``steps``
interleaved inferences on the same deterministic images (runtime and reference alternate who goes first;
``steps.StepLoop``) -> per-stage samples from ``NoraPolicy.last_timings`` + wall-clock e2e + RSS and anonymous
RSS + token classes + one yardstick sample per step (``microbench.Yardstick``: the gate's ``unit_ms`` and
``dispatch_ms``) -> host microbenchmark (peaks, after the steps) -> statistics (``stats``), malformed / repaired / forced_continue
rates, speedups, roofline of the bundle's graphs on every
profile (``bundle_cost``), OpenVLA-7B on every profile (``baseline7b.bench_section``) -> optional CI gate
(``gate.confirm``: a suspected stage regression is re-measured with more steps of the same loop before it
counts) -> report.json, report.md and PNG plots in ``out`` (atomic writes).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from nora_edge.bench import gate as G
from nora_edge.bench.baseline7b import bench_section as baseline7b_section
from nora_edge.bench.baseline7b import read_host_measurement
from nora_edge.bench.microbench import Yardstick, host_profile, measure_host
from nora_edge.bench.report import bench_markdown, write_json_atomic, write_text_atomic
from nora_edge.bench.sections import bundle_actions_per_s, bundle_section, host_profile_json, roofline_section
from nora_edge.bench.steps import (
    N_IMAGES,
    Recorder,
    StepLoop,
    anon_rss_mb,
    bench_images,
    rss_mb,
    run_reference_step,
    run_runtime_step,
    summarize_kind,
)
from nora_edge.errors import InputError

DEFAULT_INSTRUCTION = "pick up the black bowl and place it on the plate"


def _is_number(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def check_args(
    steps: int,
    warmup: int,
    hz: float,
    max_regression: float,
    confirm_steps: int = 1,
    confirm_seconds: float = 0,
) -> None:
    for name, v, lo in (("steps", steps, 1), ("warmup", warmup, 0), ("confirm_steps", confirm_steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(f"{name} must be an int >= {lo}, got {v!r}")
    if not _is_number(hz) or not hz > 0:
        raise InputError(f"hz must be a positive number, got {hz!r}")
    if not _is_number(confirm_seconds) or not confirm_seconds >= 0:
        raise InputError(f"confirm_seconds must be a number >= 0, got {confirm_seconds!r}")
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


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar.start()
    bar.add_task("steps", total=total)
    return bar


def speedups(rt: dict, ref: dict) -> dict:
    """Reference / runtime ratios of the same run (> 1: the runtime is faster)."""
    r, f = rt["e2e"], ref["e2e"]
    out = {"e2e_median": f["median"] / r["median"], "e2e_p99": f["p99"] / r["p99"]}
    if rt["tokens_per_chunk"] and ref["tokens_per_chunk"]:
        rt_tok = r["median"] / rt["tokens_per_chunk"]["median"]
        ref_tok = f["median"] / ref["tokens_per_chunk"]["median"]
        out["per_generated_token"] = ref_tok / rt_tok
    return out


def yardstick_name() -> str:
    """What the GEMM yardstick times (part of the gate's identity: a baseline timed against another one is
    refused)."""
    return "fp32 MatMul " + " + ".join("x".join(map(str, shape)) for shape in Yardstick.SHAPES)


DISPATCH_NAME = "ORT chain of 20 x (MatMul+Add 1x128x128, center, 4-head softmax, residual)"


def load_policy(bundle, policy, threads: int | None, constrained: bool):
    """(policy, load RSS MB or None): load ``bundle`` with ``forced_tokens="flag"``, or check a given policy."""
    if policy is not None:
        rule = getattr(policy, "forced_tokens", None)
        if getattr(rule, "mode", None) != "flag":
            raise InputError(
                "run_bench needs a policy loaded with forced_tokens='flag' (it times chunks the model did not "
                f"fully choose and counts their tokens), got forced_tokens={getattr(rule, 'mode', None)!r}"
            )
        return policy, None
    from nora_edge.policy import NoraPolicy

    if bundle is None:
        raise InputError("run_bench needs a bundle directory or a loaded policy")
    before = rss_mb()
    policy = NoraPolicy.load(bundle, threads=threads, constrained=constrained, forced_tokens="flag")
    return policy, rss_mb() - before


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
    confirm_seconds: float = G.CONFIRM_SECONDS,
    confirm_steps: int = G.CONFIRM_STEPS,
    threads: int | None = None,
    unnorm_key: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    seed: int = 0,
    policy=None,
    constrained: bool = True,
    baseline7b: str | Path | None = None,
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
        confirm_seconds / confirm_steps: a stage over the limit is re-measured in rounds of ``confirm_steps``
            more steps for up to ``confirm_seconds`` before the gate fails (0: fail on the first pass).
        threads: ORT intra-op threads (and torch threads for the reference); None = library defaults.
        policy: an already loaded NoraPolicy with ``forced_tokens="flag"`` (for callers that wrap its stages).
        constrained: automaton-constrained decoding (the default runtime); False = HF-parity greedy, which
            generates the same tokens as the reference (needs a head="full" bundle).
        baseline7b: a ``baseline7b.json`` (``python -m nora_edge.bench.baseline7b``): its OpenVLA-7B host
            measurement joins the report's 7B section (which always holds the predictions on every profile).
        roofline: also predict the bundle's stages with the roofline (walks both graphs; a few seconds).

    Returns:
        The report dict (also in ``out/report.json``); ``result["gate"]["ok"]`` when ``against`` was given.
    """
    check_args(steps, warmup, hz, max_regression, confirm_steps, confirm_seconds)
    if baseline7b is not None:
        read_host_measurement(baseline7b)  # a bad file fails before the run, not after it
    if update_baseline and against is None:
        raise InputError("update_baseline needs against= (the baseline file to write)")
    if reference_quant is not None and reference is None:
        raise InputError(f"reference_quant={reference_quant!r} needs reference= (the checkpoint to load)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    policy, policy_rss = load_policy(bundle, policy, threads, constrained)
    horizon = policy.time_horizon
    ref = load_reference(reference, horizon, threads, reference_quant) if reference is not None else None
    deadline_ms = 1e3 * horizon / hz
    loop = StepLoop(policy, ref, bench_images(N_IMAGES, seed), instruction, unnorm_key, Yardstick(threads))
    for i in range(warmup):
        img = loop.images[i % N_IMAGES]
        run_runtime_step(policy, img, instruction, unnorm_key, Recorder())
        if ref is not None:
            run_reference_step(ref, img, instruction, unnorm_key, Recorder())
    rt, rf, rss_start, anon_start = Recorder(), Recorder(), rss_mb(), anon_rss_mb()
    bar = _progress(progress, steps)
    wall0 = time.perf_counter()
    rss_peak, anon_peak = loop.run(steps, rt, rf, bar)
    rss_peak = max(rss_start, rss_peak)
    anon_peak = None if anon_peak is None or anon_start is None else max(anon_start, anon_peak)
    wall = time.perf_counter() - wall0
    if bar:
        bar.stop()
    unit_samples = list(loop.yardstick.samples["gemm"])
    dispatch_samples = list(loop.yardstick.samples["dispatch"])
    # the host microbenchmark runs after the timed steps: its 64 MB weights leave 2-26 MB of freed but
    # resident heap behind (varying run to run), which the steps' memory peak must not count
    host = host_profile(measure_host(threads))
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
            "mode": policy.mode,
            "head": policy.bundle.actions.head,
            "forced_tokens": policy.forced_tokens.mode,
            "providers": policy.providers,
            "reference": str(reference) if reference else None,
            "reference_quant": reference_quant,
        },
        "host": host_profile_json(host),
        "unit_ms": {"samples": unit_samples, "min": min(unit_samples), "yardstick": yardstick_name()},
        "dispatch_ms": {
            "samples": dispatch_samples,
            "min": min(dispatch_samples),
            "yardstick": DISPATCH_NAME,
        },
        "runtime": runtime,
        "memory": {
            "policy_rss_mb": policy_rss,
            "rss_peak_mb": rss_peak,
            "anon_rss_peak_mb": anon_peak,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        },
        "wall_s": wall,
        "reference": (
            summarize_kind(rf, steps, horizon, deadline_ms, classes=False) if ref is not None else None
        ),
        "samples": {
            "runtime": {**rt.samples, "tokens": rt.tokens},
            "reference_e2e": rf.samples["e2e"] if ref is not None else [],
            "reference_tokens": rf.tokens,
            "runtime_wait_ms": rt.wait_ms,
        },
    }
    result["speedup"] = speedups(runtime, result["reference"]) if ref is not None else None
    if roofline and runtime["tokens_per_chunk"]:  # needs at least one decoded chunk for its lengths
        tokens = int(round(runtime["tokens_per_chunk"]["median"]))
        result["roofline"] = roofline_section(policy, instruction, runtime, host, tokens)
    result["baseline7b"] = baseline7b_section(host, baseline7b, bundle_actions_per_s(result, horizon))
    if against is not None:
        if update_baseline:
            G.write_baseline(Path(against), result)
        base = G.load_baseline(Path(against))
        verdict = G.confirm(result, base, max_regression, loop.remeasure, confirm_seconds, confirm_steps)
        result["gate"] = verdict.to_json()
    result["files"] = finish_outputs(result, out, plots)
    return result


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
