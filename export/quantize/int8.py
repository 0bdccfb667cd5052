"""Integer-8 recipes through onnxruntime's quantizers.

Data flow (dynamic, CPU): model path -> ``quantize_dynamic`` (per-channel symmetric int8 weights, uint8
activations quantized per call; MatMul with a constant B only) -> MatMulInteger / DynamicQuantizeLinear graph.

Data flow (static QDQ, TensorRT): model path + calibration feeds (:class:`FeedReader`) -> ``quantize_static``
(QDQ format, symmetric int8 activations from the calibrated ranges, per-channel symmetric int8 weights)
-> QuantizeLinear/DequantizeLinear pairs around the quantized ops.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from nora_edge.errors import ExportError

from .recipes import Int8DynamicRecipe, Int8QdqRecipe

_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


class FeedReader(CalibrationDataReader):
    """onnxruntime calibration reader over a list of feeds (name -> array), restartable."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str] | None = None):
        self.feeds = [
            {k: np.asarray(v) for k, v in f.items() if input_names is None or k in input_names} for f in feeds
        ]
        self.index = 0

    def get_next(self) -> dict | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0


def _quiet():
    for name in ("root", "onnxruntime.quantization"):
        logging.getLogger(None if name == "root" else name).setLevel(logging.ERROR)


def quantize_int8_dynamic(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    recipe: Int8DynamicRecipe,
    *,
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] = (),
    external: bool = False,
) -> None:
    """Dynamic int8 quantization of ``src`` into ``dst`` (both paths).

    Args:
        nodes_to_quantize: restrict to these node names (None: every node of ``recipe.op_types``).
        nodes_to_exclude: never quantize these.
        external: write ``dst`` with external data.
    """
    _quiet()
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize is not None else None,
            nodes_to_exclude=list(nodes_to_exclude),
            use_external_data_format=external,
            extra_options={"MatMulConstBOnly": True},
        )
    except Exception as e:  # the quantizer raises assorted types
        raise ExportError(f"{src}: int8 dynamic quantization failed ({e})") from e


def quantize_int8_qdq(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    recipe: Int8QdqRecipe,
    calibration: Sequence[Mapping[str, np.ndarray]],
    *,
    input_names: Sequence[str],
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] = (),
    external: bool = False,
) -> None:
    """Static QDQ int8 quantization of ``src`` into ``dst``, activations calibrated on ``calibration``.

    Raises:
        ExportError: no calibration feeds, or the quantizer failed.
    """
    if not calibration:
        raise ExportError(f"{src}: the int8-qdq recipe needs calibration feeds, got none")
    _quiet()
    try:
        quantize_static(
            str(src),
            str(dst),
            FeedReader(calibration, input_names),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize is not None else None,
            nodes_to_exclude=list(nodes_to_exclude),
            use_external_data_format=external,
            calibrate_method=_METHODS[recipe.calibrate_method],
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "MatMulConstBOnly": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
            },
        )
    except Exception as e:  # the quantizer raises assorted types
        raise ExportError(f"{src}: int8-qdq quantization failed ({e})") from e
