"""Streaming weight quantization: one weight in memory at a time, so a 3B decoder quantizes in a few GB.

Data flow: graph proto read without weights (``load_external_data=False``) + a plan (node name -> recipe)
-> for each planned MatMul with a constant 2-D float32 B, in graph order: B read from its external-data
file (:class:`WeightSource`) -> quantized:

- :class:`Int8DynamicRecipe`: symmetric int8 per output channel (scale = max|w| / 127) and the graph
  onnxruntime's ``quantize_dynamic`` writes: DynamicQuantizeLinear (one per activation) -> MatMulInteger ->
  Cast -> Mul by (activation scale x weight scale); onnxruntime fuses it to MatMulIntegerToFloat.
- :class:`WeightOnlyRecipe` (rtn): onnxruntime's C++ block quantizer -> ``com.microsoft.MatMulNBits``.

-> the quantized arrays and every other initializer (copied in chunks) appended to ``<dst>.data``
(:class:`DataWriter`, page-aligned) -> the graph proto, pointing into that file, written last. A result
under 2 GB is re-saved inline, like :func:`save_model_atomic` decides.

Peak memory is the graph proto plus the largest weight and its quantized form (~2.5 GB for the real-shape
decoder's embedding-sized tensors) instead of the whole model twice (onnxruntime's quantizers load it all).
The weights equal onnxruntime's quantizers' bit for bit (tested).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from nora_edge.atomic import atomic_path, write_bytes_atomic
from nora_edge.errors import ExportError

from .graph import INLINE_LIMIT, check_nbits_accuracy, fresh_name, save_model_atomic
from .progress import progress_iter
from .recipes import Fp32Recipe, Int8DynamicRecipe, WeightOnlyRecipe

INLINE_MAX = 1024  # bytes: smaller tensors stay inside the proto (onnx's own default threshold)
PAGE = 4096  # data offsets aligned to pages so onnxruntime can map weights instead of copying them
CHUNK = 64 << 20  # bytes per read when a tensor is copied through unchanged


def streamable(recipe) -> bool:
    """True when :func:`stream_quantize` implements ``recipe`` (fp32, int8 dynamic on MatMul, n-bit RTN)."""
    if isinstance(recipe, Fp32Recipe):
        return True
    if isinstance(recipe, Int8DynamicRecipe):
        return set(recipe.op_types) <= {"MatMul"}
    return isinstance(recipe, WeightOnlyRecipe) and recipe.algorithm == "rtn"


# --- reading weights one at a time -----------------------------------------------------------------------
class WeightSource:
    """Reads the initializers of a model loaded without weights, one tensor per call.

    Args:
        model_path: the ``.onnx`` file; external-data locations resolve against its folder.
    """

    def __init__(self, model_path: str | os.PathLike[str]):
        self.path = Path(model_path)
        self.base = self.path.parent.resolve()

    def _where(self, t: TensorProto) -> tuple[Path, int, int]:
        info = external_data_helper.ExternalDataInfo(t)
        file = (self.base / info.location).resolve()
        if self.base not in file.parents:
            raise ExportError(
                f"{self.path.name}: tensor '{t.name}' points outside the model folder ({info.location})"
            )
        want = _nbytes(t)
        length = info.length if info.length is not None and info.length >= 0 else want
        if length != want:
            raise ExportError(
                f"{self.path.name}: tensor '{t.name}' stores {length} bytes, its shape needs {want}"
            )
        if not file.is_file() or file.stat().st_size < (info.offset or 0) + length:
            raise ExportError(
                f"{self.path.name}: external data of '{t.name}' is missing or truncated in {file.name}"
            )
        return file, info.offset or 0, length

    def array(self, t: TensorProto) -> np.ndarray:
        """The tensor as a new numpy array (shape ``t.dims``)."""
        if not external_data_helper.uses_external_data(t):
            return numpy_helper.to_array(t)
        file, offset, length = self._where(t)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        with open(file, "rb") as f:
            f.seek(offset)
            arr = np.fromfile(f, dtype=dtype, count=length // dtype.itemsize)
        return arr.reshape(tuple(t.dims))

    def chunks(self, t: TensorProto) -> Iterator[bytes]:
        """The tensor's stored bytes, ``CHUNK`` at a time (external tensors only)."""
        file, offset, length = self._where(t)
        with open(file, "rb") as f:
            f.seek(offset)
            while length > 0:
                block = f.read(min(CHUNK, length))
                length -= len(block)
                yield block


def _nbytes(t: TensorProto) -> int:
    return math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


