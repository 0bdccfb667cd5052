"""Apply a recipe to one exported ONNX graph: the call the export pipeline makes between export and bundle.

Data flow: ``onnx_path_in`` (fp32, + external data) -> name nodes, rewrite Gemm to MatMul when an integer
recipe asks, find the decoder's head nodes -> either

- streaming (fp32, int8 dynamic, int4/int8 RTN: every built-in CPU recipe): the graph without weights and a
  per-node plan (head nodes -> head recipe, the rest -> body recipe) -> :func:`stream_quantize`, one weight
  in memory at a time, or
- in memory (fp16, int8-qdq, hqq, int4-qdq): the whole model -> onnxruntime's quantizers, in passes in a temp dir
  beside the output (head nodes first with the head recipe, then the rest),

-> ``onnx_path_out`` (atomic; external data when > 2 GB) -> onnxruntime loads it -> parity against the fp32
graph on up to ``parity_samples`` calibration feeds (one session at a time) -> :class:`QuantResult` (sizes,
nodes quantized / kept fp32, time, parity).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from nora_edge.errors import ExportError, InputError

from . import fp16 as fp16_mod
from .graph import (
    INLINE_LIMIT,
    find_head_nodes,
    load_gemm_weights,
    load_model,
    model_size,
    rewrite_gemm_to_matmul,
    save_model_atomic,
)
from .int4_qdq import quantize_int4_qdq
from .int8 import quantize_int8_dynamic, quantize_int8_qdq
from .recipes import (
    GRAPH_RECIPE_TYPES,
    HEAD,
    BundleRecipe,
    Fp16Recipe,
    Fp32Recipe,
    GraphRecipe,
    Int4QdqRecipe,
    Int8DynamicRecipe,
    Int8QdqRecipe,
    WeightOnlyRecipe,
)
from .registry import get_recipe
from .stream import WeightSource, stream_quantize, streamable
from .weight_only import quantize_weight_only

Feed = Mapping[str, np.ndarray]
QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv")
GRAPH_COMPONENT_NAMES = ("vision", "decoder", HEAD)


@dataclass(frozen=True)
class QuantResult:
    """What :func:`apply_recipe` did to one graph.

    Attributes:
        component: "vision", "decoder" or "action_head".
        recipe: the component recipe(s) as dicts (``body``, and ``head`` when it differs).
        precision: short label for the manifest (e.g. "int4-rtn-b128+head-int8").
        output_path / data_files: the written graph and its external data files (names beside it).
        bytes_before / bytes_after: on-disk size of the graph with its external data.
        nodes_quantized: names (in the fp32 graph) of the MatMul/Gemm/Conv nodes now quantized.
        nodes_kept_fp32: fp16 islands: node, the tensor that forced it, its calibrated max |x|.
        gemm_rewritten / gemm_skipped: Gemm nodes rewritten to MatMul, and those left (with the reason).
        head_nodes: the decoder's head nodes when a head recipe was applied separately.
        seconds: wall time of the whole call.
        parity: per graph output: max_abs_err, ref_max_abs, cosine over the checked feeds (empty without
            calibration).
    """

    component: str
    recipe: dict
    precision: str
    output_path: str
    data_files: tuple[str, ...]
    bytes_before: int
    bytes_after: int
    nodes_quantized: tuple[str, ...]
    nodes_kept_fp32: tuple[fp16_mod.KeptNode, ...]
    gemm_rewritten: tuple[str, ...]
    gemm_skipped: tuple[tuple[str, str], ...]
    head_nodes: tuple[str, ...]
    seconds: float
    parity: dict = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        return self.bytes_after / self.bytes_before

    def to_json(self) -> dict:
        return {
            "component": self.component,
            "recipe": self.recipe,
            "precision": self.precision,
            "output_path": self.output_path,
            "data_files": list(self.data_files),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "size_ratio": self.size_ratio,
            "nodes_quantized": list(self.nodes_quantized),
            "nodes_kept_fp32": [k.to_json() for k in self.nodes_kept_fp32],
            "gemm_rewritten": list(self.gemm_rewritten),
            "gemm_skipped": [list(s) for s in self.gemm_skipped],
            "head_nodes": list(self.head_nodes),
            "seconds": self.seconds,
            "parity": self.parity,
        }


def resolve_recipes(component: str, recipe) -> tuple[GraphRecipe, GraphRecipe, str]:
    """(body recipe, head recipe, precision label) for a graph component.

    ``recipe`` may be a registry name, a :class:`BundleRecipe` or a single graph recipe (then used for the
    whole graph, head included).
    """
    if component not in GRAPH_COMPONENT_NAMES:
        raise InputError(f"apply_recipe: component {component!r} is not one of {list(GRAPH_COMPONENT_NAMES)}")
    if isinstance(recipe, GRAPH_RECIPE_TYPES):
        label = recipe.label if isinstance(recipe, WeightOnlyRecipe | Int4QdqRecipe) else recipe.kind
        return recipe, recipe, label
    if not isinstance(recipe, str | BundleRecipe):
        raise InputError(f"apply_recipe: recipe {recipe!r} is not a name, BundleRecipe or graph recipe")
    bundle_recipe = get_recipe(recipe)
    body = bundle_recipe.for_component(component)
    head = bundle_recipe.action_head if component == "decoder" else body
    return body, head, bundle_recipe.precision(component)


def _needs_calibration(r: GraphRecipe) -> bool:
    return isinstance(r, Fp16Recipe | Int8QdqRecipe)


def apply_recipe(
    component_name: str,
    onnx_path_in: str | os.PathLike[str],
    onnx_path_out: str | os.PathLike[str],
    recipe,
    calibration: Sequence[Feed] | None = None,
    *,
    head_nodes: Sequence[str] | None = None,
    logits_output: str = "logits",
    parity_samples: int = 4,
) -> QuantResult:
    """Quantize one exported graph with a recipe and check that onnxruntime runs the result.

    Args:
        component_name: "vision", "decoder" (its head nodes get the bundle recipe's ``action_head``) or
            "action_head" (a separate head graph).
        onnx_path_in: the fp32 graph (external data beside it is followed).
        onnx_path_out: where to write; may equal nothing else than a new path (never ``onnx_path_in``).
        recipe: registry name, :class:`BundleRecipe` or a single graph recipe.
        calibration: feeds (input name -> array) for this graph; required by fp16 and int8-qdq, used by
            every recipe for the parity check when given.
        head_nodes: decoder head node names (default: found from ``logits_output``).
        logits_output: the decoder output the head produces.
        parity_samples: feeds used for the parity check.

    Raises:
        InputError: bad component, recipe or paths.
        ExportError: a recipe needing calibration got none, a quantizer failed, onnxruntime cannot load the
            result, or it produces inf/NaN where the fp32 graph does not.
    """
    t0 = time.perf_counter()
    src, dst = Path(onnx_path_in), Path(onnx_path_out)
    if src.resolve() == dst.resolve():
        raise InputError(f"apply_recipe: output path {dst} equals the input path")
    body, head, precision = resolve_recipes(component_name, recipe)
    feeds = list(calibration) if calibration is not None else []
    for r in (body, head):
        if _needs_calibration(r) and not feeds:
            raise ExportError(f"{component_name}: recipe '{r.kind}' needs calibration feeds for {src.name}")
    bytes_before = model_size(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if streamable(body) and streamable(head):  # one weight in memory at a time (the 3B decoder needs it)
        model = load_model(src, load_weights=False)
        gemm, split, heads = _prepare(model, body, head, head_nodes, logits_output, base=src.parent)
        head_set = set(heads)
        plan = {n.name: head if n.name in head_set else body for n in model.graph.node}
        quantized, data_files = stream_quantize(model, WeightSource(src), dst, plan)
        del model
        kept: list[fp16_mod.KeptNode] = []
    else:
        quantized, data_files, kept, gemm, split, heads = _apply_in_memory(
            src, dst, body, head, feeds, head_nodes, logits_output
        )
    _check_loads(dst)
    parity = check_parity(src, dst, feeds[:parity_samples]) if feeds else {}
    describe = {"body": body.describe()} | ({"head": head.describe()} if split else {})
    return QuantResult(
        component=component_name,
        recipe=describe,
        precision=precision,
        output_path=str(dst),
        data_files=tuple(data_files),
        bytes_before=bytes_before,
        bytes_after=model_size(dst),
        nodes_quantized=tuple(quantized),
        nodes_kept_fp32=tuple(kept),
        gemm_rewritten=gemm.rewritten if gemm else (),
        gemm_skipped=gemm.skipped if gemm else (),
        head_nodes=tuple(heads if split else ()),
        seconds=time.perf_counter() - t0,
        parity=parity,
    )


def _prepare(model, body, head, head_nodes, logits_output, *, base: Path | None = None):
    """Name nodes, rewrite Gemm when a recipe asks, find the head nodes: (gemm rewrite, split, heads).

    ``base``: the model folder when weights are not loaded; then only the Gemm weights that the rewrite
    transposes are read in.
    """
    fp16_mod.name_nodes(model)
    wants_rewrite = any(getattr(r, "rewrite_gemm", False) for r in (body, head))
    if wants_rewrite and base is not None:
        load_gemm_weights(model, base)
    gemm = rewrite_gemm_to_matmul(model) if wants_rewrite else None
    split = head != body
    heads = (
        list(head_nodes)
        if head_nodes is not None
        else (find_head_nodes(model, logits_output) if split else [])
    )
    return gemm, split, heads


def _apply_in_memory(src: Path, dst: Path, body, head, feeds, head_nodes, logits_output):
    """The recipes that need the whole model in memory (fp16, int8-qdq, hqq): onnxruntime's quantizers."""
    with tempfile.TemporaryDirectory(prefix=f".{dst.stem}-quant-", dir=dst.parent) as work:
        work = Path(work)
        model = load_model(src)
        gemm, split, heads = _prepare(model, body, head, head_nodes, logits_output)
        targets_before = {n.name: n.op_type for n in model.graph.node if n.op_type in QUANTIZABLE_OPS}
        stage = work / "stage0.onnx"
        save_model_atomic(model, stage)
        del model
        kept: list[fp16_mod.KeptNode] = []
        passes = [(head, heads, None), (body, None, heads)] if split else [(body, None, ())]
        for i, (r, include, exclude) in enumerate(passes):
            nxt = work / f"stage{i + 1}.onnx"
            done = _run_pass(
                r, stage, nxt, feeds, include=include, exclude=exclude, float_head=heads if split else ()
            )
            kept.extend(done)
            stage = nxt if nxt.exists() else stage
        final = load_model(stage)
        quantized = _quantized_nodes(targets_before, final)
        data_files = save_model_atomic(final, dst)
        del final
    return quantized, data_files, kept, gemm, split, heads


def _run_pass(r: GraphRecipe, src: Path, dst: Path, feeds, *, include, exclude, float_head) -> list:
    """One recipe over ``src`` -> ``dst`` (not written for fp32, or when ``include`` is empty)."""
    if isinstance(r, Fp32Recipe) or (include is not None and not include):
        return []
    if isinstance(r, Fp16Recipe):
        ranges = fp16_mod.collect_activation_ranges(src, feeds, total=len(feeds))
        model = fp16_mod.load_typed(src)
        kept = fp16_mod.select_fp32_nodes(model, ranges, r.overflow_fraction)
        extra = [*r.keep_fp32_nodes, *float_head]
        kept_names = [k.name for k in kept] + extra
        model = fp16_mod.convert_fp16(model, kept_names, keep_io_types=r.keep_io_types)
        save_model_atomic(model, dst)
        by_name = {k.name for k in kept}
        kept += [fp16_mod.KeptNode(n, "", "requested", "", 0.0) for n in extra if n not in by_name]
        return kept
    external = model_size(src) > INLINE_LIMIT
    if isinstance(r, Int8DynamicRecipe):
        quantize_int8_dynamic(
            src, dst, r, nodes_to_quantize=include, nodes_to_exclude=exclude or (), external=external
        )
    elif isinstance(r, Int8QdqRecipe):
        names = [i.name for i in load_model(src, load_weights=False).graph.input]
        quantize_int8_qdq(
            src,
            dst,
            r,
            feeds,
            input_names=names,
            nodes_to_quantize=include,
            nodes_to_exclude=exclude or (),
            external=external,
        )
    else:
        model = load_model(src)
        skip = set(exclude or ())
        if include is not None:
            skip |= {n.name for n in model.graph.node if n.name not in set(include)}
        if isinstance(r, Int4QdqRecipe):
            model = quantize_int4_qdq(model, r, nodes_to_exclude=sorted(skip), source=str(src.name))
        else:
            model = quantize_weight_only(model, r, nodes_to_exclude=sorted(skip), source=str(src.name))
        save_model_atomic(model, dst)
    return []


def _quantized_nodes(before: dict[str, str], after: onnx.ModelProto) -> list[str]:
    """Target nodes of the fp32 graph that vanished (replaced) or now read a DequantizeLinear output."""
    dq_outputs = {o for n in after.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    after_nodes = {n.name: n for n in after.graph.node}
    out = []
    for name, op in before.items():
        node = after_nodes.get(name)
        if node is None or (node.op_type == op and any(i in dq_outputs for i in node.input[1:2])):
            out.append(name)
    return out


def _check_loads(path: Path) -> None:
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types
        raise ExportError(f"{path}: onnxruntime cannot load the quantized graph ({e})") from e


def _run_all(path: Path, feeds: Sequence[Feed], names: Sequence[str] | None = None):
    """(output names, outputs per feed) of one CPU session, closed before returning."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    names = list(names) if names is not None else [o.name for o in sess.get_outputs()]
    outs = [sess.run(names, {n: f[n] for n in in_names}) for f in feeds]
    del sess
    return names, outs


def check_parity(ref_path: Path, test_path: Path, feeds: Sequence[Feed]) -> dict:
    """Compare every graph output of ``test_path`` with ``ref_path`` on ``feeds``.

    Returns:
        output name -> {max_abs_err, ref_max_abs, cosine} over all feeds.

    Raises:
        ExportError: the test graph gives inf/NaN where the reference is finite.
    """
    names, want = _run_all(ref_path, feeds)  # one session alive at a time: a 3B graph is ~12 GB
    _, got = _run_all(test_path, feeds, names)
    acc: dict[str, dict] = {
        n: {"max_abs_err": 0.0, "ref_max_abs": 0.0, "dot": 0.0, "rr": 0.0, "tt": 0.0} for n in names
    }
    for k, (ref_outs, test_outs) in enumerate(zip(want, got, strict=True)):
        for name, a, b in zip(names, ref_outs, test_outs, strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if np.isfinite(a).all() and not np.isfinite(b).all():
                raise ExportError(
                    f"{test_path}: output '{name}' has inf/NaN on calibration feed {k} "
                    "where the fp32 graph is finite"
                )
            s = acc[name]
            s["max_abs_err"] = max(s["max_abs_err"], float(np.abs(a - b).max(initial=0.0)))
            s["ref_max_abs"] = max(s["ref_max_abs"], float(np.abs(a).max(initial=0.0)))
            s["dot"] += float((a * b).sum())
            s["rr"] += float((a * a).sum())
            s["tt"] += float((b * b).sum())
    out = {}
    for name, s in acc.items():
        denom = np.sqrt(s["rr"] * s["tt"])
        out[name] = {
            "max_abs_err": s["max_abs_err"],
            "ref_max_abs": s["ref_max_abs"],
            "cosine": float(s["dot"] / denom) if denom > 0 else 1.0,
        }
    return out
