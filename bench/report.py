"""Render and write bench reports: atomic JSON / Markdown writes, the bench-run report, the 7B baseline report.

Data flow: a result dict from ``run.run_bench`` or ``baseline7b.run_baseline`` -> Markdown text (tables of
per-stage medians/p99, speedups, predictions, assumptions) -> ``write_text_atomic`` / ``write_json_atomic``
(temp file in the same directory + ``os.replace``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nora_edge.atomic import write_text_atomic


def _jsonable(obj: object) -> object:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: Path, data: dict) -> Path:
    """JSON (numpy scalars and paths converted) written atomically."""
    return write_text_atomic(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats get 3 significant digits."""

    def cell(v: object) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def baseline_markdown(res: dict) -> str:
    """The NORA-vs-OpenVLA report (``baseline7b.md``)."""
    h = res["headline"]
    verdict = "meets" if h["nora_long_meets_25hz"] else "misses"
    out = [
        "# NORA-3B vs OpenVLA-7B on Jetson Orin (roofline predictions)",
        "",
        f"## Headline ({h['profile']}, INT4 weight-only decoder, FP16 vision)",
        "",
        f"- NORA-Long-3B (horizon 5): {h['nora_long_int4_ms']:.0f} ms per inference -> "
        f"{h['nora_long_int4_actions_per_s']:.1f} actions/s. 25 Hz control with 5-action chunks needs <= 200 ms "
        f"per inference: it {verdict} that [prediction].",
        f"- OpenVLA-7B: {h['openvla_int4_ms']:.0f} ms per action -> {h['openvla_int4_actions_per_s']:.2f} actions/s "
        "(measured reference: 336 ms/action with MLC INT4 on AGX Orin 64GB, Jetson AI Lab OpenVLA tutorial).",
        f"- NORA-Long delivers {h['actions_per_s_ratio']:.1f}x the actions/s of OpenVLA-7B; OpenVLA-7B needs "
        f"{h['memory_ratio_openvla_over_nora']:.2f}x the memory ({h['openvla_memory_gb']:.2f} GB vs "
        f"{h['nora_long_memory_gb']:.2f} GB, weights + KV cache).",
        "",
        "## Predictions on every profile",
        "",
        "Per-invocation ms; e2e = vision + prefill + steps x decode token + tokens x head.",
        "",
    ]
    rows = [
        [
            r["profile"],
            r["model"],
            r["plan"],
            r["stages"]["vision"],
            r["stages"]["prefill"],
            r["stages"]["decode_token"],
            r["decode_steps"],
            r["stages"]["action_head"],
            r["e2e_ms"],
            r["actions_per_s"],
            r["memory_gb"],
            r["meets_25hz"],
        ]
        for r in res["predictions"]
    ]
    out.append(
        table(
            [
                "profile",
                "model",
                "plan",
                "vision",
                "prefill",
                "decode/tok",
                "steps",
                "head",
                "e2e ms",
                "actions/s",
                "mem GB",
                "25 Hz",
            ],
            rows,
        )
    )
    if res.get("host_comparison"):
        out += ["", "## Host: prediction vs measurement (" + "extrapolated from one layer" + ")", ""]
        rows = []
        for c in res["host_comparison"]:
            for s, err in c["error"].items():
                rows.append(
                    [
                        c["model"],
                        c["precision"],
                        s,
                        c["predicted"]["stages"][s],
                        c["measured"]["stages"][s],
                        f"{100 * err:+.0f}%",
                    ]
                )
            rows.append(
                [
                    c["model"],
                    c["precision"],
                    "e2e",
                    c["predicted"]["e2e_ms"],
                    c["measured"]["e2e_ms"],
                    f"{100 * (c['predicted']['e2e_ms'] / c['measured']['e2e_ms'] - 1):+.0f}%",
                ]
            )
        out.append(table(["model", "precision", "stage", "predicted ms", "measured ms", "error"], rows))
    if res.get("calibration"):
        cal = res["calibration"]
        out += [
            "",
            "## Efficiency calibration (AGX Orin 64GB)",
            "",
            f"eff_compute = {cal['compute']:.3f}, eff_memory = {cal['memory']:.3f}, fitted to TensorRT "
            "Edge-LLM Qwen3-VL-2B INT4; OpenVLA-7B is held out.",
            "",
        ]
        rows = [[k, p, m, f"{100 * (p / m - 1):+.0f}%", "fit"] for k, (p, m) in cal["fit"].items()]
        rows += [[k, p, m, f"{100 * (p / m - 1):+.0f}%", "held out"] for k, (p, m) in cal["holdout"].items()]
        out.append(table(["reference", "predicted ms", "measured ms", "error", "role"], rows))
    out += ["", "## Assumptions", ""] + [f"- {a}" for a in res["assumptions"]]
    out += ["", "## Profile numbers and their sources", ""]
    for name, src in res["profiles"].items():
        out.append(f"### {name}")
        out.append(table(["field", "value", "estimate", "source"], [[f, v, e, s] for f, v, s, e in src]))
        out.append("")
    return "\n".join(out) + "\n"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def token_rates_text(kind: dict) -> str:
    """Repaired / forced_continue rates of one policy kind, per token and per chunk."""
    if kind.get("repaired_rate") is None:
        return "n/a (no constrained decoding)"
    return (
        f"repaired {_pct(kind['repaired_rate'])} of tokens ({_pct(kind['repaired_chunk_rate'])} of chunks), "
        f"forced_continue {_pct(kind['forced_rate'])} of tokens ({_pct(kind['forced_chunk_rate'])} of chunks)"
    )


