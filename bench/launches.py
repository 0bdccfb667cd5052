"""Kernel launches in the roofline: node counts of a bundle's graphs and each device profile's launch cost.

Data flow: an ONNX graph -> its node count (subgraphs included) and, through onnxruntime's optimizer
(``ORT_ENABLE_ALL``, the providers the runtime uses, the optimized model written with its weights as external data
to a temporary directory) -> nodes after fusion, the ones that launch a kernel (view ops excluded), top op types
(:func:`graph_node_counts`, :func:`bundle_node_counts`) -> launches per stage (:func:`stage_launches`; analytic
specs: :func:`analytic_launches`) x the profile's ``[launch]`` costs (:func:`launch_costs`: one kernel launch, one
CUDA graph launch) -> three predictions per stage (:func:`launch_lines`): roofline only, roofline + one launch per
kernel, roofline + one CUDA graph launch per stage invocation (the static-KV TensorRT flavor exists so a decode step
can be captured as one graph).

Launches are added to the roofline time (the host does not overlap them with GPU work): right when kernels are
shorter than their launches, as most batch-1 decode kernels are; an upper bound otherwise. For a TensorRT engine the
count after ORT's fusion is an upper bound too: TensorRT fuses pointwise chains and GEMM epilogues further.
"""

from __future__ import annotations

import collections
import os
import tempfile
import time
import tomllib
from pathlib import Path

import onnx
from onnx import TensorProto

from nora_edge.bench.onnx_cost import VIEW_OPS
from nora_edge.bench.roofline import StageCost, predict_stage_ms
from nora_edge.errors import InputError, ProfileError
from nora_edge.profiles import PROFILE_DIR, DeviceProfile, Quantity

# graph + weights above which the optimizer is not run (the medium fp32 decoder, 273 MB, takes ~5 s on 2 busy
# cores); the real-shape graphs (2.8-14 GB) are counted from the file only
MAX_OPTIMIZE_BYTES = 400e6
LAUNCH_FIELDS = ("kernel_us", "graph_us")
# kernels an analytic "<tag>.elementwise" op stands for in a fused runtime (TensorRT / MLC) [est]: decoder layer:
# rotary + KV-cache write, 2 x (residual add + RMSNorm), SwiGLU; ViT block: 2 x (add + norm), activation, rotary
FUSED_ELEMENTWISE_KERNELS = 4


def count_nodes(graph: onnx.GraphProto) -> collections.Counter:
    """op label ("MatMul", "com.microsoft.MatMulNBits") -> nodes, the subgraphs of If / Loop / Scan included."""
    out: collections.Counter = collections.Counter()
    for node in graph.node:
        out[f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                out.update(count_nodes(sub))
    return out


def _kernels(ops: collections.Counter) -> int:
    """Nodes that launch a kernel: view ops (reshapes, Shape) alias or run on the host."""
    return sum(n for op, n in ops.items() if op.rsplit(".", 1)[-1] not in VIEW_OPS)


def _weight_bytes(model: onnx.ModelProto, path: Path) -> float:
    """Bytes of the graph file plus the external data files it references."""
    files = {
        e.value
        for init in model.graph.initializer
        if init.data_location == TensorProto.EXTERNAL
        for e in init.external_data
        if e.key == "location"
    }
    return float(
        path.stat().st_size
        + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())
    )


