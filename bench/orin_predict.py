"""NORA-Long int4 per-chunk latency and actions/s on the Jetson Orin profiles, anchored on published measurements.

Data flow: ``orin_anchors.hold_out()`` (per-phase efficiency fitted on TensorRT Edge-LLM's AGX Orin numbers with one
anchor held out) + ``models.nora_3b(5)`` under the int4 plan + tokens per chunk N (a bench run's measured median
and p90, else the FAST+ Table I estimate) + acceptance ``a`` (mean tokens accepted per decoder call; 1 = plain)
and ``block`` (tokens fed per verify call) --:func:`predict_chunk` on each Orin profile (its own peaks and
bandwidth, each with its source in ``profiles/*.toml``)--> ``vision + prefill + head(first token) + (N - 1) / a x
call`` ms per chunk, actions/s = 1000 x horizon / chunk ms --:func:`orin_section`--> the ``orin_anchored`` part
of every bench report (:func:`orin_markdown` renders it).

A verify call runs ``block`` tokens through every decoder layer and the head at the decode efficiency (batch-1
weight streaming: ``block`` rows cost little more than one); the plain path is ``block = 1, a = 1``, one
decoder step + head per token, exactly ``roofline.predict_inference``'s accounting.
"""

from __future__ import annotations

import math
from functools import cache

from nora_edge.bench import orin_anchors as A
from nora_edge.bench.models import NORA_LONG_TOKENS, VlaSpec, nora_3b
from nora_edge.bench.roofline import (
    OpCost,
    PrecisionPlan,
    StageCost,
    analytic_stage_costs,
    linear_op,
    lm_layer_ops,
)
from nora_edge.errors import InputError
from nora_edge.profiles import load_profile

ORIN_PROFILES = ("orin-agx-64gb", "orin-agx-32gb", "orin-nx-16gb", "orin-nano-8gb")
DEFAULT_ACCEPTANCES = (1.5, 2.0, 2.5)
# tokens per verify call: the pending token + up to 8 drafts (nora_edge.multitoken's DEFAULT_MAX_DRAFT; a call
# with fewer drafts is cheaper, so pricing every call at the full block errs on the slow side)
DEFAULT_BLOCK = 9
HORIZON = 5
PLAN = "int4"
TARGET_ACTIONS_PER_S = 25.0