def baseline7b_markdown(sec: dict) -> list[str]:
    """The OpenVLA-7B section of report.md: one row per profile."""
    out = [
        f"## 7B baseline: {sec['model']} on every profile",
        "",
        "Roofline predictions, ms per action (one action per inference); float = fp16 on the devices, fp32 on "
        "this host. This bundle's actions/s: measured on the host, predicted from its graphs on the devices.",
        "",
    ]
    rows = []
    for r in sec["rows"]:
        plans = r["plans"]
        flt = plans.get("fp16") or plans.get("fp32")
        meas = (r.get("host_measured") or {}).get("int4")
        own, ratio = r.get("bundle_actions_per_s"), r.get("bundle_over_openvla_int4")
        rows.append(
            [
                r["profile"],
                flt["e2e_ms"],
                plans["int8"]["e2e_ms"],
                plans["int4"]["e2e_ms"],
                plans["int4"]["actions_per_s"],
                plans["int4"]["memory_gb"],
                plans["int4"]["fits"],
                plans["int4"]["meets_25hz"],
                meas["e2e_ms"] if meas else ("not measured" if r["profile"] == "host" else "n/a"),
                own if own is not None else "n/a",
                f"{ratio:.1f}x" if ratio else "n/a",
            ]
        )
    header = ["profile", "float ms", "int8 ms", "int4 ms", "int4 actions/s", "int4 mem GB", "fits", "25 Hz"]
    out.append(table([*header, "host measured int4 ms", "this bundle actions/s", "vs 7B int4"], rows))
    src = sec.get("measured_from")
    out += [
        "",
        f"Host measurement: {EXTRAPOLATED_NOTE} from `{src}`."
        if src
        else "Host measurement: none passed (`nora-edge bench --baseline7b out/baseline7b/baseline7b.json`, "
        "written by `python -m nora_edge.bench.baseline7b`; minutes and GBs, never CI).",
    ]
    return out


EXTRAPOLATED_NOTE = "one real-size layer of each kind timed and multiplied out"


def launches_markdown(r: dict, stages: list[str]) -> list[str]:
    """Node counts per graph and the three prediction lines (roofline, + kernel launches, + one CUDA graph)."""
    out = [
        "### Node counts and kernel launches",
        "",
        "Nodes as stored and after onnxruntime's optimizer (ORT_ENABLE_ALL, subgraphs included); kernels = "
        "optimized nodes less view ops (reshapes, Shape), one launch each. For a TensorRT engine this is an upper "
        "bound (TensorRT fuses further).",
        "",
    ]
    rows = [
        [
            g,
            f"{c['bytes'] / 1e6:.1f}",
            c["file_nodes"],
            c["optimized_nodes"] if c["optimized_nodes"] is not None else "not optimized",
            c["kernels"],
            c["provider"] or "n/a",
            ", ".join(f"{op} {n}" for op, n in c["top_ops"][:5]),
            c["skipped"] or f"{c['seconds']:.2f} s",
        ]
        for g, c in r["node_counts"].items()
    ]
    header = ["graph", "MB", "file nodes", "optimized nodes", "kernels", "provider", "top ops", "note"]
    out += [table(header, rows), ""]
    lines = {"roofline only": r["profiles_roofline"], "+ kernel launches": r["profiles"]}
    lines["+ one CUDA graph launch"] = r["profiles_cuda_graph"]
    rows = [
        [p, label, *[v[p][s] for s in stages]]
        for p in r["profiles"]
        if (r.get("launch_costs") or {}).get(p)
        for label, v in lines.items()
    ]
    out += [
        f"Launches per invocation: {', '.join(f'{s} {n}' for s, n in r['launches'].items())}. Predicted ms per "
        "stage with launch costs (profiles' `[launch]` table):",
        "",
        table(["profile", "line", *stages], rows),
        "",
    ]
    groups: dict[str, list[str]] = {}  # profiles with the same launch costs share one line
    for p, lc in (r.get("launch_costs") or {}).items():
        text = (
            "; ".join(f"{k} = {q['value']:g} us ({q['source']})" for k, q in lc.items())
            if lc
            else "no launch cost (ORT's per-node overhead is inside the measured host rates)"
        )
        groups.setdefault(text, []).append(p)
    return out + [f"- {', '.join(ps)}: {text}" for text, ps in groups.items()]


