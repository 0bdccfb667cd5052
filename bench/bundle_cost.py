"""Roofline costs of a bundle's own graphs, at the lengths the runtime really runs them.

Data flow: bundle dir (manifest: graph files, decoder dims) + measured prompt length, cached prefix length and
tokens per chunk -> ``onnx_cost.graph_cost`` on vision.onnx (fixed 224 grid or the dims given) and on decoder.onnx
twice: prefill (``seq`` = prompt after the cached prefix, ``past`` = prefix) and one decode step (``seq`` = 1,
``past`` = the mean KV length over the chunk) -> {"vision", "prefill", "decode_step"} StageCosts ->
``roofline.predict_stage_ms`` per device profile.
"""

from __future__ import annotations

from nora_edge import bundle as B
from nora_edge.bench.onnx_cost import graph_cost
from nora_edge.bench.roofline import StageCost, predict_stage_ms
from nora_edge.errors import InputError
from nora_edge.profiles import DeviceProfile

BUNDLE_STAGES = ("vision", "prefill", "decode_step")


def decoder_dims(spec: B.ComponentSpec, seq: int, past: int) -> dict[str, int]:
    """Values of the decoder's named dims (``batch``, ``seq``, ``past``, ``total``; ``slots``: a fused graph's KV
    buffers, costed at the ``total`` rows GroupQueryAttention reads and writes) for one call."""
    values = {"batch": 1, "seq": seq, "past": past, "total": past + seq, "slots": past + seq}
    named = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    unknown = named - set(values)
    if unknown:
        raise InputError(
            f"decoder input dims {sorted(unknown)} are not known to the bench (expected {sorted(values)})"
        )
    return {k: v for k, v in values.items() if k in named}


def vision_dims(spec: B.ComponentSpec, patches: int) -> dict[str, int]:
    """Values of the vision graph's named dims (a resolution-dynamic graph has one, the patch count)."""
    named = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    return dict.fromkeys(named, patches)


def bundle_stage_costs(
    bundle: B.Bundle, prompt_tokens: int, prefix_tokens: int, new_tokens: int, patches: int = 256
) -> dict[str, StageCost]:
    """Costs of one vision run, one prefill and one (mean) decode step of ``bundle``.

    Args:
        prompt_tokens: whole prompt length (prefix included).
        prefix_tokens: constant prefix the runtime prefilled at load (not part of the per-chunk prefill).
        new_tokens: tokens generated per chunk (decode steps = new_tokens - 1).
        patches: vision patches (256 at 224x224) for a resolution-dynamic vision graph.
    """
    if not 0 <= prefix_tokens < prompt_tokens:
        raise InputError(f"prefix_tokens {prefix_tokens} must be in [0, prompt_tokens={prompt_tokens})")
    vis, dec = bundle.components["vision"], bundle.components["decoder"]
    steps = max(new_tokens - 1, 0)
    mean_past = prompt_tokens + steps // 2
    return {
        "vision": graph_cost(bundle.file(vis.file), vision_dims(vis, patches), "vision"),
        "prefill": graph_cost(
            bundle.file(dec.file), decoder_dims(dec, prompt_tokens - prefix_tokens, prefix_tokens), "prefill"
        ),
        "decode_step": graph_cost(bundle.file(dec.file), decoder_dims(dec, 1, mean_past), "decode_step"),
    }


def predict_bundle(costs: dict[str, StageCost], profiles: list[DeviceProfile]) -> dict[str, dict]:
    """{profile: {stage: {"ms", "compute_bound_share"}}} for the bundle's graphs run as they are."""
    return {p.name: {s: predict_stage_ms(c, p) for s, c in costs.items()} for p in profiles}
