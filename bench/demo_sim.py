"""``nora-edge demo`` (what ``make demo`` runs): the main job on the MetaWorld policy shipped in ``policies/``.

Data flow: the committed NORA-format policy checkpoint --export (validated vs PyTorch, its post-processing
chain from ``train_report.json``)--> fp32 bundle --``quantize_bundle`` int8 / int4 (calibration + fidelity gate
on MetaWorld frames from ``sim.frames``)--> ``bench.run.run_bench`` of each bundle against the PyTorch
reference in the same run --> ``sim.evaluate`` closed loop: every bundle and the reference on the same
fresh-goal episodes (one GIF of the fp32 bundle) --> ``out/report.md``: one page (latency table, success table,
success plot, GIF). A bundle that misses its fidelity gate fails the demo (``DemoError``, exit 2) after the page
for the rest is written.
"""

from __future__ import annotations

import time
from pathlib import Path

from nora_edge.atomic import write_bytes_atomic
from nora_edge.bench.demo import HEADER as BENCH_HEADER
from nora_edge.bench.demo import PRECISIONS, DemoError, describe_error, headline_row, print_headline
from nora_edge.bench.report import table, write_json_atomic, write_text_atomic
from nora_edge.errors import InputError

SIM_POLICY = Path(__file__).resolve().parents[1] / "policies" / "metaworld-nora-long"
# the fixture demo's headline columns without its per-token ones (a trained policy's chunks are well formed)
HEADER = [h for h in BENCH_HEADER if h not in ("ref tokens", "speedup / token")]


def default_policy() -> Path:
    """The committed MetaWorld policy (InputError when this is not a source checkout)."""
    if not (SIM_POLICY / "config.json").is_file():
        raise InputError(
            f"no MetaWorld policy at {SIM_POLICY}: run from a nora-edge checkout or pass --checkpoint"
        )
    return SIM_POLICY


def run_sim_demo(
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    steps: int = 20,
    warmup: int = 3,
    episodes: int = 2,
    workers: int = 2,
    threads: int | None = 1,
    fidelity_per_task: int = 2,
) -> Path:
    """Export, quantize, bench and evaluate in closed loop; returns ``out/report.md``.

    Args:
        out: working and report directory.
        checkpoint: a MetaWorld policy checkpoint (default: the committed one).
        steps / warmup: timed and untimed inferences per bench run.
        episodes: closed-loop episodes per task per policy (the same episodes for every policy).
        workers: parallel evaluation workers; threads: ORT / torch threads in the bench.
        fidelity_per_task: MetaWorld frames per task for calibration and, separately, the fidelity gate.

    Raises:
        DemoError: a quantized bundle missed its gate or failed to build (the page is written first).
    """
    from nora_edge.bench.run import run_bench
    from nora_edge.sim.evaluate import EvalConfig, evaluate, plan
    from nora_edge.sim.metaworld_env import TASKS
    from nora_edge.sim.report import compare, summarize, write_report
    from nora_edge.sim.table import build_bundles, plot_table, sample_sets

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(checkpoint) if checkpoint is not None else default_policy()
    tasks = list(TASKS)
    print(f"[demo] MetaWorld frames for calibration and the fidelity gate ({fidelity_per_task} per task)")
    calib, held = sample_sets(tasks, fidelity_per_task)
    built = build_bundles(ckpt, out / "bundles", PRECISIONS[1:], calib, held, accept_degraded=False)
    bundles = {p: b["path"] for p, b in built.items() if b["path"] is not None}
    failed = {p: b["gate"] for p, b in built.items() if b["path"] is None}
    bench = {}
    for p, path in bundles.items():
        print(f"[demo] bench {p} vs the PyTorch reference ({steps} steps)")
        bench[p] = run_bench(path, reference=ckpt, steps=steps, warmup=warmup, threads=threads,
                             instruction=TASKS[tasks[0]], out=out / f"bench-{p}", progress=False)  # fmt: skip
    eps = plan(tasks, episodes, 0)
    runs = {}
    for name, path in {"pytorch": ckpt, **bundles}.items():
        print(f"[demo] closed loop: {name}, {len(eps)} episodes")
        cfg = EvalConfig(workers=workers, gif=1 if name == "fp32" else 0)
        runs[name] = evaluate(path, eps, cfg)
        runs[name].label = name
    closed = out / "closed-loop"
    summaries = {name: summarize(run) for name, run in runs.items()}
    vs_ref = {name: compare(run, runs["pytorch"]) for name, run in runs.items() if name != "pytorch"}
    files = {name: write_report(closed / name, name, [run], vs_ref.get(name)) for name, run in runs.items()}
    gif = next((p for k, p in files.get("fp32", {}).items() if k.startswith("gif")), None)
    rows = [
        [row[BENCH_HEADER.index(h)] for h in HEADER] for row in (headline_row(p, r) for p, r in bench.items())
    ]
    text = page(ckpt, rows, summaries, vs_ref, tasks, episodes, failed, gif, out, time.perf_counter() - t0)
    write_json_atomic(out / "demo.json", {
        "checkpoint": ckpt, "built": list(bundles), "failed": failed,
        "success": {n: s["overall"]["success_rate"] for n, s in summaries.items()},
    })  # fmt: skip
    rows_plot = [{"policy": n, "summary": s["overall"],
                  "per_task": {t: g["success_rate"] for t, g in s["tasks"].items()}}
                 for n, s in summaries.items()]  # fmt: skip
    write_bytes_atomic(out / "success.png", plot_table({"rows": rows_plot, "tasks": tasks,
                                                        "episodes_per_task": episodes}))  # fmt: skip
    report = write_text_atomic(out / "report.md", text)
    print_headline(rows, failed, report, header=HEADER)
    if failed:
        errors = {p: built[p]["error"] for p in failed}
        raise DemoError(
            f"demo failed: {len(failed)} bundle(s) did not build ({', '.join(failed)}); "
            + "; ".join(f"{p}: {describe_error(e)}" for p, e in errors.items())
            + f". The report for the rest is {report}",
            errors=errors,
            report=report,
        ) from next(iter(errors.values()))
    return report


