"""Quantization recipes: what to do to each bundle component, as frozen, validated dataclasses.

Data flow: a recipe name (CLI ``--precision``) -> :func:`get_recipe` -> :class:`BundleRecipe` (one
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


# Default fidelity thresholds of the built-in recipes (vs the fp32 bundle, 8 synthetic held-out samples, CPU).
# Measured on the trained tiny fixtures (h1 and h5, seeds 0-2 so held-out seeds 1-3, ``quantize_bundle``
# defaults; AVX2 CPU without VNNI), worst value over 6 runs per recipe (all 42 runs pass). Margins: 5-20x on the
# cosines (in 1 - cos), 2.7x on action error, 2x on the rates, 1.5-2.2x on token agreement (in 1 - agreement)
# and 1.7x on gripper flips, whose values move in steps of one sample (1/8) or one step:
#   vision cosine min      int8 vision 0.99812, int8-qdq 0.99946, fp16 1 - 3e-7   -> 0.99 / 0.9999
#   decoder logits cos     int8 0.99977, int8-qdq 0.99985, int4 0.99957, hqq 0.99959, mixed 0.99975
#                          -> 0.995 (int8), 0.99 (int4 class), 0.9999 (fp16)
#   decoder token agr.     int8 0.8625, int8-qdq 0.9487, int4 0.9219, hqq 0.9531, mixed 0.7286 (one early
#                          divergence in 8 samples costs ~0.12) -> 0.7 (int8), 0.6 (int4 class), 0.9 (fp16)
#   action error / range   worst 0.0366 (int8, mixed) -> 0.1 (a tenth of the q01..q99 range on average)
#   gripper flip rate      worst 0.15 (int4, h5: 6 of 40 steps; h1 has 8 steps, so one flip is 0.125) -> 0.25
#   repaired / forced      worst +0.125 (one more flagged chunk of 8) -> 0.25; malformed: never seen -> 0
# fp16 measured 0 on every end-to-end metric; CPU runs fp16 graphs in fp32 after casting the weights, so GPU
# fp16 can differ more than this (the fp16 limits leave room for that). fp32 copies the graphs: exact.
# Random-weight models fail the integer recipes: quantization noise exceeds their logit margins (medium int4:
# decoder logits cosine 0.918, token agreement 0.07, action error 0.46 of the range; medium int8: 0.9963, 0.65,
# 0.27; untrained tiny int4: 0.95, 0.50, 0.28). That is the gate doing its job: their int8/int4 actions are not
# fp32's. Such bundles (fixtures, the random real-shape scale run, unmeasured here) need ``accept_degraded``.
EXACT = FidelityThresholds(
    image_embeds_cosine_min=0.999999,
    decoder_logits_cosine_mean=0.999999,
    decoder_token_agreement_mean=1.0,
    action_err_frac_mean=0.0,
    gripper_flip_rate=0.0,
    malformed_rate_increase=0.0,
    repaired_rate_increase=0.0,
    forced_continue_rate_increase=0.0,
)
FP16_FIDELITY = FidelityThresholds(
    image_embeds_cosine_min=0.9999,
    decoder_logits_cosine_mean=0.9999,
    decoder_token_agreement_mean=0.9,
    action_err_frac_mean=0.01,
    gripper_flip_rate=0.05,
    repaired_rate_increase=0.125,
    forced_continue_rate_increase=0.125,
)
INT8_FIDELITY = FidelityThresholds(decoder_logits_cosine_mean=0.995, decoder_token_agreement_mean=0.7)
INT4_FIDELITY = FidelityThresholds()  # the defaults are the int4-class limits


def _builtin() -> dict[str, BundleRecipe]:
    # Embeddings stay fp16 in every built-in recipe: int8 tables (EmbeddingRecipe("int8")) need per-row scales
    # in the runtime's lookup, which nora_edge.generate.Decoder does not apply yet.
    fp16, int8, qdq, emb16 = Fp16Recipe(), Int8DynamicRecipe(), Int8QdqRecipe(), EmbeddingRecipe("fp16")
    int4 = WeightOnlyRecipe(bits=4, block_size=128, algorithm="rtn", accuracy_level=4)
    hqq = WeightOnlyRecipe(bits=4, block_size=128, algorithm="hqq", accuracy_level=4)
    recipes = [
        BundleRecipe("fp32", "reference precision everywhere", fidelity=EXACT),
        BundleRecipe(
            "fp16",
            "fp16 with fp32 islands where calibrated activations overflow (GPU)",
            fp16,
            fp16,
            fp16,
            emb16,
            FP16_FIDELITY,
        ),
        BundleRecipe("int8", "CPU dynamic int8, per-channel weights", int8, int8, int8, emb16, INT8_FIDELITY),
        BundleRecipe(
            "int8-qdq", "static int8 QDQ, calibrated (TensorRT)", qdq, qdq, qdq, emb16, INT8_FIDELITY
        ),
        BundleRecipe(
            "int4",
            "weight-only int4 MatMulNBits (RTN, block 128, int8 compute); vision int8",
            int8,
            int4,
            int4,
            emb16,
            INT4_FIDELITY,
        ),
        BundleRecipe(
            "int4-b32",
            "weight-only int4 MatMulNBits (RTN, block 32, symmetric, int8 compute: onnxruntime-genai's CPU default, "
            "the faster MatMulNBits kernel on x86 here, 18% larger than block 128); vision int8",
            int8,
            WeightOnlyRecipe(block_size=32, symmetric=True),
            WeightOnlyRecipe(block_size=32, symmetric=True),
            emb16,
            INT4_FIDELITY,
        ),
        BundleRecipe(
            "int4-hqq",
            "weight-only int4 (HQQ, block 128); vision int8. For GPU providers: on CPU its float zero points take "
            "onnxruntime 1.32's slow MatMulNBits path (~40x slower than fp32, measured)",
            int8,
            hqq,
            hqq,
            emb16,
            INT4_FIDELITY,
        ),
        BundleRecipe(
            "int4-qdq",
            "weight-only int4 as blocked DequantizeLinear (opset 21, block 128, symmetric) feeding MatMul; "
            "vision int8-qdq (TensorRT)",
            qdq,
            Int4QdqRecipe(block_size=128),
            Int4QdqRecipe(block_size=128),
            emb16,
            INT4_FIDELITY,
        ),
        BundleRecipe(
            "mixed",
            "vision int8 + decoder int4 (RTN, block 32) + head int8 (dynamic)",
            int8,
            WeightOnlyRecipe(block_size=32),
            int8,
            emb16,
            INT4_FIDELITY,
        ),
    ]
    return {r.name: r for r in recipes}


RECIPES: dict[str, BundleRecipe] = _builtin()


def list_recipes() -> list[BundleRecipe]:
    """Every built-in recipe, in registry order (``r.name``, ``r.description``, ``r.describe()``)."""
    return list(RECIPES.values())


def get_recipe(name: str | BundleRecipe) -> BundleRecipe:
    """Look up a recipe by name (a :class:`BundleRecipe` passes through).

    Raises:
        InputError: unknown name (the message lists the known ones).
    """
    if isinstance(name, BundleRecipe):
        return name
    if name not in RECIPES:
        raise InputError(f"unknown quantization recipe {name!r}: choose one of {list(RECIPES)}")
    return RECIPES[name]