def graph_node_counts(
    path: str | Path, providers: list[str] | None = None, max_bytes: float = MAX_OPTIMIZE_BYTES, top: int = 8
) -> dict:
    """Node counts of one ONNX graph as stored and after onnxruntime's optimizer.

    Args:
        path: the .onnx file (external data next to it).
        providers: execution providers to optimize for (those not available here are dropped; default CPU).
        max_bytes: graphs whose file + weights exceed this are not optimized (stated in ``skipped``).
        top: how many op types to list.

    Returns:
        {"file", "bytes", "file_nodes", "file_kernels", "optimized_nodes", "kernels" (optimized nodes that launch
        a kernel; the file's count when skipped), "top_ops": [[op, n], ...] (optimized, else file), "provider",
        "seconds", "skipped": reason or None}.

    Raises:
        InputError: the file is missing.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}")
    t0 = time.perf_counter()
    model = onnx.load(str(path), load_external_data=False)
    file_ops = count_nodes(model.graph)
    size = _weight_bytes(model, path)
    res = {
        "file": path.name,
        "bytes": size,
        "file_nodes": sum(file_ops.values()),
        "file_kernels": _kernels(file_ops),
        "optimized_nodes": None,
        "kernels": _kernels(file_ops),
        "top_ops": [list(x) for x in file_ops.most_common(top)],
        "provider": None,
        "skipped": None,
    }
    if size > max_bytes:
        res["skipped"] = (
            f"{size / 1e6:.0f} MB of graph + weights > {max_bytes / 1e6:.0f} MB: not optimized (onnxruntime would "
            "load and rewrite every weight); kernels = the file's nodes less view ops"
        )
    else:
        avail = set(ort.get_available_providers())
        use = [p for p in (providers or []) if p in avail] or ["CPUExecutionProvider"]
        with tempfile.TemporaryDirectory(prefix="nora-nodes-") as tmp:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3  # the NCHWc "hardware specific" serialization warning
            opts.intra_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "w.bin")
            ort.InferenceSession(str(path), opts, providers=use)
            opt_ops = count_nodes(onnx.load(opts.optimized_model_filepath, load_external_data=False).graph)
        res.update(
            optimized_nodes=sum(opt_ops.values()),
            kernels=_kernels(opt_ops),
            top_ops=[list(x) for x in opt_ops.most_common(top)],
            provider=use[0],
        )
    res["seconds"] = time.perf_counter() - t0
    return res


def bundle_node_counts(bundle, providers: dict[str, list[str]] | None = None, **kw) -> dict[str, dict]:
    """{component: :func:`graph_node_counts`} for every ONNX graph of a loaded bundle (``providers`` per graph)."""
    return {
        name: graph_node_counts(bundle.file(c.file), (providers or {}).get(name), **kw)
        for name, c in bundle.components.items()
        if c.file.endswith(".onnx")
    }


def stage_launches(counts: dict[str, dict]) -> dict[str, int]:
    """Kernel launches of one invocation of each bundle stage: vision runs the vision graph, prefill and a decode
    step the decoder graph once."""
    return {
        "vision": counts["vision"]["kernels"],
        **dict.fromkeys(("prefill", "decode_step"), counts["decoder"]["kernels"]),
    }


def analytic_launches(costs: dict[str, StageCost]) -> dict[str, int]:
    """Kernels per stage of an analytic cost (``roofline.analytic_stage_costs``) run by a fused engine [est]: one
    per op, :data:`FUSED_ELEMENTWISE_KERNELS` per ``*.elementwise`` op."""
    return {
        s: sum(FUSED_ELEMENTWISE_KERNELS if o.name.endswith(".elementwise") else 1 for o in c.ops)
        for s, c in costs.items()
    }


def fit_per_layer(points: list[tuple[int, int]]) -> tuple[float, float]:
    """(fixed, per layer) kernels from (layers, kernels) of graphs of one exporter at different depths (least
    squares; two points: exact). The exporter emits the same nodes per layer at any width, so the fit extends to
    the real-shape layer count."""
    if len({n for n, _ in points}) < 2:
        raise InputError(
            f"fit_per_layer needs graphs of at least two depths, got layers {[n for n, _ in points]}"
        )
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def launch_costs(profile: DeviceProfile) -> dict[str, Quantity] | None:
    """The profile's ``[launch]`` table (``kernel_us``, ``graph_us``), or None where it has none (``host``: ORT's
    per-node CPU overhead is inside its measured stage times)."""
    path = PROFILE_DIR / f"{profile.name}.toml"
    if not path.is_file():
        return None
    table = tomllib.loads(path.read_text(encoding="utf-8")).get("launch")
    if table is None:
        return None
    out = {}
    for key in LAUNCH_FIELDS:
        e = table.get(key) if isinstance(table, dict) else None
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("value"), (int, float))
            and not isinstance(e["value"], bool)
        )
        if not ok or not e["value"] > 0 or not isinstance(e.get("source"), str) or not e["source"].strip():
            raise ProfileError(
                f'{path}: launch.{key} must be {{ value = <positive>, source = "..." }}, got {e!r}'
            )
        out[key] = Quantity(float(e["value"]), e["source"].strip(), bool(e.get("estimate", False)))
    return out


def launch_lines(
    costs: dict[str, StageCost], profile: DeviceProfile, launches: dict[str, int]
) -> dict[str, dict]:
    """{stage: {"roofline_ms", "kernel_ms" (+ one launch per kernel), "cuda_graph_ms" (+ one graph launch),
    "launches"}} on ``profile``; without a ``[launch]`` table all three are the roofline."""
    lc = launch_costs(profile)
    kernel_us, graph_us = (lc["kernel_us"].value, lc["graph_us"].value) if lc else (0.0, 0.0)
    out = {}
    for s, c in costs.items():
        n = launches.get(s, 0)
        out[s] = {
            "roofline_ms": predict_stage_ms(c, profile)["ms"],
            "kernel_ms": predict_stage_ms(c, profile, n, kernel_us)["ms"],
            "cuda_graph_ms": predict_stage_ms(c, profile, 1 if n else 0, graph_us)["ms"],
            "launches": n,
        }
    return out


def launch_costs_json(profiles: list[DeviceProfile]) -> dict[str, dict | None]:
    """{profile: {field: {"value", "source", "estimate"}} or None} for the report."""
    out: dict[str, dict | None] = {}
    for p in profiles:
        lc = launch_costs(p)
        out[p.name] = (
            {k: {"value": q.value, "source": q.source, "estimate": q.estimate} for k, q in lc.items()}
            if lc
            else None
        )
    return out


def real_shape_decode_lines(kernels_exported: int, plan_name: str = "int4") -> dict[str, dict]:
    """NORA-Long-3B's decode step (36 layers + head) on every Orin profile: roofline, + the exported graph's
    kernels (``kernels_exported``, e.g. from :func:`fit_per_layer`), + a fused engine's kernels [est], + one CUDA
    graph launch. Returns {profile: {line: ms}}."""
    from nora_edge.bench.models import nora_3b
    from nora_edge.bench.roofline import PrecisionPlan, analytic_stage_costs
    from nora_edge.profiles import list_profiles, load_profile

    costs = analytic_stage_costs(nora_3b(5), PrecisionPlan.preset(plan_name))
    step = StageCost("decode_step", costs["decode_token"].ops + costs["action_head"].ops)
    fused = analytic_launches({"decode_step": step})["decode_step"]
    out = {}
    for name in (n for n in list_profiles() if n != "host"):
        prof = load_profile(name)
        lc = launch_costs(prof)
        k, g = lc["kernel_us"].value, lc["graph_us"].value
        out[name] = {
            "roofline": predict_stage_ms(step, prof)["ms"],
            f"exported graph, {kernels_exported} kernels": predict_stage_ms(step, prof, kernels_exported, k)[
                "ms"
            ],
            f"fused engine [est], {fused} kernels": predict_stage_ms(step, prof, fused, k)["ms"],
            "one CUDA graph launch": predict_stage_ms(step, prof, 1, g)["ms"],
        }
    return out


if (
    __name__ == "__main__"
):  # pragma: no cover - python -m nora_edge.bench.launches SHALLOW.onnx L1 DEEP.onnx L2
    import sys

    if len(sys.argv) != 5:
        sys.exit(
            "usage: python -m nora_edge.bench.launches SHALLOW.onnx LAYERS DEEP.onnx LAYERS (same exporter)"
        )
    pts = [(int(sys.argv[i + 1]), graph_node_counts(sys.argv[i])["kernels"]) for i in (1, 3)]
    fixed, per = fit_per_layer(pts)
    n = round(fixed + 36 * per)
    print(f"decoder kernels: {pts} -> {fixed:.1f} + {per:.1f} per layer -> {n} at 36 layers")
    for name, lines in real_shape_decode_lines(n).items():
        print(name + ": " + "; ".join(f"{k} {v:.2f} ms" for k, v in lines.items()))