def bench_markdown(res: dict) -> str:
    """The bench-run report (``report.md``)."""
    rt, cfg, b = res["runtime"], res["config"], res["bundle"]
    e = rt["e2e"]
    out = [
        "# nora-edge bench",
        "",
        f"Bundle `{b['path']}` ({b['size_bytes'] / 1e6:.1f} MB; precision {b['precision']}; horizon {b['horizon']}; "
        f"{b['head']} head). {cfg['steps']} steps after {cfg['warmup']} warmup, threads {cfg['threads'] or 'default'}.",
        "",
        f"- decoding: {cfg.get('mode', 'n/a')}; forced tokens: {cfg.get('forced_tokens', 'n/a')} (chunks the model "
        "did not fully choose are timed and counted)",
        "- execution providers: "
        + "; ".join(f"{g}: {', '.join(p)}" for g, p in (cfg.get("providers") or {}).items()),
        "",
        "## Headline",
        "",
        f"- median {e['median']:.2f} ms per inference (p99 {e['p99']:.2f}, jitter p99-p50 {e['jitter_ms']:.2f} ms) -> "
        f"{e['inferences_per_s']:.1f} inferences/s, {e['actions_per_s']:.1f} actions/s",
        f"- {cfg['hz']} Hz control with {b['horizon']}-action chunks: deadline {e['deadline_ms']:.0f} ms, "
        f"missed by {100 * e['deadline_miss_rate']:.1f}% of inferences",
        f"- tokens per chunk (median): {rt['tokens_per_chunk']['median'] if rt['tokens_per_chunk'] else 'n/a'}; "
        f"malformed: {100 * rt['malformed_rate']:.1f}% of chunks",
        f"- tokens the model did not choose: {token_rates_text(rt)}",
        f"- memory: policy RSS {res['memory']['policy_rss_mb'] or float('nan'):.0f} MB, peak RSS "
        f"{res['memory']['rss_peak_mb']:.0f} MB",
    ]
    if res.get("speedup"):
        s, ref = res["speedup"], res["reference"]
        quant = res["config"].get("reference_quant")
        label = f"PyTorch reference ({quant}, bitsandbytes)" if quant else "PyTorch reference (fp32)"
        out.append(
            f"- vs {label} (same run, same inputs): {s['e2e_median']:.1f}x faster median, "
            f"{s['e2e_p99']:.1f}x at p99, {s.get('per_generated_token', float('nan')):.1f}x per generated token "
            f"(reference median {ref['e2e']['median']:.1f} ms, {ref['tokens_per_chunk']['median']:.0f} tokens, "
            f"malformed {100 * ref['malformed_rate']:.0f}%)"
        )
    out += ["", "## Stages (ms)", ""]
    rows = [[s, v["median"], v["p90"], v["p99"], v["max"], v["n"]] for s, v in rt["stages"].items()]
    out.append(table(["stage", "median", "p90", "p99", "max", "n"], rows))
    if res.get("roofline"):
        r = res["roofline"]
        out += [
            "",
            "## Roofline (this bundle's graphs)",
            "",
            f"Prompt {r['prompt_tokens']} tokens ({r['cached_prefix_tokens']} cached at load), "
            f"{r['new_tokens']} generated tokens per chunk.",
            "",
        ]
        rows = [
            [
                s,
                v["gflop"],
                v["weight_mb"],
                v["predicted_ms"],
                v["measured_ms"],
                f"{100 * v['error']:+.0f}%" if v["error"] is not None else "n/a",
                v.get("measured_min_ms") or "n/a",
                f"{100 * v['error_vs_min']:+.0f}%" if v.get("error_vs_min") is not None else "n/a",
            ]
            for s, v in r["host"].items()
        ]
        header = [
            "stage",
            "GFLOP",
            "weights MB",
            "host predicted ms",
            "measured median",
            "error",
            "fastest",
            "error vs fastest",
        ]
        out.append(table(header, rows))
        out += ["", "Predicted ms per stage on each profile (the graphs as exported, same precision):", ""]
        stages = list(r["host"])
        out.append(
            table(["profile", *stages], [[p, *[v[s] for s in stages]] for p, v in r["profiles"].items()])
        )
        if r.get("node_counts"):
            out += ["", *launches_markdown(r, stages)]
    anchored = res.get("orin_anchored") or (res.get("roofline") or {}).get("orin_anchored")
    if anchored:
        from nora_edge.bench.orin_predict import orin_markdown

        out += ["", *orin_markdown(anchored)]
    if res.get("baseline7b"):
        out += ["", *baseline7b_markdown(res["baseline7b"])]
    if res.get("gate"):
        out += ["", "## CI gate", "", "```", res["gate"]["text"], "```"]
    if res.get("files"):
        out += ["", "## Plots", ""] + [
            f"- ![{k}]({Path(v).name})" for k, v in res["files"].items() if k.endswith(".png")
        ]
    return "\n".join(out) + "\n"
