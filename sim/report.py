"""Evaluation reports: JSON, Markdown, PNG and GIF of one policy's run, or two runs paired on the same episodes.

Data flow: :class:`~nora_edge.sim.evaluate.EvalRun` per policy --:func:`summarize`--> per task and overall:
success rate with its Wilson 95% interval (``sim.stats.wilson``), policy latency per chunk and per executed
step (ms: mean / median / p99; a chunk's latency is spread over the actions executed from it), tokens per
chunk, repaired / forced / malformed counts, status and stop counts --:func:`compare`--> per task and overall
paired difference (``sim.stats.paired_difference``, Newcombe 1998 method 10) --:func:`write_report`-->
``report.json`` (every episode too), ``report.md``, ``success.png`` (success per task per policy with interval
bars, side by side), ``<label>.gif`` (frames at chunk starts of the first N episodes), each written to a temp
file and renamed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from nora_edge.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic

from .rollout import STATUSES, STOPS, EpisodeResult
from .stats import paired_difference, quantiles_ms, wilson


def _group(results: list[EpisodeResult]) -> dict:
    n = len(results)
    k = sum(r.success for r in results)
    lo, hi = wilson(k, n)
    chunk_s = [s for r in results for s in r.chunk_s]
    step_s = [s / m for r in results for s, m in zip(r.chunk_s, r.chunk_steps, strict=True) for _ in range(m)]
    tokens = [t for r in results for t in r.tokens]
    return {
        "episodes": n,
        "successes": k,
        "success_rate": k / n,
        "ci95": [lo, hi],
        "ms_per_chunk": quantiles_ms(chunk_s),
        "ms_per_step": quantiles_ms(step_s),
        "tokens_per_chunk": {"mean": float(np.mean(tokens)) if tokens else None, "n": len(tokens)},
        "steps_mean": float(np.mean([r.steps for r in results])),
        "repaired": sum(r.repaired for r in results),
        "forced": sum(r.forced for r in results),
        "malformed": sum(r.malformed for r in results),
        "status": {s: sum(r.status == s for r in results) for s in STATUSES},
        "stop": {s: sum(r.stop == s for r in results) for s in STOPS},
    }


def summarize(run) -> dict:
    """Per task (in plan order) and overall statistics of one :class:`EvalRun`."""
    tasks = list(dict.fromkeys(r.task for r in run.results))
    return {
        "tasks": {t: _group([r for r in run.results if r.task == t]) for t in tasks},
        "overall": _group(run.results),
    }


def compare(a, b) -> dict:
    """Paired difference (A - B) per task and overall; the runs must hold the same (task, seed) list.

    Raises:
        AssertionError: the runs' episodes differ (they were not planned with the same arguments).
    """
    keys_a = [(r.task, r.seed) for r in a.results]
    assert keys_a == [(r.task, r.seed) for r in b.results], "runs are not on the same episodes"
    out = {"a": a.label, "b": b.label, "tasks": {}}
    for t in dict.fromkeys(k[0] for k in keys_a):
        idx = [i for i, k in enumerate(keys_a) if k[0] == t]
        out["tasks"][t] = paired_difference([a.results[i].success for i in idx],
                                            [b.results[i].success for i in idx]).to_json()  # fmt: skip
    out["overall"] = paired_difference(
        [r.success for r in a.results], [r.success for r in b.results]
    ).to_json()
    return out


def run_json(run) -> dict:
    """One run as stored in report.json."""
    return {
        "policy": run.policy,
        "kind": run.kind,
        "label": run.label,
        "backend": run.backend,
        "config": run.config,
        "seconds": run.seconds,
        "events": run.events,
        "summary": summarize(run),
        "episodes": [r.to_json() for r in run.results],
    }


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown(report: dict) -> str:
    """report.json -> a Markdown page (one table per policy, the comparison table when present)."""
    lines = [f"# MetaWorld evaluation: {report['name']}", ""]
    for run in report["runs"]:
        lines += [f"## {run['label']} ({run['kind']}, {run['backend']})", "",
                  "| task | success | 95% CI | ms/chunk (mean/p99) | ms/step | tokens/chunk | repaired | forced "
                  "| malformed | crashed/hung/error |", "|" + "---|" * 10]  # fmt: skip
        rows = {**run["summary"]["tasks"], "**overall**": run["summary"]["overall"]}
        for t, g in rows.items():
            st = g["status"]
            lines.append(
                f"| {t} | {g['successes']}/{g['episodes']} ({_pct(g['success_rate'])}) | "
                f"{_pct(g['ci95'][0])}-{_pct(g['ci95'][1])} | {_f(g['ms_per_chunk']['mean'])}/"
                f"{_f(g['ms_per_chunk']['p99'])} | {_f(g['ms_per_step']['mean'])} | "
                f"{_f(g['tokens_per_chunk']['mean'])} | {g['repaired']} | {g['forced']} | {g['malformed']} | "
                f"{st['crashed']}/{st['hung']}/{st['error']} |"
            )
        latency = (run.get("config") or {}).get("latency_steps", 0)
        if latency:
            eps = run["episodes"]
            holds = [e.get("hold_steps", 0) for e in eps]
            ages = [a for e in eps for a in e.get("obs_age_steps", [])]
            lines += ["", f"Simulated latency: each chunk after the first arrives {latency} env steps after its frame "
                      f"(predicted while the current one executes). Hold steps per episode: mean "
                      f"{np.mean(holds):.1f}, max {max(holds)}; observation age of executed chunks: median "
                      f"{np.median(ages) if ages else 0:.0f} steps, max {max(ages) if ages else 0}."]  # fmt: skip
        if run["events"]:
            lines += ["", "Worker events (episode rerun once in a fresh worker):", ""]
            lines += [f"- {e['event']}: {e['task']} seed {e['seed']} attempt {e['attempt']}: {e['detail']}"
                      for e in run["events"]]  # fmt: skip
        lines.append("")
    c = report.get("comparison")
    if c:
        lines += [
            f"## {c['a']} minus {c['b']} (paired, Newcombe 1998 method 10)",
            "",
            "| task | n | difference | 95% CI | only A succeeded | only B succeeded |",
            "|" + "---|" * 6,
        ]
        for t, d in {**c["tasks"], "**overall**": c["overall"]}.items():
            lines.append(f"| {t} | {d['n']} | {100 * d['diff']:+.1f} pp | {100 * d['low']:+.1f} to "
                         f"{100 * d['high']:+.1f} pp | {d['a_only']} | {d['b_only']} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot_png(report: dict) -> bytes:
    """Success per task (and overall) per policy with Wilson 95% bars, as PNG bytes (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    tasks = list(runs[0]["summary"]["tasks"]) + ["overall"]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(tasks) * len(runs)), 3.6))
    x = np.arange(len(tasks))
    for i, run in enumerate(runs):
        groups = [run["summary"]["tasks"][t] for t in tasks[:-1]] + [run["summary"]["overall"]]
        rate = np.array([g["success_rate"] for g in groups])
        err = np.array([[r - g["ci95"][0], g["ci95"][1] - r] for r, g in zip(rate, groups, strict=True)]).T
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, rate, width, yerr=err, capsize=3, label=run["label"])
    ax.set_xticks(x, tasks, rotation=20, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="success rate (Wilson 95% CI)", title=f"MetaWorld: {report['name']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def gif_bytes(results: list[EpisodeResult]) -> bytes | None:
    """Frames at chunk starts of the episodes that recorded them, one GIF (None when there are none)."""
    import imageio.v3 as iio

    frames = [f for r in results if r.frames is not None for f in r.frames]
    if not frames:
        return None
    return iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=200, loop=0)


def write_report(out: str | Path, name: str, runs: list, comparison: dict | None = None) -> dict[str, Path]:
    """Write report.json, report.md, success.png and one GIF per run that recorded frames into ``out``.

    Returns:
        file kind -> path written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"name": name, "runs": [run_json(r) for r in runs], "comparison": comparison}
    paths = {
        "json": write_json_atomic(out / "report.json", report),
        "markdown": write_text_atomic(out / "report.md", markdown(report)),
        "png": write_bytes_atomic(out / "success.png", plot_png(report)),
    }
    for i, run in enumerate(runs):
        data = gif_bytes(run.results)
        if data is not None:
            paths[f"gif{i}"] = write_bytes_atomic(out / f"{run.label}{'_b' if i else ''}.gif", data)
    return paths
