"""FLOPs and bytes of an exported ONNX graph, node by node, for the roofline.

Data flow: an ONNX file (loaded without its external weight data) + concrete values for its named dynamic dims
(``batch``, ``seq``, ``past``, ...) -> inputs pinned to those values -> ORT's symbolic shape inference (knows the
com.microsoft ops: MatMulNBits, GroupQueryAttention; taught MRotaryEmbedding here) -> one :class:`~nora_edge.bench.roofline.OpCost` per node:
MatMul / Gemm / Conv / MatMulInteger / MatMulNBits / attention FLOPs from their shapes; bytes = weights read once
(initializers, or what constant subgraphs such as DequantizeLinear read from them) + activations read and written.
Nodes whose inputs are all constant are folded by ORT at load and cost nothing; reshapes are views and move no
bytes. Embedding Gathers read rows only, and so do rotary embeddings from their cos/sin caches.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from nora_edge.bench.roofline import OpCost, StageCost
from nora_edge.errors import InputError

_MATMUL_INT8 = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul"}
_ATTENTION = {"GroupQueryAttention", "MultiHeadAttention"}
_ROTARY = {"RotaryEmbedding", "MRotaryEmbedding"}  # input, position_ids, cos_cache, sin_cache
_VIEW_OPS = {
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Identity",
    "Shape",
    "Size",
}  # no data moved by ORT
VIEW_OPS = frozenset(_VIEW_OPS)  # no kernel launched either (``nora_edge.bench.launches``)
_MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "Conv", "MatMulNBits"} | _MATMUL_INT8 | _ATTENTION


def load_graph(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """The model without external weight data (shapes and dtypes are in the initializer headers)."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}")
    return onnx.load(str(path), load_external_data=False)


def pin_dims(model: onnx.ModelProto, dims: dict[str, int], source: str) -> onnx.ModelProto:
    """Copy of ``model`` whose graph inputs have every named dim replaced by ``dims[name]``."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    inits = {i.name for i in pinned.graph.initializer}
    for inp in pinned.graph.input:
        if inp.name in inits:
            continue
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                if d.dim_param not in dims:
                    raise InputError(
                        f"{source}: input '{inp.name}' has dynamic dim '{d.dim_param}'; pass dims={{'{d.dim_param}': ...}}"
                    )
                d.dim_value = int(dims[d.dim_param])
    return pinned


def detach_external(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy where initializers without inline data become typed graph inputs, so shape inference never reads
    weight files; inline initializers (shape constants) stay."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for init in out.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            out.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


def _symbolic_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's symbolic shape inference, taught ``MRotaryEmbedding`` (Qwen2.5-VL's rotary in the fused decoder):
    its output has its first input's shape, as ``RotaryEmbedding``'s (onnxruntime docs/ContribOperators.md)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    tool = SymbolicShapeInference(2**31 - 1, True, True, 0)
    tool.dispatcher_.setdefault("MRotaryEmbedding", tool._infer_RotaryEmbedding)
    tool._preprocess(model)
    complete = False
    while tool.run_:
        complete = tool._infer_impl()
    tool._update_output_from_vi()
    if not complete:
        raise RuntimeError("incomplete symbolic shape inference")
    return tool.out_mp_


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, elem_type) for every tensor whose shape is fully known."""
    try:
        inferred = _symbolic_infer(detach_external(model))
    except Exception as e:  # the tool raises bare Exceptions / AssertionErrors on graphs it cannot follow
        raise InputError(
            f"<{model.graph.name}>: symbolic shape inference failed ({type(e).__name__}: {e})"
        ) from e
    g = inferred.graph
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        if all(s >= 0 for s in shape):
            out[vi.name] = (shape, tt.elem_type)
    for init in model.graph.initializer:
        out[init.name] = (tuple(init.dims), init.data_type)
    return out


def _nbytes(shape: tuple[int, ...], elem_type: int) -> float:
    itemsize = helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    return float(math.prod(shape) * itemsize)


def _precision(elem_type: int) -> str:
    return "fp16" if elem_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16) else "fp32"


