"""INT4 weight-only quantization in standard ONNX: blocked ``DequantizeLinear`` (opset 21) feeding a plain MatMul.

Data flow: ModelProto (weights loaded, opset 17..21) --:func:`upgrade_opset` (ai.onnx opset -> 21, IR -> 10, only
when every op whose schema changed on the way has a *compatible* adapter in onnx's own version converter, i.e. the
newer version only adds types or attributes whose defaults keep the old behaviour; anything else is refused,
naming the node)--> onnxruntime's ``MatMulNBitsQuantizer`` with ``quant_format=QuantFormat.QDQ``, symmetric RTN
--> per constant (K, N) MatMul weight: ``W_q`` INT4 (K, N) + ``scales`` (ceil(K / block), N) float32 ->
``DequantizeLinear(axis=0, block_size)`` -> ``MatMul(x, W_dq)``; activations stay float --:func:`check_blocked_dq`
(every quantized MatMul reads exactly one such DequantizeLinear of an INT4 initializer, no zero point, no
com.microsoft op)--> ModelProto.

Sources:
  - the DequantizeLinear-21 ``block_size`` attribute and INT4 type: onnx/onnx ``docs/Operators.md``
    (DequantizeLinear, version 21) and ``docs/Changelog.md`` (opset 21).
  - the quantizer: onnxruntime ``onnxruntime/python/tools/quantization/matmul_nbits_quantizer.py``
    (``DefaultWeightOnlyQuantizer.quantize_matmul``: the QDQ branch writes exactly the DQ -> MatMul pair above;
    ``MatMulNBitsQuantizer.process`` would force the opset to 21 itself without checking the graph, so it is
    upgraded here first).
  - the compatible adapters: onnx ``onnx/version_converter/convert.h`` (the ``CompatibleAdapter`` registrations
    17 -> 18 .. 20 -> 21, listed per step in :data:`COMPATIBLE_STEPS`).
  - TensorRT: INT4 is a DequantizeLinear input type in onnx/onnx-tensorrt ``docs/operators.md`` (10.1 GA and
    10.15 GA); its zero point must be zero ("`x_zero_point` must be zero"), hence symmetric blocks only.
"""

from __future__ import annotations

import logging
import warnings

import onnx
from onnx import defs

from nora_edge.errors import ExportError
from nora_edge.export.trt_support import walk_nodes

from .recipes import Int4QdqRecipe

TARGET_OPSET = 21  # DequantizeLinear gains block_size and INT4 inputs in opset 21
TARGET_IR = 10  # INT4 tensors need IR version 10
STANDARD = ("", "ai.onnx")
# per opset step, the ops given a new ai.onnx schema version at that opset whose onnx version-converter adapter
# for the step is a CompatibleAdapter (onnx/version_converter/convert.h, sections "17 -> 18" .. "20 -> 21"): the
# new version adds element types (float8, int4, string ...) or attributes whose defaults keep the old meaning.
# An op changed at a step but missing here (Reduce* 17 -> 18: axes attribute -> input; Split 17 -> 18; DFT
# 19 -> 20; GridSample 19 -> 20; GroupNormalization 20 -> 21) is refused rather than rewritten.
COMPATIBLE_STEPS: dict[int, frozenset[str]] = {
    18: frozenset({"Pad", "Resize", "OptionalGetElement", "OptionalHasElement", "ScatterND", "ScatterElements"}),
    19: frozenset(
        {
            "Equal", "AveragePool", "Cast", "CastLike", "Constant", "DequantizeLinear", "Identity", "If", "Loop",
            "Pad", "QuantizeLinear", "Reshape", "Resize", "Scan", "Shape", "Size",
        }
    ),
    20: frozenset({"ConstantOfShape", "IsInf", "IsNaN", "ReduceMax", "ReduceMin"}),
    21: frozenset(
        {
            "Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear", "Flatten", "Identity", "If",
            "Loop", "Pad", "QLinearMatMul", "QuantizeLinear", "Reshape", "Scan", "Shape", "Size", "Squeeze",
            "Transpose", "Unsqueeze",
        }
    ),
}  # fmt: skip
MIN_SOURCE_OPSET = min(COMPATIBLE_STEPS) - 1


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version.

    Raises:
        ExportError: no ai.onnx opset import.
    """
    for imp in model.opset_import:
        if imp.domain in STANDARD:
            return int(imp.version)
    raise ExportError("model imports no ai.onnx opset")


def upgrade_opset(model: onnx.ModelProto, target: int = TARGET_OPSET, *, source: str = "model") -> list[str]:
    """Raise the ai.onnx opset of ``model`` to ``target`` in place, where that keeps every node's meaning.

    Args:
        model: the model (modified: opset import and IR version).
        target: the opset to reach (>= the model's).
        source: file name for messages.

    Returns:
        the op types whose schema version changed on the way (all compatible), sorted.

    Raises:
        ExportError: the model's opset is below 17 or above ``target``, or a node's op gets a new schema on the
            way without a compatible adapter (:data:`COMPATIBLE_STEPS`; node and op named).
    """
    have = ai_onnx_opset(model)
    if have > target or have < MIN_SOURCE_OPSET or target > max(COMPATIBLE_STEPS):
        raise ExportError(
            f"{source}: ai.onnx opset {have} cannot be raised to {target} here "
            f"(supported {MIN_SOURCE_OPSET}..{max(COMPATIBLE_STEPS)})"
        )
    changed: dict[str, str] = {}
    for node in walk_nodes(model.graph):
        if node.domain not in STANDARD or node.op_type in changed:
            continue
        for step in range(have + 1, target + 1):
            try:
                since = defs.get_schema(node.op_type, step).since_version
            except defs.SchemaError as e:
                raise ExportError(
                    f"{source}: node '{node.name}' ({node.op_type}) has no ai.onnx schema ({e})"
                ) from e
            if since != step:
                continue  # unchanged at this step
            if node.op_type not in COMPATIBLE_STEPS[step]:
                raise ExportError(
                    f"{source}: node '{node.name}' ({node.op_type}) gets a new schema at opset {step} with no "
                    "compatible adapter in onnx's version converter; cannot raise the opset from "
                    f"{have} to {target} for blocked DequantizeLinear"
                )
            changed[node.op_type] = node.name
    for imp in model.opset_import:
        if imp.domain in STANDARD:
            imp.version = target
    model.ir_version = max(model.ir_version, TARGET_IR)
    return sorted(changed)


def _quantizer_module():
    """onnxruntime's matmul_nbits_quantizer without its logging.basicConfig(INFO) sticking."""
    from .weight_only import _quantizer_module as load

    return load()


def quantize_int4_qdq(
    model: onnx.ModelProto, recipe: Int4QdqRecipe, *, nodes_to_exclude=(), source: str = "model"
) -> onnx.ModelProto:
    """Blocked INT4 DequantizeLinear -> MatMul for every constant-weight MatMul not in ``nodes_to_exclude``.

    Args:
        model: opset 17..21 model with weights loaded (modified and returned; opset raised to 21).
        recipe: block size.
        nodes_to_exclude: MatMul node names to leave float.
        source: file name for messages.

    Returns:
        the quantized model (passes :func:`check_blocked_dq`).

    Raises:
        ExportError: the opset cannot be raised, the quantizer failed, or its output is not the expected form.
    """
    upgrade_opset(model, source=source)
    mod = _quantizer_module()
    from onnxruntime.quantization import QuantFormat

    algo = mod.DefaultWeightOnlyQuantConfig(
        block_size=recipe.block_size, is_symmetric=True, bits=4, quant_format=QuantFormat.QDQ
    )
    try:
        quantizer = mod.MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=recipe.block_size,
            is_symmetric=True,
            nodes_to_exclude=list(nodes_to_exclude),
            quant_format=QuantFormat.QDQ,
            algo_config=algo,
        )
        logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantizer.process()
    except Exception as e:  # the quantizer raises assorted types (asserts included)
        raise ExportError(f"{source}: {recipe.label} quantization failed ({e})") from e
    out = quantizer.model.model
    check_blocked_dq(out, recipe.block_size, source=source)
    return out


