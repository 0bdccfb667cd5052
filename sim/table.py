"""``make eval-sim``: every precision of the MetaWorld policy in closed loop, with fidelity beside success.

Data flow: policy checkpoint --export (validated vs PyTorch, the sim chain ``sim.train.EXPORT_ARGS``)--> fp32
bundle --``quantize_bundle`` per recipe (calibration and held-out fidelity frames are MetaWorld frames from
``sim.frames``, never evaluation or demonstration episodes; a missed fidelity gate is recorded, not hidden: the
bundle is built with ``accept_degraded`` so its closed-loop cost can be measured, and the table says "gate
failed")--> bundles --``sim.evaluate.evaluate`` on ONE episode plan (same tasks and seeds for every policy)-->
the PyTorch reference, each bundle, and the fp32 bundle with blank frames (vision ablation) --> paired
differences vs the reference and vs fp32 (``sim.stats``) + token agreement / action error from each bundle's
fidelity report (vs fp32) and from a fidelity run of fp32 vs PyTorch --> ``table.json`` / ``table.md`` /
``success.png`` + one ``sim.report`` directory per policy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from nora_edge.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from nora_edge.errors import NoraEdgeError

from .evaluate import EvalConfig, evaluate, parse_tasks, plan
from .metaworld_env import TASKS
from .report import compare, summarize, write_report
from .rollout import parse_export_args

RECIPES = ("fp16", "int8", "int4", "mixed")
FIDELITY_KEYS = ("token_agreement_mean", "exact_match_rate", "action_l2_mean", "action_err_frac_mean")


def sample_sets(tasks: list[str], per_task: int) -> tuple[list, list]:
    """(calibration, held-out) CalibrationSample lists from expert rollouts (frame seed sets 0 and 1)."""
    from nora_edge.export.quantize.calibration import CalibrationSample

    from .frames import policy_view_samples

    calib = [CalibrationSample(f, t) for f, t in policy_view_samples(tasks, per_task, seed=0)]
    held = [CalibrationSample(f, t) for f, t in policy_view_samples(tasks, per_task, seed=1)]
    return calib, held


def export_args(ckpt: Path) -> tuple[list[str], list[bool] | None]:
    """The checkpoint's chain options from its train_report.json (gripper steps, mask)."""
    report = json.loads((ckpt / "train_report.json").read_text(encoding="utf-8"))
    return parse_export_args(report["export_args"])


def build_bundles(
    ckpt: Path, out: Path, recipes: tuple[str, ...], calib: list, held: list, accept_degraded: bool = True
) -> dict[str, dict]:
    """fp32 + one bundle per recipe under ``out``; per name: path (or None), the gate outcome, and ``error``
    (the exception) when not built. ``accept_degraded`` False enforces each recipe's fidelity gate."""
    from nora_edge.export.pipeline import export_bundle

    gripper, mask = export_args(ckpt)
    built: dict[str, dict] = {}
    fp32 = out / "fp32"
    if not (fp32 / "manifest.json").is_file():
        export_bundle(ckpt, fp32, validation_instructions=list(TASKS.values()), gripper=gripper, mask=mask,
                      overwrite=True)  # fmt: skip
    built["fp32"] = {"path": fp32, "gate": "validated vs PyTorch"}
    for r in recipes:
        built[r] = build_one(fp32, out / r, r, calib, held, accept_degraded)
    return built


COMPONENTS = ("vision", "decoder", "action_head", "embeddings")


def component_recipes(name: str) -> dict[str, object]:
    """Recipe ``name`` applied to one component at a time (the rest fp32): component -> BundleRecipe.

    A combination the recipe registry refuses (e.g. an fp16 head without an fp16 decoder) is left out.
    """
    from dataclasses import replace

    from nora_edge.export.quantize import BundleRecipe, get_recipe

    full = get_recipe(name)
    out = {}
    for comp in COMPONENTS:
        if getattr(full, comp) == getattr(BundleRecipe("x", "x"), comp):
            continue  # the recipe leaves this component at fp32
        try:
            out[comp] = replace(
                BundleRecipe(f"{name}-{comp}-only", f"{name} on the {comp} only"),
                **{comp: getattr(full, comp)},
                fidelity=full.fidelity,
            )
        except NoraEdgeError:
            continue
    return out