class _Walker:
    """Visits nodes in order, tracking which tensors are constant and what weight bytes they stand for."""

    def __init__(self, model: onnx.ModelProto, shapes: dict, source: str) -> None:
        self.shapes, self.source = shapes, source
        self.const_bytes: dict[str, float] = {}
        self.const_int8: set[str] = set()
        for init in model.graph.initializer:
            self.const_bytes[init.name] = _nbytes(tuple(init.dims), init.data_type)
            if init.data_type in (TensorProto.INT8, TensorProto.UINT8):
                self.const_int8.add(init.name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise InputError(f"{self.source}: shape of tensor '{name}' unknown after shape inference")
        return self.shapes[name][0]

    def io_bytes(self, names: list[str]) -> float:
        return sum(
            _nbytes(*self.shapes[n]) for n in names if n and n in self.shapes and n not in self.const_bytes
        )

    def weight_bytes(self, node: onnx.NodeProto) -> float:
        return sum(self.const_bytes.get(n, 0.0) for n in node.input if n)

    def visit(self, node: onnx.NodeProto) -> OpCost | None:
        ins = [n for n in node.input if n]
        if node.op_type == "Constant" or (ins and all(n in self.const_bytes for n in ins)):
            folded = sum(self.const_bytes[n] for n in ins)
            for o in node.output:  # folded at load: stands for the bytes it was made from
                self.const_bytes[o] = folded if ins else self._constant_bytes(node, o)
                if any(n in self.const_int8 for n in ins):
                    self.const_int8.add(o)
            return None
        flops, prec = self.flops(node)
        weights = self.weight_bytes(node)
        if node.op_type == "Gather" and node.input[0] in self.const_bytes:
            weights = self.io_bytes(list(node.output))  # embedding lookup: rows only
        elif node.op_type in _ROTARY and len(ins) == 4:  # cos/sin caches (positions, hd/2): one row per token
            tokens = math.prod(self.shape(ins[0])[:2])  # (B, S, heads * hd)
            weights = sum(self.const_bytes.get(n, 0.0) / max(self.shape(n)[0], 1) * tokens for n in ins[2:])
        if any(n in self.const_int8 for n in ins) and prec in ("fp32", "fp16") and flops > 0:
            prec = "int8"  # QDQ weights: ORT runs the int8 kernel
        act = 0.0 if node.op_type in _VIEW_OPS else self.io_bytes(ins) + self.io_bytes(list(node.output))
        name = node.name or f"{node.op_type}:{node.output[0]}"
        kind = "matmul" if node.op_type in _MATMUL_OPS else "elementwise"
        rows = 0
        if kind == "matmul" and weights > 0 and ins[0] in self.shapes:
            rows = math.prod(self.shapes[ins[0]][0][:-1])  # activation rows: 1 for a decode step
        return OpCost(name, flops, weights, act, prec, kind, rows)

    def _constant_bytes(self, node: onnx.NodeProto, out: str) -> float:
        return _nbytes(*self.shapes[out]) if out in self.shapes else 0.0

    def flops(self, node: onnx.NodeProto) -> tuple[float, str]:
        """(FLOPs, precision) of one node."""
        op = node.op_type
        a = node.input[0] if node.input else ""
        et = self.shapes[a][1] if a in self.shapes else TensorProto.FLOAT
        if op in ("MatMul", "FusedMatMul") or op in _MATMUL_INT8:
            k = self.shape(a)[-1]
            out = self.shape(node.output[0])
            return 2.0 * math.prod(out) * k, "int8" if op in _MATMUL_INT8 else _precision(et)
        if op == "Gemm":
            attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            sa = self.shape(a)
            k = sa[0] if attrs.get("transA", 0) else sa[1]
            return 2.0 * math.prod(self.shape(node.output[0])) * k, _precision(et)
        if op == "Conv":
            w = self.shape(node.input[1])
            return 2.0 * math.prod(self.shape(node.output[0])) * math.prod(w[1:]), _precision(et)
        if op == "MatMulNBits":
            attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            rows = math.prod(self.shape(a)[:-1])
            bits = int(attrs.get("bits", 4))
            return 2.0 * rows * int(attrs["K"]) * int(attrs["N"]), "int4" if bits == 4 else "int8"
        if op in _ATTENTION:
            return self._attention_flops(node), _precision(et)
        outs = [o for o in node.output if o in self.shapes]
        return float(sum(math.prod(self.shapes[o][0]) for o in outs)), _precision(et)

    def _attention_flops(self, node: onnx.NodeProto) -> float:
        attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        q = self.shape(node.input[0])  # (B, S, heads * head_dim)
        heads = int(attrs["num_heads"])
        head_dim = q[-1] // heads if node.op_type == "MultiHeadAttention" else None
        if node.op_type == "GroupQueryAttention":
            kv_heads = int(attrs["kv_num_heads"])
            k = self.shape(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            head_dim = k[-1] // kv_heads if k else q[-1] // (heads + 2 * kv_heads)
            length = self.shape(node.output[1])[2] if len(node.output) > 1 and node.output[1] else q[1]
        else:
            length = self.shape(node.input[1])[1] if len(node.input) > 1 and node.input[1] else q[1]
        return 4.0 * q[0] * q[1] * length * heads * head_dim


def graph_cost(model: str | Path | onnx.ModelProto, dims: dict[str, int], stage: str = "graph") -> StageCost:
    """Cost of one run of ``model`` with its dynamic dims set to ``dims``.

    Args:
        model: path to an .onnx file (external data is not read) or a ModelProto.
        dims: value of every named dynamic dim of the graph inputs, e.g. ``{"batch": 1, "seq": 95, "past": 0}``.
        stage: name of the returned stage.

    Raises:
        InputError: file missing, a dynamic dim without a value, or a shape inference could not resolve.
    """
    source = str(model) if not isinstance(model, onnx.ModelProto) else f"<{model.graph.name}>"
    pinned = pin_dims(load_graph(model), dims, source)
    shapes = infer_shapes(pinned)
    walker = _Walker(pinned, shapes, source)
    ops = [c for node in pinned.graph.node if (c := walker.visit(node)) is not None]
    return StageCost(stage, tuple(ops))
