"""FP16 conversion with FP32 islands chosen from calibrated activations.

Data flow: fp32 ``.onnx`` + calibration feeds -> :func:`collect_activation_ranges` (every node output exposed
as a graph output, run in onnxruntime, max |x| per float tensor; mask sentinels such as -3.4e38 or -inf
counted apart) -> :func:`select_fp32_nodes` (a node stays fp32 when a tensor it produces or consumes exceeds
``overflow_fraction * 65504``, or a weight it reads does; the Constant nodes feeding only kept nodes stay with
them) -> :func:`convert_fp16` (onnxruntime.transformers.float16 with the kept nodes blocked; casts inserted at
island borders) -> fp16 ModelProto.

Why: Qwen2.5-VL-3B's vision encoder overflows FP16 in block 31's MLP down projection (NVIDIA keeps that layer
and the merger in FP32). The island is found from data here, never hard-coded.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, numpy_helper

from nora_edge.errors import ExportError, InputError

from .graph import topological_sort
from .progress import progress_iter

FP16_MAX = 65504.0
SENTINEL = 1e30  # |x| at or above this (or inf) is a mask fill value, not an activation


@dataclass(frozen=True)
class TensorRange:
    """Calibrated magnitude of one tensor: max |x| over finite non-sentinel values, whether sentinels occur."""

    max_abs: float
    has_sentinel: bool
    has_nan: bool


@dataclass(frozen=True)
class KeptNode:
    """A node left in fp32, the tensor that forced it and that tensor's calibrated max |x|."""

    name: str
    op_type: str
    reason: str
    tensor: str
    max_abs: float

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "reason": self.reason,
            "tensor": self.tensor,
            "max_abs": self.max_abs,
        }


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed top-level node a unique name ``<op>_<index>``; returns how many were named."""
    taken = {n.name for n in model.graph.node if n.name}
    count = 0
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
            count += 1
    return count


def tensor_range(a: np.ndarray) -> TensorRange:
    """Range statistics of one array (float dtypes only)."""
    a = np.asarray(a, dtype=np.float64)
    nan = bool(np.isnan(a).any())
    mag = np.abs(a[~np.isnan(a)]) if nan else np.abs(a)
    sentinel = mag >= SENTINEL  # includes inf
    real = mag[~sentinel]
    return TensorRange(float(real.max()) if real.size else 0.0, bool(sentinel.any()), nan)


def _merge(a: TensorRange | None, b: TensorRange) -> TensorRange:
    if a is None:
        return b
    return TensorRange(max(a.max_abs, b.max_abs), a.has_sentinel or b.has_sentinel, a.has_nan or b.has_nan)


def collect_activation_ranges(
    model_path: str | os.PathLike[str], feeds: Iterable[Mapping[str, np.ndarray]], *, total: int | None = None
) -> dict[str, TensorRange]:
    """Run the fp32 graph on ``feeds`` with every node output exposed; return per-tensor ranges.

    The augmented graph is written as a hidden temp file beside ``model_path`` (so relative external data
    resolves) and deleted afterwards. Graph optimisations are off so each tensor is the exported node's.

    Args:
        model_path: fp32 model.
        feeds: calibration inputs, name -> array, as the graph takes them.
        total: number of feeds, for the progress bar.

    Returns:
        tensor name -> :class:`TensorRange` for every float tensor seen (graph inputs and node outputs).

    Raises:
        ExportError: no feeds, or the graph fails to run on a feed.
    """
    model_path = Path(model_path)
    light = onnx.load(str(model_path), load_external_data=False)
    exposed = {o.name for o in light.graph.output}
    for node in light.graph.node:
        for out in node.output:
            if out and out not in exposed:
                light.graph.output.append(onnx.ValueInfoProto(name=out))  # type left to onnxruntime
                exposed.add(out)
    tmp = model_path.parent / f".{model_path.stem}.ranges-{secrets.token_hex(4)}.onnx"
    ranges: dict[str, TensorRange] = {}
    seen = 0
    try:
        onnx.save_model(light, str(tmp))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        for feed in progress_iter(feeds, "fp16: calibrating activation ranges", total):
            for k, v in feed.items():
                if np.issubdtype(np.asarray(v).dtype, np.floating):
                    ranges[k] = _merge(ranges.get(k), tensor_range(v))
            try:
                outs = session.run(names, dict(feed))
            except Exception as e:  # onnxruntime raises its own exception types
                raise ExportError(f"{model_path}: calibration run failed on feed {seen} ({e})") from e
            for name, arr in zip(names, outs, strict=True):
                if isinstance(arr, np.ndarray) and np.issubdtype(arr.dtype, np.floating):
                    ranges[name] = _merge(ranges.get(name), tensor_range(arr))
            seen += 1
    finally:
        tmp.unlink(missing_ok=True)
    if seen == 0:
        raise ExportError(f"{model_path}: the fp16 recipe needs calibration feeds, got none")
    return ranges


def initializer_ranges(model: onnx.ModelProto) -> dict[str, TensorRange]:
    """Ranges of float initializers and Constant-node float values (weights loaded)."""
    out: dict[str, TensorRange] = {}
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            out[t.name] = tensor_range(numpy_helper.to_array(t))
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
                    out[n.output[0]] = tensor_range(numpy_helper.to_array(a.t))
    return out


def select_fp32_nodes(
    model: onnx.ModelProto, ranges: Mapping[str, TensorRange], overflow_fraction: float
) -> list[KeptNode]:
    """Nodes that must stay fp32: a tensor they produce or consume (or a weight) exceeds the threshold.

    Args:
        model: the fp32 model with named nodes (see :func:`name_nodes`) and weights loaded.
        ranges: calibrated activation ranges (:func:`collect_activation_ranges`).
        overflow_fraction: threshold as a fraction of the fp16 maximum 65504.

    Returns:
        kept nodes in graph order, each with the tensor that forced it.
    """
    threshold = overflow_fraction * FP16_MAX
    all_ranges = {**initializer_ranges(model), **ranges}
    kept: list[KeptNode] = []
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        hit = _first_over(node.output, all_ranges, threshold, "output") or _first_over(
            node.input, all_ranges, threshold, "input"
        )
        if hit:
            kind, tensor, value = hit
            kept.append(KeptNode(node.name, node.op_type, f"{kind} exceeds {threshold:g}", tensor, value))
    kept_names = {k.name for k in kept}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node.name)
    for node in model.graph.node:  # Constants feeding only kept nodes stay with them
        if node.op_type == "Constant":
            users = consumers.get(node.output[0], [])
            if users and all(u in kept_names for u in users):
                r = all_ranges.get(node.output[0])
                kept.append(
                    KeptNode(
                        node.name,
                        "Constant",
                        "feeds only fp32 nodes",
                        node.output[0],
                        r.max_abs if r else 0.0,
                    )
                )
    return kept


def _first_over(tensors, ranges, threshold: float, kind: str):
    for t in tensors:
        r = ranges.get(t)
        if r is not None and r.max_abs > threshold:
            return kind, t, r.max_abs
    return None


def load_typed(model_path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load a model with inferred value types (inference runs on the weightless proto; works > 2 GB)."""
    model_path = Path(model_path)
    light = onnx.load(str(model_path), load_external_data=False)
    try:
        typed = onnx.shape_inference.infer_shapes(light)
    except Exception as e:  # onnx raises InferenceError and others
        raise ExportError(f"{model_path}: shape inference failed ({e})") from e
    external_data_helper.load_external_data_for_model(typed, str(model_path.parent))
    return typed