def build_one(fp32: Path, dst: Path, recipe, calib: list, held: list, accept_degraded: bool = True) -> dict:
    """One quantized bundle from ``fp32`` with ``recipe`` (name or BundleRecipe): path (None when not built),
    gate outcome, and ``error`` (the exception, never raised)."""
    from nora_edge.export.quantize import quantize_bundle

    try:
        if not (dst / "manifest.json").is_file():
            quantize_bundle(fp32, dst, recipe, calibration=calib, held_out=held, overwrite=True,
                            accept_degraded=accept_degraded)  # fmt: skip
        validation = json.loads((dst / "manifest.json").read_text(encoding="utf-8")).get("validation", {})
        failed = validation.get("accepted_despite_failure")
        return {"path": dst, "gate": "gate failed (built for measurement)" if failed else "passed"}
    except NoraEdgeError as e:
        return {"path": None, "gate": f"not built: {type(e).__name__}: {e}", "error": e}


def fidelity_row(bundle: Path) -> dict | None:
    """The FIDELITY_KEYS of a bundle's own fidelity_report.json (vs fp32 on held-out MetaWorld frames)."""
    path = bundle / "fidelity_report.json"
    if not path.is_file():
        return None
    agg = json.loads(path.read_text(encoding="utf-8"))["aggregates"]
    return {k: agg.get(k) for k in FIDELITY_KEYS} | {"n": agg.get("n")}


def fp32_vs_reference(ckpt: Path, fp32: Path, held: list, out: Path) -> dict:
    """Fidelity of the fp32 bundle vs the PyTorch checkpoint on the held-out frames."""
    from nora_edge.export.fidelity import fidelity_report
    from nora_edge.export.reference import ReferencePolicy

    ref = ReferencePolicy.from_pretrained(ckpt)
    rep = fidelity_report(ref, fp32, held, out, labels=("pytorch", "fp32"))
    return {k: rep["aggregates"].get(k) for k in FIDELITY_KEYS} | {"n": rep["aggregates"].get("n")}


