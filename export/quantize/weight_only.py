"""Weight-only block quantization to ``com.microsoft.MatMulNBits`` (int4; int8 only with int8 compute).

Data flow: ModelProto (MatMul with constant 2-D B) -> onnxruntime ``MatMulNBitsQuantizer`` with the RTN
(C++ block quantizer) or HQQ config -> MatMulNBits nodes (packed weights, per-block scales and zero points)
-> ``accuracy_level`` set on the new nodes (HQQ does not set it) -> :func:`check_nbits_accuracy` guard.

HQQ's float zero points run on a slow CPU path in onnxruntime 1.32 (8.5 ms vs 0.03 ms for RTN and 0.2 ms
fp32 on one 2048x2048 layer, batch 1, 1 thread): a warning says so. GPTQ from onnxruntime 1.32 is not offered: on correlated calibration data its output error matched RTN's to
5 digits (measured on a 256x512 MLP), i.e. the calibration did not take effect.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import onnx

from nora_edge.errors import ExportError

from .graph import check_nbits_accuracy
from .recipes import WeightOnlyRecipe


def _quantizer_module():
    """Import onnxruntime's matmul_nbits_quantizer without letting its logging.basicConfig(INFO) stick."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer as mod

    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger(mod.__name__).setLevel(logging.WARNING)
    return mod


def quantize_weight_only(
    model: onnx.ModelProto,
    recipe: WeightOnlyRecipe,
    *,
    nodes_to_exclude: Sequence[str] = (),
    source: str = "model",
) -> onnx.ModelProto:
    """Quantize the constant weights of every MatMul (except ``nodes_to_exclude``) to MatMulNBits.

    Args:
        model: model with weights loaded (modified and returned).
        recipe: bits, block size, algorithm, accuracy level.
        nodes_to_exclude: MatMul node names to leave alone.
        source: file name for messages.

    Raises:
        ExportError: the quantizer failed, or the result breaks the 8-bit accuracy-level guard.
    """
    mod = _quantizer_module()
    before = {n.name for n in model.graph.node if n.op_type == "MatMulNBits"}
    if recipe.algorithm == "hqq":
        warnings.warn(
            f"{source}: hqq writes float zero points; onnxruntime 1.32's CPU MatMulNBits runs those ~300x slower "
            "than rtn's uint8 zero points (measured on a 2048x2048 layer); use hqq for GPU providers",
            stacklevel=2,
        )
        algo = mod.HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=recipe.bits)
    else:
        algo = mod.DefaultWeightOnlyQuantConfig(
            block_size=recipe.block_size,
            is_symmetric=recipe.symmetric,
            accuracy_level=recipe.accuracy_level,
            bits=recipe.bits,
        )
    try:
        quantizer = mod.MatMulNBitsQuantizer(
            model,
            bits=recipe.bits,
            block_size=recipe.block_size,
            is_symmetric=recipe.symmetric,
            accuracy_level=recipe.accuracy_level,
            nodes_to_exclude=list(nodes_to_exclude),
            algo_config=algo,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # hqq's torch
            quantizer.process()
    except Exception as e:  # the quantizer raises assorted types (asserts included)
        raise ExportError(f"{source}: {recipe.label} quantization failed ({e})") from e
    out = quantizer.model.model
    for n in out.graph.node:
        if n.op_type == "MatMulNBits" and n.name not in before:
            keep = [a for a in n.attribute if a.name != "accuracy_level"]
            n.ClearField("attribute")
            n.attribute.extend(keep)
            if recipe.accuracy_level is not None:
                n.attribute.append(onnx.helper.make_attribute("accuracy_level", recipe.accuracy_level))
    check_nbits_accuracy(out, source=source)
    return out