def convert_fp16(
    model: onnx.ModelProto, kept: Iterable[str], *, keep_io_types: bool = True
) -> onnx.ModelProto:
    """Convert to fp16, leaving the named nodes fp32 (casts at the borders).

    Args:
        model: typed fp32 model (:func:`load_typed`), named nodes.
        kept: node names to leave in fp32.
        keep_io_types: graph inputs/outputs stay float32.

    Raises:
        InputError: a kept node name is not in the graph.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    names = {n.name for n in model.graph.node}
    kept = list(dict.fromkeys(kept))
    missing = [k for k in kept if k not in names]
    if missing:
        raise InputError(f"fp16: node(s) to keep fp32 not in the graph: {missing[:5]}")
    out = convert_float_to_float16(
        model,
        max_finite_val=FP16_MAX,
        keep_io_types=keep_io_types,
        disable_shape_infer=True,
        node_block_list=kept,
    )
    fp32_tensors = {o for n in out.graph.node if n.name in set(kept) for o in n.output}
    drop_cast_roundtrips(out, fp32_tensors)
    topological_sort(out)  # the converter appends its boundary casts at the end
    return out


def drop_cast_roundtrips(model: onnx.ModelProto, fp32_tensors: set[str]) -> int:
    """Remove ``Cast(to fp16) -> Cast(to fp32)`` round trips on fp32 tensors between kept nodes.

    The converter casts every blocked node's outputs to fp16, so two adjacent fp32 nodes still pass their
    tensor through fp16 (an overflowing activation becomes inf there). Each fp32 re-cast of such a tensor
    becomes ``Identity(original fp32 tensor)`` (exact); fp16 casts left without consumers are removed.

    Returns:
        number of round trips removed.
    """
    graph = model.graph
    to = {
        n.name: onnx.helper.get_attribute_value(a)
        for n in graph.node
        if n.op_type == "Cast"
        for a in n.attribute
        if a.name == "to"
    }
    producer = {o: n for n in graph.node for o in n.output}
    count = 0
    for i, n in enumerate(graph.node):
        if n.op_type != "Cast" or to.get(n.name) != onnx.TensorProto.FLOAT:
            continue
        src = producer.get(n.input[0])
        if src is None or src.op_type != "Cast" or to.get(src.name) != onnx.TensorProto.FLOAT16:
            continue
        if src.input[0] not in fp32_tensors:
            continue
        graph.node[i].CopyFrom(onnx.helper.make_node("Identity", [src.input[0]], list(n.output), name=n.name))
        count += 1
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if not (n.op_type == "Cast" and not any(o in used for o in n.output))]
    graph.ClearField("node")
    graph.node.extend(keep)
    return count