def _dir_mb(path: Path | None) -> float | None:
    if path is None:
        return None
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def run_table(
    ckpt: str | Path,
    out: str | Path,
    *,
    tasks: str | list[str] = "all",
    episodes: int = 20,
    seed: int = 0,
    workers: int = 2,
    recipes: tuple[str, ...] = RECIPES,
    ablate: tuple[str, ...] = (),
    fidelity_per_task: int = 4,
    progress: bool = True,
) -> dict:
    """Build every bundle of ``ckpt``, evaluate all on one plan, write the table; returns table.json's dict."""
    ckpt, out = Path(ckpt), Path(out)
    names = parse_tasks(tasks)
    t0 = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    say(
        f"[eval-sim] held-out frames: {fidelity_per_task} per task x {len(names)} tasks (calibration + fidelity)"
    )
    calib, held = sample_sets(names, fidelity_per_task)
    say("[eval-sim] building bundles: fp32 (validated) + " + ", ".join(recipes))
    built = build_bundles(ckpt, out / "bundles", recipes, calib, held)
    for name in ablate:  # one component at a time: which part of the recipe costs success
        for comp, recipe in component_recipes(name).items():
            key = f"{name}:{comp}"
            built[key] = build_one(
                built["fp32"]["path"], out / "bundles" / f"{name}-{comp}-only", recipe, calib, held
            )
    fidelity = {
        "fp32": fp32_vs_reference(ckpt, built["fp32"]["path"], held, out / "fidelity_fp32_vs_pytorch")
    }
    for r, b in built.items():
        if r != "fp32" and b["path"] is not None:
            fidelity[r] = fidelity_row(b["path"])
    eps = plan(names, episodes, seed)
    cfg = EvalConfig(workers=workers)
    policies = {"pytorch": ckpt, **{k: v["path"] for k, v in built.items() if v["path"] is not None}}
    runs = {}
    for name, path in policies.items():
        say(f"[eval-sim] {name}: {len(eps)} episodes ({len(names)} tasks x {episodes}), {workers} workers")
        runs[name] = evaluate(path, eps, cfg)
        runs[name].label = name
    say("[eval-sim] pytorch executing NORA's fallback (zeros) for a malformed chunk, as NORA does")
    runs["pytorch, NORA fallback"] = evaluate(ckpt, eps, EvalConfig(workers=workers, nora_fallback=True))
    runs["pytorch, NORA fallback"].label = "pytorch, NORA fallback"
    say("[eval-sim] fp32 with blank frames (vision ablation)")
    runs["fp32 blank image"] = evaluate(
        built["fp32"]["path"], eps, EvalConfig(workers=workers, blank_image=True)
    )
    runs["fp32 blank image"].label = "fp32 blank image"
    for name, run in runs.items():
        other = "pytorch" if name != "pytorch" else None
        write_report(out / "runs" / name.replace(" ", "_"), name, [run],
                     compare(run, runs[other]) if other else None)  # fmt: skip
    rows = []
    for name, run in runs.items():
        summary = summarize(run)
        s = summary["overall"]
        base = name.removesuffix(" blank image")
        rows.append({
            "policy": name,
            "bundle": str(policies.get(base, "")),
            "mb": _dir_mb(built[base]["path"]) if base in built else _dir_mb(ckpt),
            "gate": built[base]["gate"] if base in built else "reference",
            "summary": s,
            "per_task": {t: g["success_rate"] for t, g in summary["tasks"].items()},
            "vs_pytorch": compare(run, runs["pytorch"])["overall"] if name != "pytorch" else None,
            "vs_pytorch_decoded": vs_decoded(run, runs["pytorch"]) if name != "pytorch" else None,
            "vs_fp32": compare(run, runs["fp32"])["overall"] if name not in ("pytorch", "fp32") else None,
            "fidelity": fidelity.get(name),
        })  # fmt: skip
    table = {
        "checkpoint": str(ckpt),
        "tasks": names,
        "episodes_per_task": episodes,
        "seed": seed,
        "workers": workers,
        "threads_per_worker": cfg.worker_threads(),
        "fidelity_frames": len(held),
        "not_built": {k: v["gate"] for k, v in built.items() if v["path"] is None},
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    write_json_atomic(out / "table.json", table)
    write_text_atomic(out / "table.md", markdown(table))
    write_bytes_atomic(out / "success.png", plot_table(table))
    say(f"[eval-sim] {out / 'table.md'} ({table['seconds'] / 60:.1f} min)")
    return table


def plot_table(table: dict) -> bytes:
    """Success per task per policy (grouped bars) + overall with Wilson 95% bars, PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, tasks = table["rows"], table["tasks"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1]})
    x, width = np.arange(len(tasks)), 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar(
            x + (i - (len(rows) - 1) / 2) * width, [r["per_task"][t] for t in tasks], width, label=r["policy"]
        )
    ax.set_xticks(x, [t.removesuffix("-v3") for t in tasks], rotation=15, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="success rate", title="per task")
    ax.legend(fontsize=7, ncol=2)
    rate = np.array([r["summary"]["success_rate"] for r in rows])
    lo = np.array([r["summary"]["ci95"][0] for r in rows])
    hi = np.array([r["summary"]["ci95"][1] for r in rows])
    ax2.bar(np.arange(len(rows)), rate, yerr=[rate - lo, hi - rate], capsize=3,
            color=[f"C{i}" for i in range(len(rows))])  # fmt: skip
    ax2.set_xticks(np.arange(len(rows)), [r["policy"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax2.set(ylim=(0, 1.05), title="overall (Wilson 95% CI)")
    fig.suptitle(f"MetaWorld closed loop, {table['episodes_per_task']} episodes per task")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def vs_decoded(run, ref) -> dict:
    """Paired difference vs ``ref`` on the episodes where ``ref`` decoded every chunk (no malformed stop).

    NORA's unconstrained decoding can emit a chunk with the wrong coefficient count; the harness never executes
    it and the episode fails, while the constrained runtime cannot emit one. This isolates the numerical part.
    """
    from .stats import paired_difference

    keep = [i for i, r in enumerate(ref.results) if r.stop != "malformed"]
    d = paired_difference([run.results[i].success for i in keep], [ref.results[i].success for i in keep])
    return d.to_json()


def _pp(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def _num(x, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(table: dict) -> str:
    """table.json -> the page a person reads (one row per policy)."""
    lines = [
        "# MetaWorld policy: closed-loop success and fidelity per precision",
        "",
        f"Tasks: {', '.join(table['tasks'])}; {table['episodes_per_task']} fresh-goal episodes per task "
        f"(seed {table['seed']}), the same episodes for every row; {table['workers']} workers x "
        f"{table['threads_per_worker']} thread(s). Success 95% CI: Wilson; paired differences: Newcombe 1998 "
        "method 10, in percentage points; 'where it decoded': only the episodes in which the PyTorch reference "
        "never emitted a malformed chunk (those end as failures; the constrained runtime cannot emit one). "
        "Token agreement / action error: vs the fp32 bundle on "
        f"{table['fidelity_frames']} held-out MetaWorld frames (fp32 row: vs PyTorch).",
        "",
        "| policy | MB | gate | success [95% CI] | vs PyTorch (pp) | vs PyTorch where it decoded (pp, n) | "
        "vs fp32 (pp) | token agreement | action L2 | repaired / forced / malformed | ms/step median | "
        "ms/chunk median / p99 | tokens/chunk |",
        "|" + "---|" * 13,
    ]
    for r in table["rows"]:
        s, f = r["summary"], r["fidelity"] or {}
        lines.append(
            f"| {r['policy']} | {_num(r['mb'], '{:.1f}')} | {r['gate']} | {100 * s['success_rate']:.1f}% "
            f"[{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}] | {_pp(r['vs_pytorch'])} | "
            f"{_pp(r['vs_pytorch_decoded'])}{'' if r['vs_pytorch_decoded'] is None else ', ' + str(r['vs_pytorch_decoded']['n'])} "
            f"| {_pp(r['vs_fp32'])} "
            f"| {_num(f.get('token_agreement_mean'))} | {_num(f.get('action_l2_mean'), '{:.4f}')} | "
            f"{s['repaired']} / {s['forced']} / {s['malformed']} | {_num(s['ms_per_step']['median'], '{:.2f}')} | "
            f"{_num(s['ms_per_chunk']['median'], '{:.1f}')} / {_num(s['ms_per_chunk']['p99'], '{:.1f}')} | "
            f"{_num(s['tokens_per_chunk']['mean'], '{:.2f}')} |"
        )
    if table["not_built"]:
        lines += ["", "Not built: " + "; ".join(f"{k}: {v}" for k, v in table["not_built"].items())]
    tasks = table["tasks"]
    lines += [
        "",
        "Per task success:",
        "",
        "| policy | " + " | ".join(tasks) + " |",
        "|" + "---|" * (len(tasks) + 1),
    ]
    for r in table["rows"]:
        lines.append(
            f"| {r['policy']} | " + " | ".join(f"{100 * r['per_task'][t]:.0f}%" for t in tasks) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m nora_edge.sim.table CKPT --out DIR [--tasks all] [--episodes N] [--seed S] [--workers K]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nora_edge.sim.table", description=main.__doc__)
    ap.add_argument("checkpoint")
    ap.add_argument("--out", default="out/sim/eval")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--ablate", default="", help="recipes to apply one component at a time, e.g. int4")
    a = ap.parse_args(argv)
    recipes = tuple(x for x in a.recipes.split(",") if x)
    run_table(a.checkpoint, a.out, tasks=a.tasks, episodes=a.episodes, seed=a.seed, workers=a.workers,
              recipes=recipes, ablate=tuple(x for x in a.ablate.split(",") if x))  # fmt: skip
    print(f"table: {Path(a.out) / 'table.md'}")


if __name__ == "__main__":
    main()
