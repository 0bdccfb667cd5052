"""One page for a scale run: every bundle's bench report, fidelity and build cost side by side.

Data flow: the output folder of ``make bench-real`` -> per precision: ``bench-real-<p>/report.json`` (latency,
memory, roofline per profile), ``bundle-real-<p>/manifest.json`` + ``fidelity_report.json`` (size; fidelity vs
the fp32 bundle), ``export-real.time`` / ``quant-real-<p>.time`` (``/usr/bin/time -v``: wall time, peak RSS);
``bench-real-baseline7b/baseline7b.json`` (the AGX Orin headline) -> ``summary.json`` + ``summary.md`` (atomic).
A missing piece is reported as missing, never filled in.

Run: ``python -m nora_edge.bench.summary OUT [--precisions fp32,int8,int4] [--profile orin-agx-64gb]``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from nora_edge.atomic import write_json_atomic, write_text_atomic
from nora_edge.errors import InputError

PRECISIONS = ("fp32", "int8", "int4")
PROFILE = "orin-agx-64gb"


def read_time_file(path: Path) -> dict | None:
    """Wall seconds and peak RSS (GB) from a ``/usr/bin/time -v`` log; None when absent or incomplete."""
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    status = re.search(r"Exit status: (\d+)", text)
    if not (wall and rss):
        return None
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return {
        "wall_s": seconds,
        "peak_rss_gb": int(rss.group(1)) * 1024 / 1e9,
        "exit_status": int(status.group(1)) if status else None,
    }


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def bundle_row(out: Path, precision: str, profile: str) -> dict:
    """Everything known about one precision's bundle; missing sources become None fields."""
    report = _json(out / f"bench-real-{precision}" / "report.json")
    manifest = _json(out / f"bundle-real-{precision}" / "manifest.json")
    fidelity = _json(out / f"bundle-real-{precision}" / "fidelity_report.json")
    build = out / ("export-real.time" if precision == "fp32" else f"quant-real-{precision}.time")
    row: dict = {"precision": precision, "build": read_time_file(build), "bench": None, "fidelity": None}
    if manifest is not None:
        row["size_gb"] = sum(f["size"] for f in manifest["files"].values()) / 1e9
    if fidelity is not None:
        agg = fidelity["aggregates"]
        keys = ("token_agreement_mean", "logits_cosine_mean", "action_l2_mean", "malformed_test")
        row["fidelity"] = {k: agg[k] for k in keys}
    if report is not None:
        stages, e2e = report["runtime"]["stages"], report["runtime"]["e2e"]
        host = report["roofline"]["host"] if report.get("roofline") else {}
        row["bench"] = {
            "steps": report["config"]["steps"],
            "threads": report["config"]["threads"],
            "e2e_p50_ms": e2e["p50"],
            "e2e_p99_ms": e2e["p99"],
            "actions_per_s": e2e["actions_per_s"],
            "stage_p50_ms": {s: stages[s]["p50"] for s in ("vision", "prefill", "decode_step")},
            "tokens_per_chunk": report["runtime"]["tokens_per_chunk"]["p50"],
            "malformed_rate": report["runtime"]["malformed_rate"],
            "peak_rss_gb": report["memory"]["rss_peak_mb"] / 1e3,
            "host_prediction_error": {s: v["error"] for s, v in host.items()},
            "profile_ms": report["roofline"]["profiles"].get(profile) if report.get("roofline") else None,
            "orin_anchored": _anchored(report),
        }
    return row


def _anchored(report: dict) -> dict | None:
    """The anchored NORA-Long int4 headline of a report (``orin_predict.orin_section``) with its tokens per chunk;
    None for reports written before it existed."""
    sec = report.get("orin_anchored") or (report.get("roofline") or {}).get("orin_anchored")
    if not sec:
        return None
    return {**sec["headline"], "tokens_per_chunk": sec["tokens_per_chunk"]}


def build_summary(out: Path, precisions: tuple[str, ...] = PRECISIONS, profile: str = PROFILE) -> dict:
    """The summary of the scale run in ``out``.

    Raises:
        InputError: ``out`` is not a folder.
    """
    out = Path(out)
    if not out.is_dir():
        raise InputError(f"scale-run folder not found: {out}")
    base = _json(out / "bench-real-baseline7b" / "baseline7b.json")
    return {
        "out": str(out),
        "profile": profile,
        "bundles": [bundle_row(out, p, profile) for p in precisions],
        "baseline7b_headline": base["headline"] if base else None,
    }


def _f(v, fmt: str = ".3g") -> str:
    return "missing" if v is None else format(v, fmt)


def anchored_lines(summary: dict) -> list[str]:
    """NORA-Long int4 actions/s on AGX Orin 64GB anchored on TensorRT Edge-LLM's published Orin numbers, with each
    bench run's tokens per chunk (multi-token acceptances are assumptions until measured)."""
    heads = {r["precision"]: (r["bench"] or {}).get("orin_anchored") for r in summary["bundles"]}
    accs = sorted(
        {k for h in heads.values() if h for k in h["actions_per_s"] if k != "plain"},
        key=lambda k: float(k.split()[0]),
    )
    lines = [
        "Anchored NORA-Long int4 on AGX Orin 64GB (roofline fitted on TensorRT Edge-LLM's Orin measurements, one "
        "anchor held out; actions/s by acceptance = tokens per decoder call, assumed until measured):",
        "",
        "| bundle | tokens/chunk (median, source) | plain | "
        + " | ".join(f"a={a}" for a in accs)
        + " | held-out error |",
        "|---|---|---|" + "---|" * len(accs) + "---|",
    ]
    for p, h in heads.items():
        if not h:
            lines.append(f"| {p} | missing | | " + "| " * len(accs) + "|")
            continue
        tok = h["tokens_per_chunk"]
        src = "measured" if tok["source"].startswith("measured") else "estimate"
        cells = [_f(h["actions_per_s"].get(a), ".1f") for a in accs]
        lines.append(
            f"| {p} | {tok['median']:g} ({src}) | {_f(h['actions_per_s']['plain'], '.1f')} | "
            + " | ".join(cells)
            + f" | {h['held_out']} {h['held_out_error']:+.1%} |"
        )
    return lines


