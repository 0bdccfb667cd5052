"""Derived sections of a bench report: the bundle, the roofline of its graphs, its speed per profile.

Data flow: loaded NoraPolicy + the runtime's statistics (``run.summarize_kind``) + the measured host profile ->
``bundle`` / ``roofline`` sections (``bundle_cost`` on the bundle's own graphs, every device profile; node counts
and kernel launches from ``launches``; ``roofline["orin_anchored"]``: NORA-Long int4 on the Orins anchored on
published measurements, with this run's tokens per chunk, ``orin_predict.orin_section``) ->
:func:`bundle_actions_per_s` (host measured, devices predicted) for the OpenVLA-7B section
(``baseline7b.bench_section``).
"""

from __future__ import annotations

import numpy as np

from nora_edge.bench.bundle_cost import bundle_stage_costs, predict_bundle
from nora_edge.bench.launches import bundle_node_counts, launch_costs_json, launch_lines, stage_launches
from nora_edge.bench.multitoken_acceptance import load_record
from nora_edge.bench.orin_predict import orin_section
from nora_edge.profiles import list_profiles, load_profile


def roofline_section(policy, instruction: str, summary: dict, host, new_tokens: int) -> dict:
    """Predicted vs measured per stage on the host, and predictions on every device profile.

    ``profiles``: roofline + one launch per kernel (the graphs' nodes after onnxruntime's fusion, view ops left
    out; ``launches``), the graphs run op by op; ``profiles_roofline``: bytes and FLOPs only;
    ``profiles_cuda_graph``: one CUDA graph launch per stage instead; ``node_counts``: per graph, as stored and
    after the optimizer (``launches.bundle_node_counts``). The host has no launch cost (its peaks are measured ORT
    kernel rates), so its three lines agree."""
    b = policy.bundle
    grid = np.asarray([b.components["vision"].meta.get("grid_thw", [1, 16, 16])], dtype=np.int64)
    prompt = policy.prompt.build(instruction, grid)
    prefix = int(policy.prompt.prefix_ids.size)
    costs = bundle_stage_costs(b, prompt.length, prefix, new_tokens, patches=int(np.prod(grid[0])))
    profiles = [host] + [load_profile(n) for n in list_profiles() if n != "host"]
    pred = predict_bundle(costs, profiles)
    nodes = bundle_node_counts(b, policy.providers)
    launches = stage_launches(nodes)
    lines = {p.name: launch_lines(costs, p, launches) for p in profiles}
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
        "profiles": {name: {s: v["kernel_ms"] for s, v in st.items()} for name, st in lines.items()},
        "profiles_roofline": {name: {s: v["ms"] for s, v in st.items()} for name, st in pred.items()},
        "profiles_cuda_graph": {
            name: {s: v["cuda_graph_ms"] for s, v in st.items()} for name, st in lines.items()
        },
        "node_counts": nodes,
        "launches": launches,
        "launch_costs": launch_costs_json(profiles),
        "orin_anchored": orin_section(
            summary.get("tokens_per_chunk"),
            b.codec.time_horizon,
            measured_on=_bundle_name(b),
            measured_acceptance=load_record(),
        ),  # fmt: skip
    }


def _bundle_name(bundle) -> str:
    """``<dir> (decoder L layers x H, <precision>)`` for the anchored prediction's token source."""
    dec = bundle.components["decoder"]
    layers, hidden = (dec.meta.get(k) for k in ("num_layers", "hidden_size"))
    return f"{bundle.path.name} (decoder {layers} layers x {hidden}, {dec.precision})"


def bundle_section(bundle) -> dict:
    """What was benched: path, size, precision per graph, head (action / full), horizon, decoder dims."""
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


def host_profile_json(host) -> dict:
    """The measured host profile's name and every number with its source."""
    return {"name": host.name, "sources": host.sources()}


def bundle_actions_per_s(result: dict, horizon: int) -> dict[str, float | None]:
    """The benched bundle's actions/s per profile: measured median on the host, roofline-predicted elsewhere
    (vision + prefill + (tokens - 1) decode steps; preprocessing and detokenization left out)."""
    speeds: dict[str, float | None] = {"host": result["runtime"]["e2e"]["actions_per_s"]}
    roof = result.get("roofline")
    if roof:
        steps = max(roof["new_tokens"] - 1, 0)
        for name, st in roof["profiles"].items():
            if name != "host":
                speeds[name] = 1e3 * horizon / (st["vision"] + st["prefill"] + steps * st["decode_step"])
    return speeds
