"""The built-in quantization recipes (``nora-edge recipes``) and their default fidelity thresholds.

Data flow: a recipe name (CLI ``--precision`` / ``--recipe``) -> :func:`get_recipe` -> a frozen
:class:`~nora_edge.export.quantize.recipes.BundleRecipe` from :data:`RECIPES` (the recipe classes and their
validation live in recipes.py).
"""

from __future__ import annotations

from dataclasses import replace

from nora_edge.errors import InputError

from .recipes import (
    BundleRecipe,
    EmbeddingRecipe,
    Fp16Recipe,
    Int4QdqRecipe,
    Int8DynamicRecipe,
    Int8QdqRecipe,
    WeightOnlyRecipe,
)
from .thresholds import FidelityThresholds

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
            "int4-f32act",
            "weight-only int4 MatMulNBits (RTN, block 128) with fp32 compute (accuracy_level 1); vision int8. For "
            "--multi-token bundles: a verify call's logits then equal the sequential step's to fp32 rounding "
            "(int8 compute differed by up to 0.18 logits on the MetaWorld policy), so the tie-margin guard "
            "guarantees plain-greedy ids; ~1.5x slower decode on x86 CPU than int8 compute (measured)",
            int8,
            replace(int4, accuracy_level=1),
            replace(int4, accuracy_level=1),
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
