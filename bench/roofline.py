"""Roofline predictor: FLOPs and bytes per stage, and latency on every device profile.

Data flow: a :class:`~nora_edge.bench.models.VlaSpec` + a :class:`PrecisionPlan` --:func:`analytic_stage_costs`-->
per-stage :class:`StageCost` (vision, prefill, decode_token, action_head), each a list of :class:`OpCost`
(an ONNX graph gives the same structure via ``nora_edge.bench.onnx_cost``) --:func:`predict_stage_ms` on a
:class:`~nora_edge.profiles.DeviceProfile`--> milliseconds per stage --:func:`predict_inference`--> end-to-end
latency, inferences/s and actions/s.

Model: each op takes ``max(flops / (peak[precision] * eff_compute), bytes / (bandwidth * eff_memory))``, with the
profile's GEMV rate as the peak for one-row weight products where it has one (``host``: int8 and int4); a stage is
the sum of its ops (kernels run one after another at batch 1), plus ``launches x launch_us`` when the caller counts
kernel launches (``nora_edge.bench.launches``: nodes after fusion, or one CUDA graph launch). Bytes are the weights
read once per forward plus activations and KV cache read and written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nora_edge.bench.models import LmDims, VitDims, VlaSpec
from nora_edge.errors import InputError
from nora_edge.profiles import PRECISIONS, DeviceProfile

STAGES = ("vision", "prefill", "decode_token", "action_head")
INT4_BLOCK = 128


@dataclass(frozen=True)
class PrecisionPlan:
    """Precision of each component, and how wide activations and quantization scales are.

    Attributes:
        vision, lm, head: weight precision of the vision tower (+merger), decoder layers, output head.
        embed: storage precision of the embedding table (only looked up, never streamed whole).
        act_bytes: bytes per activation / KV element.
        scale_bytes: bytes per int4 block scale (fp16 on GPU, fp32 in ORT's CPU MatMulNBits).
        fused: the runtime fuses attention (scores stay on chip) and most elementwise ops into GEMM epilogues,
            as TensorRT / MLC do on Orin; False for ORT CPU running the exported graph op by op.
    """

    name: str
    vision: str
    lm: str
    head: str
    embed: str
    act_bytes: int = 2
    scale_bytes: int = 2
    fused: bool = True

    def __post_init__(self) -> None:
        for key in ("vision", "lm", "head", "embed"):
            if getattr(self, key) not in PRECISIONS:
                raise InputError(
                    f"PrecisionPlan.{key} = {getattr(self, key)!r}; expected one of {PRECISIONS}"
                )

    def bytes_per_param(self, precision: str) -> float:
        """Stored bytes per weight (int4: 4-bit weights + one scale per block of 128)."""
        return {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5 + self.scale_bytes / INT4_BLOCK}[precision]

    @classmethod
    def preset(cls, name: str, *, host: bool = False) -> PrecisionPlan:
        """Named plans. Device: fp32, fp16, int8 (W8A8 LM, fp16 vision), int4 (weight-only LM and head, fp16
        vision and embedding). Host (ORT CPU): activations fp32, vision fp32, fp32 int4 scales."""
        if name not in PRECISIONS:
            raise InputError(f"unknown precision plan {name!r}; expected one of {PRECISIONS}")
        float_part = "fp32" if host or name == "fp32" else "fp16"
        lm = name if name in ("int8", "int4") else float_part
        return cls(
            name=name,
            vision=float_part,
            lm=lm,
            head=lm,
            embed=float_part,
            act_bytes=4 if float_part == "fp32" else 2,
            scale_bytes=4 if host else 2,
            fused=not host,
        )


@dataclass(frozen=True)
class OpCost:
    """One kernel's work. ``precision`` picks the peak rate; bytes are read + written.

    ``kind`` is "matmul" (weight or activation products, attention included) or "elementwise". ``rows`` is the
    number of activation rows of a weight product (1: a GEMV, which may run at the profile's GEMV rate; 0:
    not a weight product or unknown).
    """

    name: str
    flops: float
    weight_bytes: float
    act_bytes: float
    precision: str
    kind: str = "matmul"
    rows: int = 0

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes


@dataclass(frozen=True)
class StageCost:
    """A stage's ops (executed once per stage invocation)."""

    stage: str
    ops: tuple[OpCost, ...] = field(default_factory=tuple)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def matmul_flops(self) -> float:
        """FLOPs of the matrix products only (what torch's FlopCounterMode counts)."""
        return sum(o.flops for o in self.ops if o.kind == "matmul")

    @property
    def weight_bytes(self) -> float:
        return sum(o.weight_bytes for o in self.ops)

    @property
    def act_bytes(self) -> float:
        return sum(o.act_bytes for o in self.ops)

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes

    def summary(self) -> dict:
        return {
            "gflop": self.flops / 1e9,
            "weight_mb": self.weight_bytes / 1e6,
            "act_mb": self.act_bytes / 1e6,
            "intensity_flop_per_byte": self.flops / self.bytes if self.bytes else 0.0,
        }


def linear_op(
    name: str, tokens: int, n_in: int, n_out: int, bias: bool, prec: str, plan: PrecisionPlan
) -> OpCost:
    """y (tokens, n_out) = x (tokens, n_in) @ W (n_in, n_out) [+ b]."""
    params = n_in * n_out
    return OpCost(
        name=name,
        flops=2.0 * tokens * n_in * n_out,
        weight_bytes=params * plan.bytes_per_param(prec) + (n_out * plan.act_bytes if bias else 0),
        act_bytes=float(tokens * (n_in + n_out) * plan.act_bytes),
        precision=prec,
        rows=tokens,
    )


def attention_ops(
    name: str,
    q_tokens: int,
    kv_tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    plan: PrecisionPlan,
    prec: str,
    windows: int = 1,
) -> list[OpCost]:
    """Scores = Q K^T and out = P V over ``windows`` independent windows (dense: no causal skipping).

    Fused (flash-style) attention reads Q, K, V and writes the output once; unfused attention also writes and
    reads the (heads, q, kv) scores around the softmax.
    """
    e = plan.act_bytes
    scores = windows * heads * q_tokens * kv_tokens
    kv = windows * kv_tokens * kv_heads * head_dim
    q = windows * q_tokens * heads * head_dim
    if plan.fused:
        return [
            OpCost(
                f"{name}.fused",
                4.0 * scores * head_dim + 5.0 * scores,
                0.0,
                float((2 * q + 2 * kv) * e),
                prec,
            )
        ]
    return [
        OpCost(f"{name}.qk", 2.0 * scores * head_dim, 0.0, float((q + kv + scores) * e), prec),
        OpCost(f"{name}.softmax", 5.0 * scores, 0.0, float(2 * scores * e), prec, "elementwise"),
        OpCost(f"{name}.pv", 2.0 * scores * head_dim, 0.0, float((scores + kv + q) * e), prec),
    ]


def elementwise_passes(hidden: int, intermediate: int, plan: PrecisionPlan) -> int:
    """Activation elements moved per token by a block's norms, residual adds and MLP activation [est].

    Unfused: 2 norms (read + write), 2 residual adds (2 reads + write), activation (2 reads + write of the
    intermediate) = 10 h + 3 i. Fused: norms and residuals ride in GEMM epilogues, ~4 h + i remain.
    """
    return 4 * hidden + intermediate if plan.fused else 10 * hidden + 3 * intermediate


def vit_ops(v: VitDims, plan: PrecisionPlan) -> list[OpCost]:
    """Ops of one tower: patch embedding + every executed block."""
    p, n, h, i = plan.vision, v.tokens, v.hidden, v.intermediate
    ops = [linear_op(f"{v.name}.patch_embed", n, v.patch_dim, h, v.patch_bias, p, plan)]
    windows = v.window or (None,) * v.layers_run
    for layer in range(v.layers_run):
        w = windows[layer] or n
        tag = f"{v.name}.{layer}"
        ops.append(linear_op(f"{tag}.qkv", n, h, 3 * h, True, p, plan))
        ops += attention_ops(f"{tag}.attn", w, w, v.heads, v.heads, h // v.heads, plan, p, windows=n // w)
        ops.append(linear_op(f"{tag}.proj", n, h, h, True, p, plan))
        if v.gated_mlp:
            ops.append(linear_op(f"{tag}.gate_up", n, h, 2 * i, True, p, plan))
        else:
            ops.append(linear_op(f"{tag}.fc1", n, h, i, True, p, plan))
        ops.append(linear_op(f"{tag}.down", n, i, h, True, p, plan))
        # norms x2, residual adds x2, activation: ~10 passes over (n, h) plus 3 over (n, i) unfused  [est]
        passes = elementwise_passes(h, i, plan)
        ops.append(
            OpCost(
                f"{tag}.elementwise", 10.0 * n * h, 0.0, float(passes * n * plan.act_bytes), p, "elementwise"
            )
        )
    return ops


def lm_layer_ops(lm: LmDims, tokens: int, past: int, plan: PrecisionPlan, tag: str) -> list[OpCost]:
    """One decoder layer on ``tokens`` new tokens attending to ``past + tokens`` positions."""
    p, h, e = plan.lm, lm.hidden, plan.act_bytes
    attn_prec = "fp32" if e == 4 else "fp16"
    ops = [
        linear_op(f"{tag}.qkv", tokens, h, lm.q_dim + 2 * lm.kv_dim, lm.qkv_bias, p, plan),
        *attention_ops(
            f"{tag}.attn", tokens, past + tokens, lm.heads, lm.kv_heads, lm.head_dim, plan, attn_prec
        ),
        linear_op(f"{tag}.o", tokens, lm.q_dim, h, False, p, plan),
        linear_op(f"{tag}.gate_up", tokens, h, 2 * lm.intermediate, False, p, plan),
        linear_op(f"{tag}.down", tokens, lm.intermediate, h, False, p, plan),
        # KV append, rotary on q/k, norms x2, residual adds x2, SwiGLU  [est]
        OpCost(
            f"{tag}.elementwise",
            10.0 * tokens * h,
            0.0,
            float(tokens * (elementwise_passes(h, lm.intermediate, plan) + 4 * (lm.q_dim + lm.kv_dim)) * e),
            attn_prec,
            "elementwise",
        ),
    ]
    return ops


def head_ops(lm: LmDims, plan: PrecisionPlan) -> list[OpCost]:
    """Final norm + output head for one token (only the last position's logits are computed)."""
    e = plan.act_bytes
    return [
        OpCost(
            "final_norm",
            4.0 * lm.hidden,
            0.0,
            float(2 * lm.hidden * e),
            "fp32" if e == 4 else "fp16",
            "elementwise",
        ),
        linear_op("head", 1, lm.hidden, lm.head_rows, False, plan.head, plan),
    ]


def analytic_stage_costs(spec: VlaSpec, plan: PrecisionPlan) -> dict[str, StageCost]:
    """Per-stage costs of one inference of ``spec``.

    Returns:
        {"vision": once, "prefill": once (layers over the prompt), "decode_token": one decode step's layers at
        the mean KV length, "action_head": once per generated token}.
    """
    lm = spec.lm
    vision: list[OpCost] = []
    for tower in spec.vision:
        vision += vit_ops(tower, plan)
    vision += [
        linear_op(d.name, d.tokens, d.in_features, d.out_features, d.bias, plan.vision, plan)
        for d in spec.vision_linears
    ]
    cached = spec.cached_prefix_tokens
    prefill = [
        op
        for k in range(lm.layers)
        for op in lm_layer_ops(lm, spec.prefill_tokens, cached, plan, f"layer{k}")
    ]
    mean_past = spec.prompt_tokens + spec.decode_steps // 2
    decode = [op for k in range(lm.layers) for op in lm_layer_ops(lm, 1, mean_past, plan, f"layer{k}")]
    return {
        "vision": StageCost("vision", tuple(vision)),
        "prefill": StageCost("prefill", tuple(prefill)),
        "decode_token": StageCost("decode_token", tuple(decode)),
        "action_head": StageCost("action_head", tuple(head_ops(lm, plan))),
    }


def op_ms(op: OpCost, profile: DeviceProfile) -> tuple[float, str]:
    """(milliseconds, "compute" | "memory") of one op on ``profile``."""
    peak = profile.rate_flops_per_s(op.precision, op.rows) * profile.efficiency["compute"].value
    bw = profile.bandwidth_bytes_per_s * profile.efficiency["memory"].value
    t_c, t_m = op.flops / peak, op.bytes / bw
    return 1e3 * max(t_c, t_m), "compute" if t_c >= t_m else "memory"


def predict_stage_ms(
    cost: StageCost, profile: DeviceProfile, launches: int = 0, launch_us: float = 0.0
) -> dict:
    """Predicted milliseconds of one stage invocation, and the share of time in compute-bound ops.

    Args:
        launches: kernel (or graph) launches of one invocation (``nora_edge.bench.launches``); 0: not counted.
        launch_us: host cost of one launch in microseconds, added per launch (no overlap with the GPU assumed).

    Returns:
        {"ms": roofline + launches, "roofline_ms", "launch_ms", "launches", "compute_bound_share" (of the
        roofline part)}.
    """
    if launches < 0 or launch_us < 0:
        raise InputError(f"launches ({launches}) and launch_us ({launch_us}) must be >= 0")
    total = compute = 0.0
    for op in cost.ops:
        ms, bound = op_ms(op, profile)
        total += ms
        compute += ms if bound == "compute" else 0.0
    launch_ms = launches * launch_us / 1e3
    return {
        "ms": total + launch_ms,
        "roofline_ms": total,
        "launch_ms": launch_ms,
        "launches": launches,
        "compute_bound_share": compute / total if total else 0.0,
    }


def predict_inference(
    spec: VlaSpec,
    plan: PrecisionPlan,
    profile: DeviceProfile,
    costs: dict[str, StageCost] | None = None,
    launches: dict[str, int] | None = None,
    launch_us: float = 0.0,
) -> dict:
    """End-to-end prediction of one inference of ``spec`` on ``profile``.

    Args:
        launches: launches per invocation of each stage (absent stages: 0); None: roofline only.
        launch_us: host cost of one launch (``nora_edge.bench.launches.launch_costs``).

    Returns:
        {"stages": {stage: ms per invocation}, "stage_totals_ms": {stage: ms per inference}, "e2e_ms",
        "inferences_per_s", "actions_per_s", "decode_steps", "bound": {stage: compute-bound share},
        "launches": {stage: launches per invocation}, "launch_us"}.
    """
    costs = costs or analytic_stage_costs(spec, plan)
    per = {s: predict_stage_ms(c, profile, (launches or {}).get(s, 0), launch_us) for s, c in costs.items()}
    calls = {
        "vision": 1,
        "prefill": 1,
        "decode_token": spec.decode_steps,
        "action_head": spec.generated_tokens,
    }
    totals = {s: per[s]["ms"] * calls[s] for s in per}
    e2e = sum(totals.values())
    return {
        "model": spec.name,
        "plan": plan.name,
        "profile": profile.name,
        "stages": {s: per[s]["ms"] for s in per},
        "stage_totals_ms": totals,
        "bound": {s: per[s]["compute_bound_share"] for s in per},
        "launches": {s: per[s]["launches"] for s in per},
        "launch_us": launch_us,
        "e2e_ms": e2e,
        "inferences_per_s": 1e3 / e2e,
        "actions_per_s": 1e3 / e2e * spec.actions_per_inference,
        "decode_steps": spec.decode_steps,
    }


def weight_footprint_bytes(spec: VlaSpec, plan: PrecisionPlan) -> dict[str, float]:
    """Resident weight bytes per component under ``plan`` (embedding table stored whole)."""
    lm = spec.lm
    head = (
        0.0
        if lm.tied and lm.head_rows == lm.vocab
        else lm.head_rows * lm.hidden * plan.bytes_per_param(plan.head)
    )
    return {
        "vision": spec.vision_params() * plan.bytes_per_param(plan.vision),
        "lm_layers": lm.layers * lm.layer_params() * plan.bytes_per_param(plan.lm),
        "embedding": lm.vocab * lm.hidden * plan.bytes_per_param(plan.embed),
        "head": head,
    }


def kv_cache_bytes(spec: VlaSpec, plan: PrecisionPlan) -> float:
    """KV cache at the end of one inference (prompt + generated tokens)."""
    lm = spec.lm
    return 2.0 * lm.layers * lm.kv_dim * (spec.prompt_tokens + spec.generated_tokens) * plan.act_bytes


def memory_estimate_bytes(spec: VlaSpec, plan: PrecisionPlan) -> float:
    """Weights + KV cache (activations of batch-1 inference are small next to both)."""
    return sum(weight_footprint_bytes(spec, plan).values()) + kv_cache_bytes(spec, plan)