def check_acceptance(acceptance: float, block: int) -> None:
    """A verify call of ``block`` tokens accepts between 1 and ``block`` of them.

    Raises:
        InputError: ``block`` not an int >= 1, or ``acceptance`` not a finite number in [1, block].
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise InputError(f"block (tokens per decoder call) must be an int >= 1, got {block!r}")
    if (
        isinstance(acceptance, bool)
        or not isinstance(acceptance, int | float)
        or not math.isfinite(acceptance)
    ):
        raise InputError(f"acceptance must be a finite number, got {acceptance!r}")
    if acceptance < 1:
        raise InputError(
            f"acceptance = {acceptance!r} tokens per decoder call is below 1 (every call accepts at least its "
            "own token; 1.0 = plain decoding)"
        )
    if acceptance > block:
        raise InputError(f"acceptance = {acceptance!r} exceeds block = {block} tokens per decoder call")


def check_profile(name: str) -> None:
    """Only the Orin profiles are anchored (the host's peaks are measured, not fitted)."""
    if name not in ORIN_PROFILES:
        raise InputError(f"profile {name!r} has no anchored prediction; expected one of {ORIN_PROFILES}")


def nora_long_spec(tokens_per_chunk: float) -> VlaSpec:
    """NORA-Long-3B with ``round(tokens_per_chunk)`` generated tokens (sets the mean KV length)."""
    if isinstance(tokens_per_chunk, bool) or not isinstance(tokens_per_chunk, int | float):
        raise InputError(f"tokens_per_chunk must be a number, got {tokens_per_chunk!r}")
    if not (math.isfinite(tokens_per_chunk) and tokens_per_chunk >= 1):
        raise InputError(f"tokens_per_chunk must be >= 1 (the chunk's tokens), got {tokens_per_chunk!r}")
    return nora_3b(HORIZON).with_lengths(generated_tokens=max(1, round(tokens_per_chunk)))


def verify_call_cost(spec: VlaSpec, plan: PrecisionPlan, block: int) -> StageCost:
    """One decoder call on ``block`` new tokens at the mean KV length, final norm and head on every position.

    For ``block = 1`` the ops are ``analytic_stage_costs``'s decode_token + action_head.
    """
    lm, e = spec.lm, plan.act_bytes
    past = spec.prompt_tokens + spec.decode_steps // 2
    ops = [op for k in range(lm.layers) for op in lm_layer_ops(lm, block, past, plan, f"layer{k}")]
    norm_prec = "fp32" if e == 4 else "fp16"
    ops += [
        OpCost(
            "final_norm",
            4.0 * lm.hidden * block,
            0.0,
            float(2 * lm.hidden * block * e),
            norm_prec,
            "elementwise",
        ),
        linear_op("head", block, lm.hidden, lm.head_rows, False, plan.head, plan),
    ]
    return StageCost("verify_call", tuple(ops))


@cache
def anchored_fit(held_out: str = A.DEFAULT_HOLDOUT) -> dict:
    """:func:`orin_anchors.hold_out` (cached: the fit does not change within a process)."""
    return A.hold_out(held_out)


def predict_chunk(
    profile_name: str,
    tokens_per_chunk: float = NORA_LONG_TOKENS,
    acceptance: float = 1.0,
    block: int = 1,
    efficiency: dict[str, float] | None = None,
) -> dict:
    """Predicted NORA-Long int4 chunk on one Orin profile.

    Args:
        tokens_per_chunk: N generated tokens (action tokens + the closing one); the prefill's logits give the
            first, the other N - 1 come from decoder calls.
        acceptance: mean tokens accepted per decoder call (1.0 = plain; an input until measured).
        block: tokens per decoder call (1 = plain decoding).
        efficiency: phase -> factor; None = the anchored fit (:func:`anchored_fit`).

    Returns:
        {"profile", "tokens_per_chunk", "acceptance", "block", "calls", "vision_ms", "prefill_ms",
        "first_head_ms", "call_ms", "decode_ms", "chunk_ms", "actions_per_s"}.

    Raises:
        InputError: a profile that is not an anchored Orin, or a bad acceptance / block / token count.
    """
    check_profile(profile_name)
    check_acceptance(acceptance, block)
    spec = nora_long_spec(tokens_per_chunk)
    eff = efficiency or anchored_fit()["fit"].efficiency
    plan = PrecisionPlan.preset(PLAN)
    costs = analytic_stage_costs(spec, plan)
    base = load_profile(profile_name)

    def at(phase: str):
        return A.with_phase_efficiency(base, eff[phase], f"orin_anchors {phase} factor")

    calls = (tokens_per_chunk - 1) / acceptance
    vision = A.stages_ms((costs["vision"],), at("vision"))
    prefill = A.stages_ms((costs["prefill"],), at("prefill"))
    first_head = A.stages_ms((costs["action_head"],), at("decode"))
    call = A.stages_ms((verify_call_cost(spec, plan, block),), at("decode"))
    chunk = vision + prefill + first_head + calls * call
    return {
        "profile": profile_name,
        "tokens_per_chunk": float(tokens_per_chunk),
        "acceptance": float(acceptance),
        "block": block,
        "calls": calls,
        "vision_ms": vision,
        "prefill_ms": prefill,
        "first_head_ms": first_head,
        "call_ms": call,
        "decode_ms": calls * call,
        "chunk_ms": chunk,
        "actions_per_s": 1e3 * spec.actions_per_inference / chunk,
    }


def acceptance_for(target_actions_per_s: float, row: dict) -> float | None:
    """Acceptance at which a multi-token ``row``'s profile, tokens and block reach ``target_actions_per_s``:
    ``(N - 1) x call / (1000 x horizon / target - vision - prefill - first head)``; None when no acceptance up to
    the block does."""
    budget = (
        1e3 * HORIZON / target_actions_per_s - row["vision_ms"] - row["prefill_ms"] - row["first_head_ms"]
    )
    need = (row["tokens_per_chunk"] - 1) * row["call_ms"] / budget if budget > 0 else math.inf
    return max(need, 1.0) if need <= row["block"] else None


def measured_tokens(
    tokens_per_chunk: dict | None, horizon: int | None, measured_on: str | None = None
) -> dict:
    """Token statistics to predict with: a NORA-Long (horizon 5) run's measured median and p90, else the FAST+
    estimate for both. ``measured_on`` names the benched bundle (its counts are NORA-Long's only when it holds
    the real weights)."""
    if tokens_per_chunk and horizon == HORIZON:
        on = f" on {measured_on}" if measured_on else ""
        return {
            "median": float(tokens_per_chunk["median"]),
            "p90": float(tokens_per_chunk["p90"]),
            "n": int(tokens_per_chunk["n"]),
            "source": f"measured: this bench run's generated tokens per chunk{on} (runtime, constrained decoding; "
            "NORA-Long's own counts only when the bundle holds its real weights)",
        }
    why = "no decoded chunk" if not tokens_per_chunk else f"the benched bundle has horizon {horizon}, not 5"
    return {
        "median": float(NORA_LONG_TOKENS),
        "p90": float(NORA_LONG_TOKENS),
        "n": 0,
        "source": f"[est] FAST+ paper Table I (Bridge, 5 steps x 7 dims ~20 tokens) + <|im_end|> ({why})",
    }


def assumptions(block: int, held: dict) -> list[str]:
    """Every assumption behind the anchored numbers, for the report."""
    fit = held["fit"]
    return [
        f"Per-phase efficiency (compute and bandwidth scaled together) fitted on {A.EDGE_LLM_SOURCE}; "
        "least squares in log space per phase",
        f"Held out of the fit: {held['held_out']} (predicted {held['predicted_ms']:.2f} ms vs measured "
        f"{held['measured_ms']:.2f} ms, error {100 * held['error']:+.1f}%)"
        + (f"; its factor borrowed from {held['borrowed']}" if held["borrowed"] else ""),
        "Anchor plan: Qwen3-VL ViT fp16, LLM int4 AWQ (group 128, fp16 scales), LM head fp16 (not passed through "
        "--lm_head_quantization) [assumed]; decode rate at a mean KV length of prompt + "
        f"{A.ANCHOR_OUTPUT_TOKENS // 2} [assumed output length {A.ANCHOR_OUTPUT_TOKENS}]",
        *[f"{m}: {c['source']}" for m, c in A.QWEN3_VL_CONFIGS.items()],
        f"Factors: vision {fit.efficiency['vision']:.3f}, prefill {fit.efficiency['prefill']:.3f}, decode "
        f"{fit.efficiency['decode']:.3f} (fraction of the profile's dense tensor peak and bandwidth)",
        "Transfer to NORA-Long: the Qwen2.5-VL ViT (window attention, SwiGLU, 256 patches at 224x224) runs at the "
        "Qwen3-VL ViT's factor and the ~80-token prefill at the 292-token prefill's; shorter GEMMs usually reach "
        "less of the peak, so both are optimistic",
        "NORA-Long int4: decoder layers and the 2048-row action head int4 (group 128), vision and embedding fp16; "
        "the fp32 vision block 31 MLP and merger NVIDIA keeps for Qwen2.5-VL are counted as fp16",
        "Other Orins: the AGX Orin 64GB factors on each profile's own dense tensor peak and bandwidth "
        "(profiles/*.toml, every number with its source)",
        "Multi-token: acceptance (tokens emitted per decoder call = (N - 1) / calls; for nora_edge.multitoken 1 + "
        "drafts accepted per verify call, or its bench's plain / multi-token calls per chunk) is an INPUT, not a "
        f"measurement, until the multi-token path is measured on the policy; every call is priced as {block} tokens "
        "through all layers and the head at the decode factor; drafts come from a lookup table (no draft model "
        "cost); calls per chunk = (N - 1) / acceptance",
        "Left out: preprocessing, detokenization, host work between calls (the factors absorb what Edge-LLM's "
        "runtime overheads were in the anchors)",
    ]


def orin_section(
    tokens_per_chunk: dict | None = None,
    horizon: int | None = HORIZON,
    acceptances: tuple[float, ...] = DEFAULT_ACCEPTANCES,
    block: int = DEFAULT_BLOCK,
    measured_on: str | None = None,
    measured_acceptance: dict | None = None,
) -> dict:
    """The ``orin_anchored`` report section.

    Args:
        tokens_per_chunk: a bench run's ``runtime["tokens_per_chunk"]`` (``stats.summarize``), or None.
        horizon: the benched bundle's horizon (its tokens count for NORA-Long only when it is 5).
        acceptances: multi-token acceptances to tabulate beside plain decoding.
        block: tokens per verify call.
        measured_on: what the tokens were measured on (the bundle), for the report.
        measured_acceptance: a ``multitoken_acceptance.load_record`` record (acceptance, block, source,
            tokens_histogram), e.g. the committed MetaWorld measurement: tabulated as "multi-token [measured
            acceptance]" at its own block.

    Returns:
        {"tokens_per_chunk", "block", "acceptances", "rows": [{profile, stat, mode, acceptance, block, ...}],
        "headline", "anchors", "fit", "held_out", "leave_one_out", "assumptions"}.
    """
    for a in acceptances:
        check_acceptance(a, block)
    extra = []
    if measured_acceptance is not None:
        acc, blk, where = (measured_acceptance.get(k) for k in ("acceptance", "block", "source"))
        check_acceptance(acc, blk)
        if not isinstance(where, str) or not where.strip():
            raise InputError(f"measured_acceptance needs a source string, got {where!r}")
        extra = [("multi-token [measured acceptance]", acc, blk)]
    held = anchored_fit()
    tokens = measured_tokens(tokens_per_chunk, horizon, measured_on)
    rows = []
    for prof in ORIN_PROFILES:
        for stat in ("median", "p90"):
            modes = (
                [("plain", 1.0, 1)]
                + [("multi-token [assumed acceptance]", a, block) for a in acceptances]
                + extra
            )
            for mode, acc, blk in modes:
                rows.append({"stat": stat, "mode": mode, **predict_chunk(prof, tokens[stat], acc, blk)})
    head = [r for r in rows if r["profile"] == A.ANCHOR_PROFILE and r["stat"] == "median"]
    return {
        "tokens_per_chunk": tokens,
        "block": block,
        "acceptances": list(acceptances),
        "rows": rows,
        "headline": {
            "profile": A.ANCHOR_PROFILE,
            "actions_per_s": {_label(r): r["actions_per_s"] for r in head},
            "target_actions_per_s": TARGET_ACTIONS_PER_S,
            "acceptance_for_target": acceptance_for(TARGET_ACTIONS_PER_S, head[-1])
            if len(head) > 1
            else None,
            "held_out": held["held_out"],
            "held_out_error": held["error"],
        },
        "anchors": A.anchors_json(),
        "fit": A.fit_json(held["fit"]),
        "held_out": {k: held[k] for k in ("held_out", "predicted_ms", "measured_ms", "error", "borrowed")},
        "leave_one_out": [
            {k: r[k] for k in ("held_out", "predicted_ms", "measured_ms", "error", "borrowed")}
            for r in A.leave_one_out()
        ],
        "assumptions": assumptions(block, held)
        + (
            [
                f"Measured acceptance {extra[0][1]:.3f} at block {extra[0][2]}: {measured_acceptance['source']}. "
                "Transferred to NORA-Long as measured: its chunks hold more tokens than this policy's, so the "
                "acceptance on the real model is an assumption until measured there"
            ]
            if extra
            else []
        ),
        "measured_acceptance": None
        if measured_acceptance is None
        else {
            k: measured_acceptance.get(k)
            for k in ("acceptance", "block", "source", "tokens_histogram", "accepted_per_verify_histogram")
        },
    }


def _label(row: dict) -> str:
    if row["block"] == 1:
        return "plain"
    return f"{row['acceptance']:g}" + (" (measured)" if "measured" in row["mode"] else "")


def _need(acceptance: float | None) -> str:
    if acceptance is None:
        return "none up to the block"
    return "1 (plain decoding meets it)" if acceptance <= 1.0 else f"{acceptance:.2f}"


def orin_markdown(sec: dict) -> list[str]:
    """The report.md lines of an :func:`orin_section`."""
    from nora_edge.bench.report import table

    tok, h = sec["tokens_per_chunk"], sec["headline"]
    speeds = ", ".join(f"{k} {v:.1f}" for k, v in h["actions_per_s"].items())
    out = [
        "## Orin prediction anchored on published measurements (NORA-Long int4)",
        "",
        f"{h['profile']}, actions/s by acceptance (tokens accepted per decoder call; plain = 1): {speeds} "
        f"(goal >= {h['target_actions_per_s']:g}; reached from acceptance "
        f"{_need(h['acceptance_for_target'])} at block {sec['block']}). Held-out anchor {h['held_out']}: prediction error "
        f"{100 * h['held_out_error']:+.1f}%. Rows marked [assumed acceptance] are assumptions; "
        "[measured acceptance] is the recorded measurement below.",
        "",
        f"Tokens per chunk: median {tok['median']:g}, p90 {tok['p90']:g} ({tok['source']}).",
        "",
    ]
    m = sec.get("measured_acceptance")
    if m:
        hist = ", ".join(f"{k}: {v}" for k, v in (m.get("tokens_histogram") or {}).items())
        acc = ", ".join(f"{k}: {v}" for k, v in (m.get("accepted_per_verify_histogram") or {}).items())
        out += [
            f"Measured multi-token acceptance {m['acceptance']:.3f} tokens per decoder call: {m['source']}.",
            f"Tokens per chunk there (count of chunks): {hist}. Drafts accepted per verify call: {acc}.",
            "",
        ]
    rows = [
        [r["profile"], r["stat"], r["mode"], r["acceptance"], r["block"], r["vision_ms"], r["prefill_ms"],
         r["call_ms"], r["calls"], r["chunk_ms"], r["actions_per_s"]]
        for r in sec["rows"]
    ]  # fmt: skip
    header = ["profile", "tokens", "mode", "acceptance", "block", "vision", "prefill", "ms/call", "calls"]
    out += [
        table([*header, "chunk ms", "actions/s"], rows),
        "",
        "Anchors (leave-one-out: fitted without the row):",
        "",
    ]
    loo = {r["held_out"]: r for r in sec["leave_one_out"]}
    arows = [
        [a["key"], a["measured_ms"], loo[a["key"]]["predicted_ms"], f"{100 * loo[a['key']]['error']:+.1f}%",
         loo[a["key"]]["borrowed"] or "own phase", a["note"]]
        for a in sec["anchors"]
    ]  # fmt: skip
    out += [table(["anchor", "measured ms", "predicted ms", "error", "factor from", "figure"], arows), ""]
    return out + ["Assumptions:", ""] + [f"- {a}" for a in sec["assumptions"]]
