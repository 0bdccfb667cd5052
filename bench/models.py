"""Analytic model descriptions for the roofline: NORA (Qwen2.5-VL), OpenVLA-7B, and the Qwen3-VL-2B calibration
reference.

Data flow: published dims (or a checkpoint's config.json via :func:`nora_spec_from_config`) -> :class:`VlaSpec`
(vision towers, projector/merger linears, language model, prompt and generation lengths, assumptions) ->
``nora_edge.bench.roofline`` turns a spec into per-stage FLOPs and bytes. Every preset lists its assumptions so the
report can print them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from nora_edge.errors import InputError


@dataclass(frozen=True)
class LmDims:
    """Decoder-only language model dims (Llama / Qwen2 family: gated SwiGLU MLP, RMSNorm, GQA).

    Attributes:
        head_rows: rows of the output head evaluated per generated token (the vocab, or the action-token slice
            when the export keeps only those rows).
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    head_rows: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer (q/k/v/o, gate/up/down, 2 RMSNorms)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        bias = (q + 2 * kv) if self.qkv_bias else 0
        return h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h

    def total_params(self) -> int:
        """Embedding + layers + final norm + untied head (tied heads share the embedding)."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden + head


@dataclass(frozen=True)
class VitDims:
    """One ViT tower applied to one image.

    Attributes:
        patch_dim: input features of the patch embedding (channels x temporal x patch x patch).
        tokens: sequence length through the blocks (patches + CLS/register tokens).
        layers_run: blocks actually executed (a feature taken from an earlier layer skips the rest).
        gated_mlp: SwiGLU (3 matrices) instead of fc1/fc2.
        norm_params: parameters of the norms in one block (RMSNorm: 2*hidden; LayerNorm: 4*hidden).
        block_extra_params: per-block parameters outside linears and norms (e.g. DINOv2 layer scale 2*hidden).
        window: attention window length per executed block (None = full attention over ``tokens``).
        patch_bias: the patch embedding has a bias.
    """

    name: str
    layers_run: int
    hidden: int
    intermediate: int
    heads: int
    patch_dim: int
    tokens: int
    gated_mlp: bool
    norm_params: int
    block_extra_params: int = 0
    window: tuple[int | None, ...] = ()
    patch_bias: bool = False

    def block_params(self) -> int:
        h, i = self.hidden, self.intermediate
        mlp = 3 * h * i + 2 * i + h if self.gated_mlp else 2 * h * i + i + h
        return 4 * h * h + 4 * h + mlp + self.norm_params + self.block_extra_params


@dataclass(frozen=True)
class Dense:
    """A linear layer outside the towers (projector, patch merger), applied to ``tokens`` rows."""

    name: str
    in_features: int
    out_features: int
    tokens: int
    bias: bool = True


@dataclass(frozen=True)
class VlaSpec:
    """Everything the analytic roofline needs about one VLA at inference.

    Attributes:
        prompt_tokens: prefill length (template + image tokens + instruction).
        generated_tokens: tokens produced per inference (the first comes from the prefill's logits).
        actions_per_inference: actions in one chunk (time horizon).
        cached_prefix_tokens: constant prompt prefix whose KV the runtime computes once at load (nora-edge
            caches NORA's system turn .. <|vision_start|>); the per-inference prefill covers the rest.
        extra_params: parameters outside towers, linears and LM (position embeddings, final norms...).
        assumptions: human-readable list for the report.
    """

    name: str
    vision: tuple[VitDims, ...]
    vision_linears: tuple[Dense, ...]
    lm: LmDims
    prompt_tokens: int
    generated_tokens: int
    actions_per_inference: int
    cached_prefix_tokens: int = 0
    extra_params: int = 0
    assumptions: tuple[str, ...] = field(default_factory=tuple)

    @property
    def decode_steps(self) -> int:
        """Decoder forwards after the prefill (the prefill's logits give the first token)."""
        return max(self.generated_tokens - 1, 0)

    def vision_params(self) -> int:
        towers = sum(
            v.layers_run * v.block_params() + v.patch_dim * v.hidden + v.patch_bias * v.hidden
            for v in self.vision
        )
        return towers + sum(
            d.in_features * d.out_features + d.bias * d.out_features for d in self.vision_linears
        )

    @property
    def prefill_tokens(self) -> int:
        """Tokens run through the decoder by the per-inference prefill."""
        return self.prompt_tokens - self.cached_prefix_tokens

    def with_lengths(
        self,
        *,
        prompt_tokens: int | None = None,
        generated_tokens: int | None = None,
        cached_prefix_tokens: int | None = None,
    ) -> VlaSpec:
        """Copy with measured prompt / generation / cached-prefix lengths (from a bench run)."""
        new = {
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated_tokens,
            "cached_prefix_tokens": cached_prefix_tokens,
        }
        for key, v in new.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InputError(f"{key} must be a non-negative int, got {v!r}")
        out = replace(self, **{k: v for k, v in new.items() if v is not None})
        if out.prompt_tokens < 1 or out.generated_tokens < 1 or out.cached_prefix_tokens >= out.prompt_tokens:
            raise InputError(
                "need prompt_tokens >= 1, generated_tokens >= 1 and cached_prefix_tokens < prompt_tokens; got "
                f"{out.prompt_tokens}, {out.generated_tokens}, {out.cached_prefix_tokens}"
            )
        return out


# NORA prompt (declare-lab/nora inference/nora.py: processor.apply_chat_template on [image, instruction] with
# add_generation_prompt; the Qwen2.5-VL chat template adds its default system turn): system turn 11 tokens,
# user header + vision start/end 5, assistant header 5 -> 21 template tokens; the instruction is assumed to be
# 10 tokens. The constant prefix (system turn + "<|im_start|>user\n<|vision_start|>") is 15 tokens with the
# Qwen tokenizer.
NORA_TEMPLATE_TOKENS = 21
NORA_PREFIX_TOKENS = 15
INSTRUCTION_TOKENS = 10


def qwen25_vision(vc: dict, image_size: int = 224) -> tuple[VitDims, tuple[Dense, ...], int]:
    """The Qwen2.5-VL vision tower at ``image_size`` from a ``vision_config`` mapping.

    Returns:
        (tower, merger linears, merged image tokens).
    """
    try:
        depth, hidden, inter = int(vc["depth"]), int(vc["hidden_size"]), int(vc["intermediate_size"])
        heads, patch = int(vc["num_heads"]), int(vc["patch_size"])
        merge, temporal = int(vc["spatial_merge_size"]), int(vc["temporal_patch_size"])
        out_hidden = int(vc["out_hidden_size"])
        window_px = int(vc["window_size"])
        full = {int(i) for i in vc["fullatt_block_indexes"]}
    except KeyError as e:
        raise InputError(f"vision_config: missing field {e.args[0]!r}") from e
    if image_size % (patch * merge):
        raise InputError(f"image_size {image_size} is not a multiple of patch*merge = {patch * merge}")
    side = image_size // patch  # patches per side
    patches = side * side
    win_side = min(window_px // merge // patch * merge, side)  # window in patches per side
    window = tuple(None if i in full else win_side * win_side for i in range(depth))
    tower = VitDims(
        name="qwen2.5-vl-vit",
        layers_run=depth,
        hidden=hidden,
        intermediate=inter,
        heads=heads,
        patch_dim=int(vc.get("in_channels", vc.get("in_chans", 3))) * temporal * patch * patch,
        tokens=patches,
        gated_mlp=True,
        norm_params=2 * hidden,
        window=window,
    )
    ctx = hidden * merge * merge
    merged = patches // (merge * merge)
    merger = (Dense("merger.fc1", ctx, ctx, merged), Dense("merger.fc2", ctx, out_hidden, merged))
    return tower, merger, merged


def nora_spec_from_config(
    config: dict,
    *,
    generated_tokens: int,
    horizon: int,
    action_head_rows: int | None = None,
    name: str = "NORA",
    cached_prefix_tokens: int = NORA_PREFIX_TOKENS,
) -> VlaSpec:
    """A NORA spec from a Qwen2.5-VL config.json mapping (real checkpoint or fixture).

    Args:
        generated_tokens: tokens per inference (action tokens + the closing ``<|im_end|>``).
        horizon: actions per chunk.
        action_head_rows: rows of the exported head (the action slice); None = full vocab.
    """
    text = config.get("text_config") or config
    try:
        hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
        lm = LmDims(
            layers=int(text["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(text["intermediate_size"]),
            heads=heads,
            kv_heads=int(text["num_key_value_heads"]),
            head_dim=int(text.get("head_dim") or hidden // heads),
            vocab=int(text["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            qkv_bias=True,
            head_rows=int(action_head_rows or text["vocab_size"]),
        )
    except KeyError as e:
        raise InputError(f"config.json: missing text field {e.args[0]!r}") from e
    if "vision_config" not in config:
        raise InputError("config.json: missing field 'vision_config'")
    tower, merger, image_tokens = qwen25_vision(config["vision_config"])
    return VlaSpec(
        name=name,
        vision=(tower,),
        vision_linears=merger,
        lm=lm,
        prompt_tokens=NORA_TEMPLATE_TOKENS + INSTRUCTION_TOKENS + image_tokens,
        generated_tokens=generated_tokens,
        actions_per_inference=horizon,
        cached_prefix_tokens=cached_prefix_tokens,
        extra_params=tower.hidden,  # merger ln_q
        assumptions=(
            f"{name}: prompt = {NORA_TEMPLATE_TOKENS} template + {INSTRUCTION_TOKENS} instruction + "
            f"{image_tokens} image tokens at 224x224",
            f"{name}: {generated_tokens} generated tokens per chunk of {horizon} actions "
            "(action tokens + <|im_end|>); the prefill's logits give the first",
            f"{name}: vision window attention counted per window ({tower.window.count(None)} full-attention blocks)",
            f"{name}: the constant {cached_prefix_tokens}-token prompt prefix is prefilled once at load",
        ),
    )


# Qwen2.5-VL-3B: Qwen/Qwen2.5-VL-3B-Instruct config.json (not re-checked here), vocab grown by NORA's 2048 action
# tokens (declare-lab/nora inference/nora.py: action ids 151665..153712)
NORA_3B_CONFIG = {
    "tie_word_embeddings": True,
    "text_config": {
        "hidden_size": 2048,
        "num_hidden_layers": 36,
        "intermediate_size": 11008,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 153713,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 2048,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
}
# FAST+ paper Table I: a 1-second 7-dim chunk of 5 steps (Bridge, 5 Hz) is ~20 tokens; NORA (horizon 1) is
# assumed to use one token per dim.
NORA_LONG_TOKENS = 20 + 1
NORA_TOKENS = 7 + 1


def nora_3b(horizon: int = 5, *, action_head_rows: int | None = 2048) -> VlaSpec:
    """NORA (horizon 1) or NORA-Long (horizon 5) at real Qwen2.5-VL-3B dims."""
    if horizon not in (1, 5):
        raise InputError(f"NORA ships horizon 1 (NORA) or 5 (NORA-Long), got {horizon}")
    tokens = NORA_LONG_TOKENS if horizon == 5 else NORA_TOKENS
    name = "NORA-Long-3B" if horizon == 5 else "NORA-3B"
    spec = nora_spec_from_config(
        NORA_3B_CONFIG, generated_tokens=tokens, horizon=horizon, action_head_rows=action_head_rows, name=name
    )
    head = "the 2048 action rows" if action_head_rows else "the full vocab"
    return replace(spec, assumptions=spec.assumptions + (f"{name}: the output head evaluates {head}",))


def openvla_7b() -> VlaSpec:
    """OpenVLA-7B: Llama-2-7B + fused DINOv2-L/14 (registers) and SigLIP-So400m/14 at 224, 7 tokens per action."""
    dino = VitDims(
        name="dinov2-l14-reg4",
        layers_run=23,  # prismatic takes the second-to-last block's output
        hidden=1024,
        intermediate=4096,
        heads=16,
        patch_dim=3 * 14 * 14,
        tokens=256 + 1 + 4,
        gated_mlp=False,
        norm_params=4 * 1024,
        block_extra_params=2 * 1024,
        patch_bias=True,
    )
    siglip = VitDims(
        name="siglip-so400m-14",
        layers_run=26,
        hidden=1152,
        intermediate=4304,
        heads=16,
        patch_dim=3 * 14 * 14,
        tokens=256,
        gated_mlp=False,
        norm_params=4 * 1152,
        patch_bias=True,
    )
    fused = 1024 + 1152
    projector = (
        Dense("projector.fc1", fused, 4 * fused, 256),
        Dense("projector.fc2", 4 * fused, 4096, 256),
        Dense("projector.fc3", 4096, 4096, 256),
    )
    lm = LmDims(32, 4096, 11008, 32, 32, 128, 32000, tied=False, qkv_bias=False, head_rows=32000)
    prompt = 1 + 256 + 25
    return VlaSpec(
        name="OpenVLA-7B",
        vision=(dino, siglip),
        vision_linears=projector,
        lm=lm,
        prompt_tokens=prompt,
        generated_tokens=7,
        actions_per_inference=1,
        assumptions=(
            "OpenVLA-7B: Llama-2-7B (32 layers, hidden 4096, intermediate 11008, vocab 32000, untied head)",
            "OpenVLA-7B: DINOv2-L/14+reg4 (23 of 24 blocks run) and SigLIP-So400m/14 (26 of 27) at 224, "
            "256 patches each; fused MLP projector 2176->8704->4096->4096",
            f"OpenVLA-7B: prompt = BOS + 256 patch tokens + 25 text tokens = {prompt}",
            "OpenVLA-7B: 7 action tokens per action (1 from the prefill + 6 decode steps), one action per inference",
        ),
    )


def qwen3_vl_2b_reference() -> VlaSpec:
    """Qwen3-VL-2B as NVIDIA measured it (TensorRT Edge-LLM on AGX Orin): 265 image tokens, 292-token prefill.

    Dims are those of the public Qwen3-VL-2B config (Qwen3-1.7B text: 28 layers, hidden 2048, 16 heads / 8 KV
    heads of 128, intermediate 6144, vocab 151936, tied; ViT: 24 blocks, hidden 1024, intermediate 4096,
    patch 16, full attention, 3 DeepStack mergers). Used only to calibrate efficiency factors.
    """
    patches = 265 * 4  # 265 merged tokens after the 2x2 merge
    vit = VitDims(
        name="qwen3-vl-vit",
        layers_run=24,
        hidden=1024,
        intermediate=4096,
        heads=16,
        patch_dim=3 * 2 * 16 * 16,
        tokens=patches,
        gated_mlp=False,
        norm_params=4 * 1024,
        patch_bias=True,
    )
    mergers = tuple(
        d
        for k in range(4)  # the final merger + 3 DeepStack mergers
        for d in (Dense(f"merger{k}.fc1", 4096, 4096, 265), Dense(f"merger{k}.fc2", 4096, 2048, 265))
    )
    lm = LmDims(28, 2048, 6144, 16, 8, 128, 151936, tied=True, qkv_bias=False, head_rows=151936)
    return VlaSpec(
        name="Qwen3-VL-2B",
        vision=(vit,),
        vision_linears=mergers,
        lm=lm,
        prompt_tokens=292,
        generated_tokens=2,
        actions_per_inference=1,
        assumptions=("Qwen3-VL-2B dims from its public config; 265 image tokens = 1060 patches",),
    )
