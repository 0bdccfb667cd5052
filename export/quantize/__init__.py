"""Quantization recipes for bundle components (``nora_edge.export.quantize``).

Data flow: recipe name -> :func:`get_recipe` -> :class:`BundleRecipe` -> per graph
:func:`apply_recipe` (fp32 .onnx + calibration feeds -> quantized .onnx + :class:`QuantResult`); the numpy
embedding table goes through :func:`quantize_embedding_table`. Calibration feeds come from
``nora_edge.export.quantize.calibration``.

Modules: ``recipes`` (dataclasses + registry), ``graph`` (load/save, Gemm->MatMul, MatMulNBits guard),
``stream`` (int8 dynamic and n-bit RTN, one weight in memory at a time: every built-in CPU recipe),
``fp16`` (FP32 islands), ``int8`` (dynamic with Conv/Gather, QDQ), ``weight_only`` (MatMulNBits via
onnxruntime's quantizer: hqq), ``int4_qdq`` (INT4 weight-only as blocked DequantizeLinear, opset 21: TensorRT),
``trt_quant`` (``--target tensorrt`` recipes: operator-table check of the quantized graphs, build hints),
``embeddings``, ``apply`` (one graph: picks streaming or in-memory),
``calibration`` (samples -> feeds), ``thresholds`` (per-recipe fidelity thresholds and the gate that checks
a fidelity report against them), ``bundle_quant`` (fp32 bundle -> quantized bundle with its gated fidelity
report: the entry point for ``export_bundle(precision=...)``).

Memory: the streaming recipes hold one weight at a time; fp16, int8-qdq and hqq load the whole graph into
onnxruntime's quantizers (that path ran out of memory for real-shape int8 on a 24 GB machine; fp16, int8-qdq
and hqq at real shape are unmeasured and need a bigger workstation).
"""

from .apply import QuantResult, apply_recipe, check_parity
from .bundle_quant import quantize_bundle
from .calibration import CalibrationSample, load_calibration_dir, record_feeds, synthetic_samples
from .embeddings import EmbeddingTable, lookup_rows, quantize_embedding_table
from .graph import check_nbits_accuracy, find_head_nodes, rewrite_gemm_to_matmul
from .recipes import (
    COMPONENTS,
    BundleRecipe,
    EmbeddingRecipe,
    Fp16Recipe,
    Fp32Recipe,
    Int4QdqRecipe,
    Int8DynamicRecipe,
    Int8QdqRecipe,
    WeightOnlyRecipe,
)
from .registry import get_recipe, list_recipes
from .thresholds import GATE_METRICS, FidelityGateError, FidelityThresholds, MetricCheck, check_fidelity
from .trt_quant import check_tensorrt_recipe, tensorrt_recipes

__all__ = [
    "COMPONENTS",
    "GATE_METRICS",
    "FidelityGateError",
    "FidelityThresholds",
    "MetricCheck",
    "check_fidelity",
    "BundleRecipe",
    "CalibrationSample",
    "EmbeddingRecipe",
    "EmbeddingTable",
    "Fp16Recipe",
    "Fp32Recipe",
    "Int4QdqRecipe",
    "Int8DynamicRecipe",
    "Int8QdqRecipe",
    "QuantResult",
    "WeightOnlyRecipe",
    "apply_recipe",
    "check_nbits_accuracy",
    "check_parity",
    "check_tensorrt_recipe",
    "find_head_nodes",
    "get_recipe",
    "list_recipes",
    "load_calibration_dir",
    "lookup_rows",
    "quantize_bundle",
    "quantize_embedding_table",
    "record_feeds",
    "rewrite_gemm_to_matmul",
    "synthetic_samples",
    "tensorrt_recipes",
]
