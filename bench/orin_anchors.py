"""Per-phase Orin efficiency factors fitted on TensorRT Edge-LLM 0.10's published AGX Orin 64GB measurements.

Data flow: :data:`ANCHORS` (model, phase, measured ms, source) + :data:`QWEN3_VL_CONFIGS` (the Qwen3-VL-2B / 4B
architecture, each field set with its source) --:func:`qwen3_vl_spec`--> ``VlaSpec`` --``roofline.
analytic_stage_costs`` under :data:`EDGE_LLM_PLAN`--> per-phase ``StageCost`` --``roofline.predict_stage_ms`` on
the AGX Orin 64GB profile with every efficiency at 1--> roofline ms per anchor (:func:`roofline_ms`)
--:func:`fit_efficiency` (per phase: the geometric mean of roofline / measured over that phase's anchors, i.e. the
least-squares fit in log space)--> ``{"vision", "prefill", "decode"}`` efficiency --:func:`hold_out` /
:func:`leave_one_out`--> the prediction error of anchors that played no part in the fit.

Model: a phase's time is the project's roofline (each op ``max(flops / peak, bytes / bandwidth)``) with BOTH the
peak and the bandwidth scaled by that phase's efficiency ``eta``, i.e. ``roofline_ms(eta = 1) / eta``; vision and
prefill are compute bound on Orin (so ``eta`` is a compute efficiency), decode is bandwidth bound (a bandwidth
efficiency). ``nora_edge.bench.orin_predict`` applies the fitted factors to NORA-Long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

from nora_edge.bench.models import Dense, LmDims, VitDims, VlaSpec
from nora_edge.bench.roofline import PrecisionPlan, StageCost, analytic_stage_costs, predict_stage_ms
from nora_edge.errors import InputError
from nora_edge.profiles import DeviceProfile, Quantity, load_profile

ANCHOR_PROFILE = "orin-agx-64gb"
PHASES = ("vision", "prefill", "decode")
# a phase without an anchor of its own (vision, when its only anchor is held out) borrows another's factor:
# the ViT and the prefill are both large compute-bound GEMMs on Orin
FALLBACK = {"vision": "prefill", "prefill": "vision", "decode": None}

EDGE_LLM_SOURCE = (
    "NVIDIA TensorRT Edge-LLM 0.10.0 performance benchmarks "
    "(nvidia.github.io/TensorRT-Edge-LLM/0.10.0/user_guide/performance/performance-benchmarks.html): Jetson AGX "
    "Orin 64GB, JetPack 7.2, TensorRT 10.16, batch 1, INT4 AWQ weights + FP16 activations; figures as transcribed "
    "in nora-edge issue 17 (the page's Orin rows were not re-read when this module was written)"
)
# Edge-LLM quantizes the LM head only when asked (`tensorrt-edgellm-quantize --lm_head_quantization`, Edge-LLM
# docs user_guide/features/quantization.md). [assumed: the benchmark rows did not pass --lm_head_quantization,
# and the ViT ran FP16 (the page's VLM tables carry a "ViT Prec" column; its Orin rows were not re-read)]
EDGE_LLM_PLAN = PrecisionPlan("int4 AWQ (Edge-LLM)", vision="fp16", lm="int4", head="fp16", embed="fp16")
# Not stated in what was read: the decode rate's output length (KV length) [assumed 128 generated tokens, i.e. a
# mean KV length of prompt + 64; the KV read is ~3% of the 2B decode bytes at that length]
ANCHOR_OUTPUT_TOKENS = 128
IMAGE_TOKENS = 265
PROMPT_TOKENS = 292


@dataclass(frozen=True)
class Anchor:
    """One published measurement.

    Attributes:
        model: a key of :data:`QWEN3_VL_CONFIGS`.
        phase: "vision" (one image through the ViT + mergers), "prefill" (the prompt through the LLM),
            "decode" (one generated token: decoder step + LM head).
        measured_ms: milliseconds per invocation (decode: 1000 / published tokens/s).
        note: what the figure is and what about it was assumed.
    """

    model: str
    phase: str
    measured_ms: float
    note: str

    @property
    def key(self) -> str:
        return f"{self.model}/{self.phase}"


ANCHORS: tuple[Anchor, ...] = (
    Anchor("Qwen3-VL-2B", "vision", 36.2, "vision encoder 36.2 ms for 265 image tokens"),
    Anchor("Qwen3-VL-2B", "prefill", 45.7, "prefill 45.7 ms for 292 tokens"),
    Anchor("Qwen3-VL-2B", "decode", 1e3 / 98.9, "decode 98.9 tokens/s"),
    Anchor(
        "Qwen3-VL-4B",
        "prefill",
        105.7,
        "prefill 105.7 ms [assumed: the same 292-token prompt as the 2B row; same tokenizer and image processor]",
    ),
    Anchor("Qwen3-VL-4B", "decode", 1e3 / 54.7, "decode 54.7 tokens/s"),
)
DEFAULT_HOLDOUT = (
    "Qwen3-VL-4B/decode"  # decode dominates a NORA-Long chunk: test the factor that matters most
)

# Qwen3-VL architectures (transformers `Qwen3VLConfig` field names). Both configs reproduce the published
# parameter totals exactly when counted (tests/bench/test_orin_anchors.py): Qwen3-VL-2B-Instruct 2,127,532,032
# (the Hugging Face model API's `safetensors.total`) and Qwen3-VL-4B-Instruct 4,437,815,808 (`sum(p.numel())` of
# the loaded model), both as quoted by public repositories found by exact-string search.
QWEN3_VL_VISION = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
}
QWEN3_VL_CONFIGS: dict[str, dict] = {
    "Qwen3-VL-2B": {
        "source": "Qwen/Qwen3-VL-2B-Instruct config.json (text = Qwen3-1.7B dims) as reproduced in public code "
        "(sgl-jax's Qwen3VLVisionConfig defaults: depth 24, hidden 1024, intermediate 4096, 16 heads, patch 16, "
        "out_hidden 2048, deepstack [5, 11, 17]; Qwen3-1.7B: 28 layers, hidden 2048, intermediate 6144, 16 "
        "heads / 8 KV heads of 128, vocab 151936, tied; one public config class gives intermediate 5632, which "
        "the published 2,127,532,032-parameter total rules out); the Hugging Face page itself was not read",
        "tie_word_embeddings": True,
        "text_config": {
            "num_hidden_layers": 28,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
        },
        "vision_config": {**QWEN3_VL_VISION, "out_hidden_size": 2048},
    },
    "Qwen3-VL-4B": {
        "source": "Qwen/Qwen3-VL-4B-Instruct config.json as reproduced in public code (DiffSynth-Studio's "
        "Qwen3-VL encoder config, transformers_version 4.57.0.dev0: text 36 layers, hidden 2560, intermediate "
        "9728, 32 heads / 8 KV heads of 128, vocab 151936, tied; vision as the 2B's with out_hidden 2560); the "
        "Hugging Face page itself was not read",
        "tie_word_embeddings": True,
        "text_config": {
            "num_hidden_layers": 36,
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
        },
        "vision_config": {**QWEN3_VL_VISION, "out_hidden_size": 2560},
    },
}


def qwen3_vl_spec(
    model: str,
    *,
    image_tokens: int = IMAGE_TOKENS,
    prompt_tokens: int = PROMPT_TOKENS,
    output_tokens: int = ANCHOR_OUTPUT_TOKENS,
) -> VlaSpec:
    """The analytic spec of a Qwen3-VL model as Edge-LLM ran it.

    The ViT runs full attention over ``4 x image_tokens`` patches (2x2 merge) with LayerNorms and a GELU fc1/fc2
    MLP; the final merger and one DeepStack merger per ``deepstack_visual_indexes`` entry each map
    ``hidden * merge^2 -> hidden * merge^2 -> out_hidden`` on the merged tokens.

    Raises:
        InputError: unknown model or non-positive lengths.
    """
    if model not in QWEN3_VL_CONFIGS:
        raise InputError(f"unknown anchor model {model!r}; expected one of {sorted(QWEN3_VL_CONFIGS)}")
    for name, v in (
        ("image_tokens", image_tokens),
        ("prompt_tokens", prompt_tokens),
        ("output", output_tokens),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive int, got {v!r}")
    cfg = QWEN3_VL_CONFIGS[model]
    t, vc = cfg["text_config"], cfg["vision_config"]
    h, merge = vc["hidden_size"], vc["spatial_merge_size"]
    vit = VitDims(
        name=f"{model}.vit",
        layers_run=vc["depth"],
        hidden=h,
        intermediate=vc["intermediate_size"],
        heads=vc["num_heads"],
        patch_dim=vc["in_channels"] * vc["temporal_patch_size"] * vc["patch_size"] ** 2,
        tokens=image_tokens * merge * merge,
        gated_mlp=False,
        norm_params=4 * h,
        patch_bias=True,
    )
    ctx = h * merge * merge
    mergers = tuple(
        d
        for k in range(1 + len(vc["deepstack_visual_indexes"]))
        for d in (
            Dense(f"merger{k}.fc1", ctx, ctx, image_tokens),
            Dense(f"merger{k}.fc2", ctx, vc["out_hidden_size"], image_tokens),
        )
    )
    vocab = t["vocab_size"]
    lm = LmDims(
        layers=t["num_hidden_layers"],
        hidden=t["hidden_size"],
        intermediate=t["intermediate_size"],
        heads=t["num_attention_heads"],
        kv_heads=t["num_key_value_heads"],
        head_dim=t["head_dim"],
        vocab=vocab,
        tied=cfg["tie_word_embeddings"],
        qkv_bias=False,
        head_rows=vocab,
    )
    return VlaSpec(
        name=model,
        vision=(vit,),
        vision_linears=mergers,
        lm=lm,
        prompt_tokens=prompt_tokens,
        generated_tokens=output_tokens + 1,  # decode_steps = output_tokens: mean KV = prompt + output / 2
        actions_per_inference=1,
        assumptions=(f"{model}: {cfg['source']}",),
    )


def phase_costs(model: str) -> dict[str, tuple[StageCost, ...]]:
    """The roofline stages each anchor phase covers: vision, prefill, decode = decoder step + LM head."""
    costs = analytic_stage_costs(qwen3_vl_spec(model), EDGE_LLM_PLAN)
    return {
        "vision": (costs["vision"],),
        "prefill": (costs["prefill"],),
        "decode": (costs["decode_token"], costs["action_head"]),
    }


def with_phase_efficiency(profile: DeviceProfile, eta: float, source: str) -> DeviceProfile:
    """``profile`` with compute and memory efficiency both ``eta`` (one phase's factor)."""
    if isinstance(eta, bool) or not (isinstance(eta, float | int) and math.isfinite(eta) and eta > 0):
        raise InputError(f"efficiency must be a positive finite number, got {eta!r}")
    q = Quantity(float(eta), source, True)
    return replace(profile, efficiency={"compute": q, "memory": q})


def stages_ms(stages: tuple[StageCost, ...], profile: DeviceProfile) -> float:
    """Roofline milliseconds of a phase's stages, one invocation each (no launch cost: the fitted factors absorb
    the runtime's overheads, Edge-LLM's decode CUDA graph included)."""
    return sum(predict_stage_ms(s, profile)["ms"] for s in stages)


@cache
def roofline_ms(key: str, profile_name: str = ANCHOR_PROFILE) -> float:
    """Milliseconds the roofline gives anchor ``key`` ("model/phase") on ``profile_name`` at efficiency 1."""
    model, _, phase = key.partition("/")
    if phase not in PHASES:
        raise InputError(f"anchor key {key!r}: phase must be one of {PHASES}")
    unit = with_phase_efficiency(load_profile(profile_name), 1.0, "efficiency 1 (raw roofline)")
    return stages_ms(phase_costs(model)[phase], unit)


@dataclass(frozen=True)
class Fit:
    """Fitted per-phase factors.

    Attributes:
        efficiency: phase -> eta.
        anchors: phase -> keys of the anchors it was fitted on (empty: borrowed, see ``borrowed``).
        borrowed: phase -> the phase whose factor it took.
        in_sample: key -> (predicted_ms, measured_ms) for every anchor of the fit.
    """

    efficiency: dict[str, float]
    anchors: dict[str, tuple[str, ...]]
    borrowed: dict[str, str]
    in_sample: dict[str, tuple[float, float]]

    def predict_ms(self, key: str) -> float:
        """Anchor ``key``'s predicted ms under this fit."""
        return roofline_ms(key) / self.efficiency[key.partition("/")[2]]


def anchor(key: str) -> Anchor:
    """The anchor named ``key``; InputError names the unknown key."""
    for a in ANCHORS:
        if a.key == key:
            return a
    raise InputError(f"unknown anchor {key!r}; expected one of {[a.key for a in ANCHORS]}")


def fit_efficiency(exclude: tuple[str, ...] = ()) -> Fit:
    """Fit one factor per phase on every anchor not in ``exclude``.

    Per phase: ``eta = exp(mean(log(roofline_ms / measured_ms)))`` (least squares in log space); a phase left
    without anchors borrows :data:`FALLBACK`'s factor.

    Raises:
        InputError: an excluded key is not an anchor, or no anchor is left for a phase and its fallback.
    """
    for key in exclude:
        anchor(key)
    used = [a for a in ANCHORS if a.key not in exclude]
    eff, keys, borrowed = {}, {}, {}
    for phase in PHASES:
        mine = [a for a in used if a.phase == phase]
        keys[phase] = tuple(a.key for a in mine)
        if mine:
            logs = [math.log(roofline_ms(a.key) / a.measured_ms) for a in mine]
            eff[phase] = math.exp(sum(logs) / len(logs))
    for phase in PHASES:
        if phase not in eff:
            other = FALLBACK[phase]
            if other is None or other not in eff:
                raise InputError(f"no anchor left to fit the {phase!r} factor (excluded: {list(exclude)})")
            eff[phase], borrowed[phase] = eff[other], other
    fit = Fit(eff, keys, borrowed, {})
    fit.in_sample.update({a.key: (fit.predict_ms(a.key), a.measured_ms) for a in used})
    return fit


def hold_out(key: str = DEFAULT_HOLDOUT) -> dict:
    """Fit without anchor ``key`` and predict it.

    Returns:
        {"held_out": key, "fit": Fit, "predicted_ms", "measured_ms", "error" (predicted / measured - 1),
        "borrowed": phase the held-out phase's factor came from (None: its own phase's other anchors)}.
    """
    a = anchor(key)
    fit = fit_efficiency((key,))
    pred = fit.predict_ms(key)
    return {
        "held_out": key,
        "fit": fit,
        "predicted_ms": pred,
        "measured_ms": a.measured_ms,
        "error": pred / a.measured_ms - 1,
        "borrowed": fit.borrowed.get(a.phase),
    }


def leave_one_out() -> list[dict]:
    """:func:`hold_out` of every anchor in turn."""
    return [hold_out(a.key) for a in ANCHORS]


def fit_json(fit: Fit) -> dict:
    """JSON-ready view of a :class:`Fit`."""
    return {
        "efficiency": dict(fit.efficiency),
        "anchors": {p: list(k) for p, k in fit.anchors.items()},
        "borrowed": dict(fit.borrowed),
        "in_sample": {
            k: {"predicted_ms": p, "measured_ms": m, "error": p / m - 1}
            for k, (p, m) in fit.in_sample.items()
        },
    }


def anchors_json() -> list[dict]:
    """The anchor table with its sources, for reports."""
    return [
        {"key": a.key, "measured_ms": a.measured_ms, "note": a.note, "source": EDGE_LLM_SOURCE}
        for a in ANCHORS
    ]