# --- writing weights one at a time -----------------------------------------------------------------------
class DataWriter:
    """Appends tensors to one external-data file and returns protos that point into it.

    Args:
        f: the open (binary, write) data file.
        location: the file name the protos record (relative to the model's folder).
    """

    def __init__(self, f, location: str):
        self.f, self.location = f, location

    def _start(self, t: TensorProto, nbytes: int) -> int:
        pad = -self.f.tell() % PAGE
        self.f.write(b"\0" * pad)
        offset = self.f.tell()
        del t.external_data[:]
        for key, value in (("location", self.location), ("offset", offset), ("length", nbytes)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        t.data_location = TensorProto.EXTERNAL
        return offset

    def add(self, name: str, arr: np.ndarray) -> TensorProto:
        """Store a new array (inline when it is at most ``INLINE_MAX`` bytes)."""
        arr = np.ascontiguousarray(arr)
        if arr.nbytes <= INLINE_MAX:
            return numpy_helper.from_array(arr, name)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        self._start(t, arr.nbytes)
        self.f.write(memoryview(arr.reshape(-1)).cast("B"))
        return t

    def copy(self, t: TensorProto, source: WeightSource) -> TensorProto:
        """Carry an existing initializer over unchanged (external bytes streamed in chunks)."""
        if not external_data_helper.uses_external_data(t):
            out = TensorProto()
            out.CopyFrom(t)  # small inline tensor: a copy, independent of the proto being rebuilt
            return out
        out = TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
        self._start(out, _nbytes(t))
        for block in source.chunks(t):
            self.f.write(block)
        return out


# --- the two weight formats --------------------------------------------------------------------------------
@dataclass
class Rewrite:
    """Replacement of one MatMul: nodes in place of it, new initializers (name -> array)."""

    nodes: list[onnx.NodeProto]
    arrays: dict[str, np.ndarray]


def int8_weight(w: np.ndarray, recipe: Int8DynamicRecipe) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights: (quantized (K, N) int8, scale (N,) or () float32), onnxruntime's convention."""
    qmax = 64 if recipe.reduce_range else 127  # symmetric range [-qmax, qmax]
    absmax = np.abs(w).max(axis=0) if recipe.per_channel else np.abs(w).max()  # (N,) or ()
    scale = (absmax.astype(np.float64) * 2 / (2 * qmax)).astype(np.float32)
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale)  # all-zero column: scale 1
    q = np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)  # (K, N)
    return q, scale


