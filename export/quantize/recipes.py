"""Quantization recipes: what to do to each bundle component, as frozen, validated dataclasses.

Data flow: a recipe name (CLI ``--precision``) -> ``registry.get_recipe`` -> :class:`BundleRecipe` (one
component recipe per ONNX graph: ``vision``, ``decoder``; one for the decoder's logits head nodes,
``action_head``; one :class:`EmbeddingRecipe` for the numpy embedding table) -> :func:`apply_recipe`
(``nora_edge.export.quantize.apply``) runs each component recipe on its graph.

Every dataclass validates itself in ``__post_init__`` and raises :class:`InputError` naming the field and the
bad value; nothing falls back to a default silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from nora_edge.errors import InputError

from .thresholds import FidelityThresholds

GRAPH_COMPONENTS = ("vision", "decoder")
HEAD = "action_head"  # the MatMul nodes that produce the decoder's ``logits`` (inside decoder.onnx)
EMBEDDINGS = "embeddings"
COMPONENTS = (*GRAPH_COMPONENTS, HEAD, EMBEDDINGS)


def _check_choice(owner: str, name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise InputError(f"{owner}.{name} = {value!r}: must be one of {list(choices)}")


def _check_names(owner: str, name: str, value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise InputError(f"{owner}.{name} = {value!r}: must be a tuple of non-empty node/op names")


@dataclass(frozen=True)
class Fp32Recipe:
    """Leave the graph as exported (fp32); ``apply_recipe`` copies it."""

    kind: ClassVar[str] = "fp32"

    def describe(self) -> dict:
        return {"kind": self.kind}


@dataclass(frozen=True)
class Fp16Recipe:
    """FP16 weights and activations with FP32 islands found from calibrated activations.

    Attributes:
        overflow_fraction: a node stays FP32 when a calibrated activation it produces or consumes exceeds
            ``overflow_fraction * 65504`` in magnitude (0 < f <= 1; 0.5 leaves 2x headroom for the
            inputs not seen in calibration).
        keep_fp32_nodes: node names kept FP32 in addition to the detected ones.
        keep_io_types: graph inputs/outputs stay float32 (casts are inserted inside the graph).
    """

    overflow_fraction: float = 0.5
    keep_fp32_nodes: tuple[str, ...] = ()
    keep_io_types: bool = True
    kind: ClassVar[str] = "fp16"

    def __post_init__(self) -> None:
        f = self.overflow_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 < f <= 1.0:
            raise InputError(f"Fp16Recipe.overflow_fraction = {f!r}: must be a number in (0, 1]")
        _check_names("Fp16Recipe", "keep_fp32_nodes", self.keep_fp32_nodes)
        if not isinstance(self.keep_io_types, bool):
            raise InputError(f"Fp16Recipe.keep_io_types = {self.keep_io_types!r}: must be a bool")

    def describe(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class Int8DynamicRecipe:
    """CPU int8: weights quantized offline (symmetric int8), activations quantized per call (uint8).

    Attributes:
        per_channel: one weight scale per output channel (else one per tensor).
        reduce_range: 7-bit weights; avoids u8s8 saturation on x86 CPUs without VNNI.
        op_types: ONNX op types to quantize (Gemm is rewritten to MatMul first, see ``rewrite_gemm``).
        rewrite_gemm: rewrite Gemm (constant B) to MatMul (+Add) so the quantizer sees it.
    """

    per_channel: bool = True
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul",)
    rewrite_gemm: bool = True
    kind: ClassVar[str] = "int8"

    def __post_init__(self) -> None:
        for name in ("per_channel", "reduce_range", "rewrite_gemm"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"Int8DynamicRecipe.{name} = {getattr(self, name)!r}: must be a bool")
        _check_names("Int8DynamicRecipe", "op_types", self.op_types)
        for op in self.op_types:
            _check_choice("Int8DynamicRecipe", "op_types", op, ("MatMul", "Conv", "Gather"))

    def describe(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class Int8QdqRecipe:
    """Static int8 in QDQ form (TensorRT): calibrated symmetric activations, per-channel symmetric weights.

    Attributes:
        per_channel: one weight scale per output channel.
        calibrate_method: "minmax", "entropy" or "percentile" (onnxruntime's calibrators).
        op_types: ONNX op types to quantize.
        rewrite_gemm: rewrite Gemm (constant B) to MatMul (+Add) first.
    """

    per_channel: bool = True
    calibrate_method: str = "minmax"
    op_types: tuple[str, ...] = ("MatMul", "Conv")
    rewrite_gemm: bool = True
    kind: ClassVar[str] = "int8-qdq"

    def __post_init__(self) -> None:
        for name in ("per_channel", "rewrite_gemm"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"Int8QdqRecipe.{name} = {getattr(self, name)!r}: must be a bool")
        _check_choice(
            "Int8QdqRecipe", "calibrate_method", self.calibrate_method, ("minmax", "entropy", "percentile")
        )
        _check_names("Int8QdqRecipe", "op_types", self.op_types)
        for op in self.op_types:
            _check_choice("Int8QdqRecipe", "op_types", op, ("MatMul", "Conv", "Gemm", "Add", "Mul"))

    def describe(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class WeightOnlyRecipe:
    """Weight-only block quantization to the ``com.microsoft.MatMulNBits`` op (activations stay float).

    Attributes:
        bits: 4 (or 8: only with ``accuracy_level=4``; 8-bit MatMulNBits without it runs ~20x slower on CPU).
        block_size: weights per scale along K: 16, 32, 64, 128 or 256.
        algorithm: "rtn" (round to nearest, onnxruntime's C++ kernel) or "hqq" (half-quadratic
            optimisation of scale/zero, needs no calibration data; 4 bits only).
        accuracy_level: MatMulNBits compute type: None (op default), 0 unset, 1 fp32, 2 fp16, 3 bf16,
            4 int8 activations (fastest on CPU).
        symmetric: symmetric blocks (no zero points; rtn only).
        rewrite_gemm: rewrite Gemm (constant B) to MatMul (+Add) first.
    """

    bits: int = 4
    block_size: int = 128
    algorithm: str = "rtn"
    accuracy_level: int | None = 4
    symmetric: bool = False
    rewrite_gemm: bool = True
    kind: ClassVar[str] = "int4"

    def __post_init__(self) -> None:
        _check_choice("WeightOnlyRecipe", "bits", self.bits, (4, 8))
        _check_choice("WeightOnlyRecipe", "block_size", self.block_size, (16, 32, 64, 128, 256))
        _check_choice("WeightOnlyRecipe", "algorithm", self.algorithm, ("rtn", "hqq"))
        _check_choice("WeightOnlyRecipe", "accuracy_level", self.accuracy_level, (None, 0, 1, 2, 3, 4))
        if self.bits == 8 and self.accuracy_level != 4:
            raise InputError(
                f"WeightOnlyRecipe.accuracy_level = {self.accuracy_level!r} with bits = 8: 8-bit MatMulNBits "
                "without accuracy_level 4 runs ~20x slower than fp32 on CPU; set accuracy_level=4"
            )
        if self.algorithm == "hqq" and self.bits != 4:
            raise InputError(
                f"WeightOnlyRecipe.bits = {self.bits!r} with algorithm 'hqq': hqq here is 4-bit only"
            )
        if self.algorithm == "hqq" and self.symmetric:
            raise InputError("WeightOnlyRecipe.symmetric = True with algorithm 'hqq': hqq is asymmetric only")
        for name in ("symmetric", "rewrite_gemm"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"WeightOnlyRecipe.{name} = {getattr(self, name)!r}: must be a bool")

    @property
    def label(self) -> str:
        return f"int{self.bits}-{self.algorithm}-b{self.block_size}"

    def describe(self) -> dict:
        return {"kind": f"int{self.bits}", **asdict(self)}


@dataclass(frozen=True)
class Int4QdqRecipe:
    """INT4 weight-only in standard ONNX (TensorRT): blocked ``DequantizeLinear`` (opset 21) feeding a plain MatMul.

    Each constant (K, N) MatMul weight becomes an INT4 initializer and (ceil(K / block_size), N) float scales, one
    per ``block_size`` weights along K, dequantized by ``DequantizeLinear(axis=0, block_size)``; activations stay
    float. Symmetric only: TensorRT's DequantizeLinear needs a zero (here: absent) zero point.

    Attributes:
        block_size: weights per scale along K: 16, 32, 64, 128 or 256.
        rewrite_gemm: rewrite Gemm (constant B) to MatMul (+Add) first.
    """

    block_size: int = 128
    rewrite_gemm: bool = True
    kind: ClassVar[str] = "int4-qdq"

    def __post_init__(self) -> None:
        _check_choice("Int4QdqRecipe", "block_size", self.block_size, (16, 32, 64, 128, 256))
        if not isinstance(self.rewrite_gemm, bool):
            raise InputError(f"Int4QdqRecipe.rewrite_gemm = {self.rewrite_gemm!r}: must be a bool")

    @property
    def label(self) -> str:
        return f"int4-qdq-b{self.block_size}"

    def describe(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class EmbeddingRecipe:
    """Storage of the (vocab, hidden) embedding table: "fp32", "fp16" or "int8" (symmetric, one scale per row)."""

    dtype: str = "fp16"
    kind: ClassVar[str] = "embeddings"

    def __post_init__(self) -> None:
        _check_choice("EmbeddingRecipe", "dtype", self.dtype, ("fp32", "fp16", "int8"))

    def describe(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype}


GraphRecipe = Fp32Recipe | Fp16Recipe | Int8DynamicRecipe | Int8QdqRecipe | WeightOnlyRecipe | Int4QdqRecipe
GRAPH_RECIPE_TYPES = (
    Fp32Recipe,
    Fp16Recipe,
    Int8DynamicRecipe,
    Int8QdqRecipe,
    WeightOnlyRecipe,
    Int4QdqRecipe,
)
# graph recipes whose output is standard ONNX that TensorRT parses (no com.microsoft op): `--target tensorrt`
TENSORRT_GRAPH_RECIPES = (Fp32Recipe, Fp16Recipe, Int8QdqRecipe, Int4QdqRecipe)


@dataclass(frozen=True)
class BundleRecipe:
    """A named per-component plan: one graph recipe per ONNX component, one for the head, one for embeddings,
    and the fidelity thresholds the quantized bundle must meet against its fp32 source.

    The head recipe applies to the decoder's logits-producing MatMul nodes; the decoder recipe to the rest.
    A float head under an integer decoder recipe is allowed (the head nodes are excluded from quantization);
    an fp16 decoder allows only an fp16 or fp32 head.
    """

    name: str
    description: str
    vision: GraphRecipe = field(default_factory=Fp32Recipe)
    decoder: GraphRecipe = field(default_factory=Fp32Recipe)
    action_head: GraphRecipe = field(default_factory=Fp32Recipe)
    embeddings: EmbeddingRecipe = field(default_factory=lambda: EmbeddingRecipe("fp32"))
    fidelity: FidelityThresholds = field(default_factory=FidelityThresholds)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise InputError(f"BundleRecipe.name = {self.name!r}: must be a non-empty word")
        for comp in (*GRAPH_COMPONENTS, HEAD):
            value = getattr(self, comp)
            if not isinstance(value, GRAPH_RECIPE_TYPES):
                raise InputError(f"BundleRecipe('{self.name}').{comp} = {value!r}: not a graph recipe")
        if not isinstance(self.embeddings, EmbeddingRecipe):
            raise InputError(
                f"BundleRecipe('{self.name}').embeddings = {self.embeddings!r}: not an EmbeddingRecipe"
            )
        if not isinstance(self.fidelity, FidelityThresholds):
            raise InputError(
                f"BundleRecipe('{self.name}').fidelity = {self.fidelity!r}: not a FidelityThresholds"
            )
        if isinstance(self.decoder, Fp16Recipe) and not isinstance(self.action_head, Fp16Recipe | Fp32Recipe):
            raise InputError(
                f"BundleRecipe('{self.name}').action_head = {self.action_head.kind}: an fp16 decoder takes only "
                "an fp16 or fp32 head"
            )
        if isinstance(self.action_head, Fp16Recipe) and not isinstance(self.decoder, Fp16Recipe):
            raise InputError(
                f"BundleRecipe('{self.name}').action_head = fp16 with decoder = {self.decoder.kind}: an fp16 head "
                "needs an fp16 decoder"
            )

    def for_component(self, component: str) -> GraphRecipe | EmbeddingRecipe:
        """The recipe of one component ("vision", "decoder", "action_head", "embeddings")."""
        _check_choice(f"BundleRecipe('{self.name}')", "component", component, COMPONENTS)
        return getattr(self, component)

    def precision(self, component: str) -> str:
        """Short precision label for a manifest's ``components.<name>.precision``."""
        r = self.for_component(component)
        if isinstance(r, EmbeddingRecipe):
            return r.dtype
        if component == "decoder" and self.action_head != self.decoder:
            return f"{_label(self.decoder)}+head-{_label(self.action_head)}"
        return _label(r)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            **{c: self.for_component(c).describe() for c in COMPONENTS},
            "fidelity": self.fidelity.describe(),
        }

    @property
    def tensorrt_ready(self) -> bool:
        """True when every graph recipe writes standard ONNX ops TensorRT parses (``--target tensorrt``)."""
        return all(
            isinstance(self.for_component(c), TENSORRT_GRAPH_RECIPES) for c in (*GRAPH_COMPONENTS, HEAD)
        )


def _label(recipe: GraphRecipe) -> str:
    return recipe.label if isinstance(recipe, WeightOnlyRecipe | Int4QdqRecipe) else recipe.kind