def page(ckpt, rows, summaries, vs_ref, tasks, episodes, failed, gif, out, seconds) -> str:
    """The one page: what ran, latency vs PyTorch, closed-loop success per policy and task, plot, GIF.

    ``summaries``: policy -> ``sim.report.summarize``; ``vs_ref``: policy -> ``sim.report.compare`` vs PyTorch.
    """
    lines = ["# nora-edge demo: the MetaWorld policy, exported, quantized, timed and run in closed loop", ""]
    if failed:
        lines += [f"**DEMO FAILED: {len(failed)} bundle(s) did not build.**", ""]
        lines += [f"- {p}: {why}" for p, why in failed.items()] + [""]
    lines += [
        f"Policy `{ckpt}`: a NORA-architecture Qwen2.5-VL (FAST+ tokens, horizon 5) trained here on MetaWorld "
        f"demonstrations (`make train-sim`). Demo took {seconds / 60:.1f} min.",
        "",
        "## Latency (one chunk = 5 actions; each bundle and the PyTorch reference on the same frames, same run)",
        "",
        table(HEADER, rows),
        "",
        f"## Closed loop: {len(tasks)} tasks x {episodes} fresh-goal episodes, the same episodes for every policy",
        "",
        "| policy | success | 95% CI | vs PyTorch (paired, pp) | ms/step median | repaired / forced / malformed |",
        "|---|---|---|---|---|---|",
    ]
    for name, summary in summaries.items():
        s = summary["overall"]
        d = vs_ref[name]["overall"] if name in vs_ref else None
        vs = "-" if d is None else f"{100 * d['diff']:+.0f} [{100 * d['low']:+.0f}, {100 * d['high']:+.0f}]"
        med = s["ms_per_step"]["median"]
        lines.append(
            f"| {name} | {s['successes']}/{s['episodes']} | {100 * s['ci95'][0]:.0f}-{100 * s['ci95'][1]:.0f}% "
            f"| {vs} | {'-' if med is None else f'{med:.1f}'} | {s['repaired']} / {s['forced']} / {s['malformed']} |"
        )
    lines += [
        "",
        "| policy | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for name, summary in summaries.items():
        per = summary["tasks"]
        lines.append(
            f"| {name} | " + " | ".join(f"{per[t]['successes']}/{per[t]['episodes']}" for t in tasks) + " |"
        )
    lines += ["", "![success per policy and task](success.png)"]
    if gif is not None:
        lines += ["", f"![fp32 bundle, first episode]({Path(gif).relative_to(out)})"]
    lines += [
        "",
        "Per-policy reports: " + ", ".join(f"[{n}](closed-loop/{n}/report.md)" for n in summaries),
        "; bench reports: " + ", ".join(f"[{p}](bench-{p}/report.md)" for p in (r[0] for r in rows)),
        "",
        "Full table (fp32 / fp16 / int8 / int4 / mixed, 20 episodes per task, fidelity beside success): "
        "`make eval-sim`.",
    ]
    return "\n".join(lines) + "\n"