def nbits_weight(w: np.ndarray, recipe: WeightOnlyRecipe) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blockwise RTN through onnxruntime's C++ quantizer: (packed (N, blocks, blob), scales (N, blocks), zp)."""
    from onnxruntime.capi import _pybind_state as C

    k, n = w.shape
    bs, pack = recipe.block_size, 8 // recipe.bits
    blocks = -(-k // bs)
    w = np.pad(w, ((0, blocks * bs - k), (0, 0))) if blocks * bs != k else np.ascontiguousarray(w)  # (K', N)
    packed = np.zeros((n, blocks, -(-bs // pack)), np.uint8)
    zp = np.zeros((n, -(-blocks // pack)), np.uint8)
    scales = np.zeros((n, blocks), w.dtype)
    quantize = C.quantize_matmul_4bits if recipe.bits == 4 else C.quantize_matmul_8bits
    quantize(packed, w, scales, zp, bs, n, k, recipe.symmetric)
    return packed, scales, zp


def _int8_rewrite(node, w_name: str, w: np.ndarray, act: tuple[str, str, str], recipe, taken) -> Rewrite:
    q, scale = int8_weight(w, recipe)
    names = {k: fresh_name(f"{w_name}_{k}", taken) for k in ("quantized", "scale", "zero_point")}
    a_q, a_scale, a_zp = act
    mul, mm, cast = (fresh_name(f"{node.name}_{s}", taken) for s in ("scales_mul", "int", "float"))
    return Rewrite(
        nodes=[
            helper.make_node("Mul", [a_scale, names["scale"]], [mul], name=f"{node.name}_scales_mul"),
            helper.make_node(
                "MatMulInteger",
                [a_q, names["quantized"], a_zp, names["zero_point"]],
                [mm],
                name=f"{node.name}_quant",
            ),
            helper.make_node("Cast", [mm], [cast], name=f"{node.name}_cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [cast, mul], [node.output[0]], name=f"{node.name}_rescale"),
        ],
        arrays={
            names["quantized"]: q,
            names["scale"]: scale,
            names["zero_point"]: np.zeros(scale.shape, np.int8),
        },
    )


def _nbits_rewrite(node, w_name: str, w: np.ndarray, recipe: WeightOnlyRecipe, taken) -> Rewrite:
    packed, scales, zp = nbits_weight(w, recipe)
    q_name = fresh_name(f"{w_name}_Q{recipe.bits}", taken)
    s_name = fresh_name(f"{w_name}_scales", taken)
    arrays = {q_name: packed, s_name: scales}
    inputs = [node.input[0], q_name, s_name]
    if not recipe.symmetric:
        inputs.append(fresh_name(f"{w_name}_zero_points", taken))
        arrays[inputs[-1]] = zp
    attrs = {"K": w.shape[0], "N": w.shape[1], "bits": recipe.bits, "block_size": recipe.block_size}
    if recipe.accuracy_level is not None:
        attrs["accuracy_level"] = recipe.accuracy_level
    mm = helper.make_node(
        "MatMulNBits",
        inputs,
        [node.output[0]],
        name=f"{node.name}_Q{recipe.bits}",
        domain="com.microsoft",
        **attrs,
    )
    return Rewrite(nodes=[mm], arrays=arrays)


# --- the pass ----------------------------------------------------------------------------------------------
def _targets(model: onnx.ModelProto, plan: Mapping[str, object]) -> dict[str, onnx.NodeProto]:
    """Planned nodes that are MatMul with a constant 2-D float32 B (others are left as they are)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        r = plan.get(n.name)
        if r is None or isinstance(r, Fp32Recipe) or n.op_type != "MatMul" or n.domain not in ("", "ai.onnx"):
            continue
        b = inits.get(n.input[1])
        if b is not None and len(b.dims) == 2 and b.data_type == TensorProto.FLOAT:
            out[n.name] = n
    return out


def stream_quantize(
    model: onnx.ModelProto,
    source: WeightSource,
    dst: str | os.PathLike[str],
    plan: Mapping[str, object],
    *,
    external: bool | None = None,
) -> tuple[list[str], list[str]]:
    """Quantize the planned MatMul nodes of ``model`` (loaded without weights) into ``dst``.

    Args:
        model: the graph proto, weights left external (consumed: its nodes and initializers are replaced).
        source: where the weights are read from (the source model's path).
        dst: output ``.onnx`` path; ``<dst name>.data`` is written beside it when external.
        plan: node name -> recipe (:func:`streamable` ones); unplanned nodes are kept as they are.
        external: keep the weights in ``<dst>.data``; None decides by size (> 2 GB, as ``save_model_atomic``).

    Returns:
        (names of the quantized nodes, external data file names written beside ``dst``).

    Raises:
        ExportError: a recipe this pass cannot apply, or unreadable external data.
    """
    bad = sorted({type(r).__name__ for r in plan.values() if not streamable(r)})
    if bad:
        raise ExportError(f"{source.path.name}: stream_quantize cannot apply {bad}")
    dst = Path(dst)
    graph = model.graph
    targets = _targets(model, plan)
    taken = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer}
    taken |= {i.name for i in graph.input} | {n.name for n in graph.node}
    uses = _uses(graph)
    inits = {t.name: t for t in graph.initializer}
    data_name = f"{dst.name}.data"
    nodes, new_inits, act_q = [], [], {}
    with atomic_path(dst.parent / data_name) as tmp_data, open(tmp_data, "wb") as f:
        writer = DataWriter(f, data_name)
        for node in progress_iter(list(graph.node), f"quantizing {source.path.name}", total=len(graph.node)):
            if node.name not in targets:
                nodes.append(node)
                continue
            recipe, w_name = plan[node.name], node.input[1]
            w = source.array(inits[w_name])  # (K, N) float32: the one weight in memory
            if isinstance(recipe, Int8DynamicRecipe):
                x = node.input[0]
                if x not in act_q:  # one DynamicQuantizeLinear per activation, shared by its consumers
                    act_q[x] = tuple(
                        fresh_name(f"{x}_{s}", taken) for s in ("quantized", "scale", "zero_point")
                    )
                    nodes.append(
                        helper.make_node("DynamicQuantizeLinear", [x], list(act_q[x]), name=f"{x}_dql")
                    )
                rw = _int8_rewrite(node, w_name, w, act_q[x], recipe, taken)
            else:
                rw = _nbits_rewrite(node, w_name, w, recipe, taken)
            del w
            nodes.extend(rw.nodes)
            new_inits.extend(writer.add(name, arr) for name, arr in rw.arrays.items())
            uses[w_name] -= 1
        dropped = {n.input[1] for n in targets.values() if uses.get(n.input[1], 0) == 0}
        kept = [writer.copy(t, source) for t in graph.initializer if t.name not in dropped]
        size = f.tell()
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend([*kept, *new_inits])
    keep_inputs = [i for i in graph.input if i.name not in dropped]
    graph.ClearField("input")
    graph.input.extend(keep_inputs)
    if any(n.domain == "com.microsoft" for n in nodes) and "com.microsoft" not in {
        o.domain for o in model.opset_import
    }:
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    check_nbits_accuracy(model, source=dst.name)
    return list(targets), _finish(model, dst, data_name, size, external)


def _uses(graph: onnx.GraphProto) -> dict[str, int]:
    """Readers of every tensor name: node inputs (subgraphs included) and graph outputs; a weight still read
    after its MatMul is replaced is kept."""
    uses: dict[str, int] = {}
    for o in graph.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                for name, k in _uses(sub).items():
                    uses[name] = uses.get(name, 0) + k
    return uses


def _finish(model: onnx.ModelProto, dst: Path, data_name: str, size: int, external: bool | None) -> list[str]:
    """Write the proto last; inline (and the data file removed) when the weights fit under 2 GB."""
    if external is None:
        external = size > INLINE_LIMIT
    if external:
        write_bytes_atomic(dst, model.SerializeToString())
        return [data_name]
    external_data_helper.load_external_data_for_model(model, str(dst.parent))
    return save_model_atomic(model, dst, external=False)  # inline; it removes the data file read back here