def blocked_dq_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(DequantizeLinear, MatMul) pairs: a blocked DQ of an INT4 initializer whose output a MatMul reads as B."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    pairs = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.domain not in STANDARD:
            continue
        w = inits.get(n.input[0])
        attrs = {a.name for a in n.attribute}
        if w is None or w.data_type != onnx.TensorProto.INT4 or "block_size" not in attrs:
            continue
        for r in readers.get(n.output[0], []):
            if r.op_type == "MatMul" and len(r.input) > 1 and r.input[1] == n.output[0]:
                pairs.append((n, r))
    return pairs


def check_blocked_dq(model: onnx.ModelProto, block_size: int, *, source: str = "model") -> int:
    """The quantized graph's form: opset >= 21, no non-standard op, every INT4 initializer dequantized by a
    blocked DequantizeLinear (axis 0, ``block_size``, no zero point, (ceil(K / block), N) scales) read by MatMul.

    Returns:
        the number of (DequantizeLinear, MatMul) pairs.

    Raises:
        ExportError: naming the first node or initializer out of form.
    """
    if ai_onnx_opset(model) < TARGET_OPSET:
        raise ExportError(
            f"{source}: blocked DequantizeLinear needs opset {TARGET_OPSET}, graph has {ai_onnx_opset(model)}"
        )
    odd = [n for n in model.graph.node if n.domain not in STANDARD]
    if odd:
        raise ExportError(f"{source}: node '{odd[0].name}' is in domain '{odd[0].domain}', not ai.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    pairs = blocked_dq_pairs(model)
    for dq, _ in pairs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        w, s = inits[dq.input[0]], inits.get(dq.input[1])
        k, n = list(w.dims)
        want = [-(-k // block_size), n]
        if attrs.get("axis", 1) != 0 or attrs.get("block_size") != block_size or len(dq.input) > 2:
            raise ExportError(
                f"{source}: DequantizeLinear '{dq.name}' has axis={attrs.get('axis')}, "
                f"block_size={attrs.get('block_size')}, {len(dq.input)} inputs; want axis 0, {block_size}, no zero point"
            )
        if s is None or list(s.dims) != want:
            raise ExportError(
                f"{source}: DequantizeLinear '{dq.name}' scales {None if s is None else list(s.dims)} != {want}"
            )
    int4 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    if len(int4) != len(pairs):
        used = {dq.input[0] for dq, _ in pairs}
        stray = [t for t in int4 if t not in used]
        raise ExportError(
            f"{source}: INT4 initializer '{stray[0]}' is not a blocked DequantizeLinear -> MatMul weight"
        )
    return len(pairs)
