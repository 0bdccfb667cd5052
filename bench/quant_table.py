"""The recipe table: size, per-token decode time, token agreement and action error for every recipe.

Data flow: fixture checkpoint (``--preset``, default medium) or ``--checkpoint`` -> fp32 bundle
(``export_bundle``) -> one bundle per recipe (``quantize_bundle``: calibration + fidelity report vs fp32) ->
every bundle loaded side by side in one process; the same held-out frames run round-robin through all of them
``--repeats`` times (decode-step times collected per recipe) -> ``quant_table.json`` + ``quant_table.md``
(medians and p99 of per-token decode time; fidelity aggregates from each bundle's report).

Run: ``python -m nora_edge.bench.quant_table --out /tmp/qt [--preset medium] [--recipes int8,int4]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from nora_edge.bench.report import write_text_atomic


def bundle_bytes(path: Path) -> dict:
    """Total and per-component bytes of a bundle (from its manifest)."""
    m = json.loads((path / "manifest.json").read_text())
    files = m["files"]

    def comp(c: dict) -> int:
        return sum(files[f]["size"] for f in (c["file"], *c.get("data_files", [])))

    return {
        "total": sum(f["size"] for f in files.values()),
        **{name: comp(c) for name, c in m["components"].items()},
    }


def time_policies(policies: dict, samples: list, repeats: int, threads_note: str) -> dict:
    """Round-robin the samples through every policy; per recipe the decode-step and vision times (s)."""
    steps = {name: [] for name in policies}
    vision = {name: [] for name in policies}
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"timing ({threads_note})", total=repeats * len(samples) * len(policies))
        for _ in range(repeats):
            for s in samples:
                for name, policy in policies.items():
                    policy.run_chunk(s.image, s.instruction)
                    steps[name].extend(policy.last_timings["decode_steps"])
                    vision[name].append(policy.last_timings["vision"])
                    bar.advance(task)
    out = {}
    for name in policies:
        st, vi = np.asarray(steps[name]) * 1e3, np.asarray(vision[name]) * 1e3
        out[name] = {
            "decode_ms_median": float(np.median(st)),
            "decode_ms_p99": float(np.percentile(st, 99)),
            "decode_steps_timed": int(st.size),
            "vision_ms_median": float(np.median(vi)),
        }
    return out


def build_table(
    out: Path,
    recipes: list[str],
    *,
    checkpoint: Path | None,
    preset: str,
    n_calibration: int,
    n_fidelity: int,
    repeats: int,
    threads: int,
) -> dict:
    """Export, quantize, time and report; returns the table dict (also written to ``out``)."""
    import torch

    from nora_edge.export.fixtures import build_fixture
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.quantize.bundle_quant import quantize_bundle
    from nora_edge.export.quantize.calibration import synthetic_samples
    from nora_edge.policy import NoraPolicy

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if checkpoint is None:
        checkpoint = build_fixture(out / f"ckpt_{preset}", preset=preset, horizon=5, seed=0, progress=True)
    fp32 = out / "fp32"
    if not (fp32 / "manifest.json").is_file():
        export_bundle(checkpoint, fp32, validate=False, progress=True)
    bundles, quant = {"fp32": fp32}, {}
    for name in recipes:
        if name == "fp32":
            continue
        t = time.time()
        bundles[name] = quantize_bundle(
            fp32, out / name, name, n_calibration=n_calibration, n_fidelity=n_fidelity, overwrite=True,
            accept_degraded=True,  # a fidelity table: a degraded bundle is a row to show, not a build to refuse
        )  # fmt: skip
        quant[name] = time.time() - t
    held = synthetic_samples(4, seed=99)
    policies = {  # timing study: chunks the model did not fully choose are timed too (their rate is in fidelity)
        n: NoraPolicy.load(p, providers="cpu", threads=threads, forced_tokens="flag")
        for n, p in bundles.items()
    }
    timing = time_policies(policies, held, repeats, f"{threads} thread(s)")
    rows = {}
    for name, path in bundles.items():
        m = json.loads((path / "manifest.json").read_text())
        fid = m.get("quantization", {}).get("fidelity")
        rows[name] = {
            "bytes": bundle_bytes(path),
            "precision": {
                c: m["components"][c].get("precision", m["components"][c].get("dtype"))
                for c in ("vision", "decoder", "embeddings")
            },
            **timing[name],
            "quantize_seconds": quant.get(name),
            "token_agreement": fid["token_agreement_mean"] if fid else 1.0,
            "exact_match_rate": fid["exact_match_rate"] if fid else 1.0,
            "logits_cosine_mean": fid["logits_cosine_mean"] if fid else 1.0,
            "action_l2_mean": fid["action_l2_mean"] if fid else 0.0,
            "action_max": max(fid["action_max_per_dof"]) if fid and fid["action_max_per_dof"] else 0.0,
            "malformed": fid["malformed_test"] if fid else 0,
        }
    table = {
        "checkpoint": str(checkpoint),
        "threads": threads,
        "repeats": repeats,
        "held_out_timing": len(held),
        "fidelity_samples": n_fidelity,
        "seconds": time.time() - t0,
        "rows": rows,
    }
    write_text_atomic(out / "quant_table.json", json.dumps(table, indent=1))
    write_text_atomic(out / "quant_table.md", render(table))
    return table


def render(table: dict) -> str:
    """Markdown table, one row per recipe."""
    fp32 = table["rows"]["fp32"]
    lines = [
        f"Checkpoint {Path(table['checkpoint']).name}; CPU, {table['threads']} thread(s); decode time over "
        f"{table['repeats']} x {table['held_out_timing']} held-out frames, all bundles interleaved in one process; "
        f"fidelity on {table['fidelity_samples']} other held-out frames vs fp32.",
        "",
        "| recipe | decoder prec. | bundle MB | decoder MB | decode ms/token median (p99) | vs fp32 | "
        "token agr. | logits cos | action L2 mean | action max err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in table["rows"].items():
        lines.append(
            f"| {name} | {r['precision']['decoder']} | {r['bytes']['total'] / 1e6:.1f} | "
            f"{r['bytes']['decoder'] / 1e6:.1f} | {r['decode_ms_median']:.2f} ({r['decode_ms_p99']:.2f}) | "
            f"{fp32['decode_ms_median'] / r['decode_ms_median']:.2f}x | {r['token_agreement']:.3f} | "
            f"{r['logits_cosine_mean']:.4f} | {r['action_l2_mean']:.4f} | {r['action_max']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from nora_edge.export.quantize import list_recipes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--recipes", default=",".join(r.name for r in list_recipes()))
    ap.add_argument("--calibration", type=int, default=8)
    ap.add_argument("--fidelity", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    recipes = ["fp32", *[r for r in a.recipes.split(",") if r and r != "fp32"]]
    table = build_table(
        a.out,
        recipes,
        checkpoint=a.checkpoint,
        preset=a.preset,
        n_calibration=a.calibration,
        n_fidelity=a.fidelity,
        repeats=a.repeats,
        threads=a.threads,
    )
    print(render(table))


if __name__ == "__main__":
    main()