def render(summary: dict) -> str:
    """Markdown page of :func:`build_summary`."""
    lines = [
        "# Scale run: real-shape NORA-Long (random weights)",
        "",
        "| bundle | size GB | build s | build peak GB | e2e p50 ms | e2e p99 ms | vision | prefill | "
        "decode/token | tokens | actions/s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["bundles"]:
        b, build = r["bench"] or {}, r["build"] or {}
        st = b.get("stage_p50_ms", {})
        lines.append(
            f"| {r['precision']} | {_f(r.get('size_gb'))} | {_f(build.get('wall_s'), '.0f')} | "
            f"{_f(build.get('peak_rss_gb'))} | {_f(b.get('e2e_p50_ms'), '.0f')} | {_f(b.get('e2e_p99_ms'), '.0f')} | "
            f"{_f(st.get('vision'), '.0f')} | {_f(st.get('prefill'), '.0f')} | {_f(st.get('decode_step'), '.1f')} | "
            f"{_f(b.get('tokens_per_chunk'))} | {_f(b.get('actions_per_s'))} | {_f(b.get('peak_rss_gb'))} |"
        )
    threads = sorted(
        {str((r["bench"] or {}).get("threads") or "ORT default") for r in summary["bundles"] if r["bench"]}
    )
    lines += [
        "",
        f"Bench threads: {', '.join(threads) or 'n/a'}. Build = export (fp32) or quantize, `/usr/bin/time -v`; its peak RSS counts mapped file pages too.",
    ]
    lines += ["", "Host roofline prediction error per stage (predicted / measured median - 1):", ""]
    lines += ["| bundle | vision | prefill | decode_step |", "|---|---|---|---|"]
    for r in summary["bundles"]:
        err = (r["bench"] or {}).get("host_prediction_error") or {}
        cells = [
            _f(err.get(s), "+.0%") if s in err else "missing" for s in ("vision", "prefill", "decode_step")
        ]
        lines.append(f"| {r['precision']} | " + " | ".join(cells) + " |")
    lines += ["", f"Predicted ms per stage on {summary['profile']} (these graphs, same precision):", ""]
    lines += ["| bundle | vision | prefill | decode_step |", "|---|---|---|---|"]
    for r in summary["bundles"]:
        prof = (r["bench"] or {}).get("profile_ms") or {}
        cells = [_f(prof.get(s), ".1f") for s in ("vision", "prefill", "decode_step")]
        lines.append(f"| {r['precision']} | " + " | ".join(cells) + " |")
    lines += ["", *anchored_lines(summary)]
    lines += [
        "",
        "Fidelity vs the fp32 bundle (8 held-out frames; random weights, so agreement is a floor):",
        "",
    ]
    lines += ["| bundle | token agreement | logits cosine | action L2 | malformed |", "|---|---|---|---|---|"]
    for r in summary["bundles"]:
        fid = r["fidelity"]
        if fid is None:
            lines.append(
                f"| {r['precision']} | reference | | | |"
                if r["precision"] == "fp32"
                else f"| {r['precision']} | missing | | | |"
            )
            continue
        lines.append(
            f"| {r['precision']} | {fid['token_agreement_mean']:.2f} | {fid['logits_cosine_mean']:.4f} | "
            f"{fid['action_l2_mean']:.3f} | {fid['malformed_test']} |"
        )
    head = summary["baseline7b_headline"]
    lines += ["", "## NORA-3B vs OpenVLA-7B (analytic, bench-real-baseline7b/baseline7b.md)", ""]
    if head is None:
        lines.append("missing: run `python -m nora_edge.bench.baseline7b OUT`")
    else:
        lines += [
            f"On {head['profile']}, int4 weights (assumptions listed in baseline7b.md):",
            f"- NORA-Long-3B: {head['nora_long_int4_ms']:.0f} ms per inference, "
            f"{head['nora_long_int4_actions_per_s']:.1f} actions/s (25 Hz: {'met' if head['nora_long_meets_25hz'] else 'missed'}), "
            f"{head['nora_long_memory_gb']:.2f} GB",
            f"- OpenVLA-7B: {head['openvla_int4_ms']:.0f} ms per action, {head['openvla_int4_actions_per_s']:.2f} actions/s, "
            f"{head['openvla_memory_gb']:.2f} GB",
            f"- NORA-Long gives {head['actions_per_s_ratio']:.1f}x the actions/s with "
            f"1/{head['memory_ratio_openvla_over_nora']:.2f} of the memory",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--profile", default=PROFILE)
    args = ap.parse_args(argv)
    summary = build_summary(args.out, tuple(args.precisions.split(",")), args.profile)
    write_json_atomic(args.out / "summary.json", summary)
    md = render(summary)
    write_text_atomic(args.out / "summary.md", md)
    print(md)
    print(f"written: {args.out / 'summary.md'}")


if __name__ == "__main__":  # pragma: no cover - `make bench-real`
    main()
