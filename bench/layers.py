"""One real-size layer of each kind as an ORT graph, for "extrapolated from one layer" host timings.

Data flow: dims from ``nora_edge.bench.models`` -> a :class:`~nora_edge.bench.ortgraph.GraphBuilder` graph
(random weights; only the shapes matter) -> ``(session, feeds)`` that ``nora_edge.bench.baseline7b`` times.

The graphs follow what the exported bundles run op by op on ORT CPU: layer norms, separate q/k/v linears, KV
concat, GQA heads expanded to the query heads, unfused MatMul-Softmax-MatMul attention, SwiGLU or GELU MLPs.
"""

from __future__ import annotations

import numpy as np

from nora_edge.bench.models import Dense, LmDims, VitDims
from nora_edge.bench.ortgraph import GraphBuilder


def norm(g: GraphBuilder, x: str, width: int) -> str:
    """LayerNormalization over the last axis (an RMSNorm moves the same bytes)."""
    scale = g.weight("ln", np.ones(width, g.float_type))
    return g.op("LayerNormalization", [x, scale], axis=-1)[0]


def silu_gate(g: GraphBuilder, gate: str, up: str) -> str:
    (sig,) = g.op("Sigmoid", [gate])
    (act,) = g.op("Mul", [gate, sig])
    return g.op("Mul", [act, up])[0]


def attention(g: GraphBuilder, q: str, k: str, v: str, head_dim: int) -> str:
    """softmax(q k^T / sqrt(d)) v on (..., heads, len, head_dim) tensors."""
    (kt,) = g.op("Transpose", [k], perm=[0, 1, 3, 2])
    (scores,) = g.op("MatMul", [q, kt])
    (scaled,) = g.op("Mul", [scores, g.weight("scale", np.asarray(head_dim**-0.5, g.float_type))])
    (probs,) = g.op("Softmax", [scaled], axis=-1)
    return g.op("MatMul", [probs, v])[0]


def decoder_layer(lm: LmDims, tokens: int, past: int, precision: str, seed: int = 0) -> tuple:
    """A Llama/Qwen2 decoder layer on ``tokens`` new tokens with a ``past``-long KV cache.

    Returns:
        (GraphBuilder, feeds) with inputs x (1, tokens, H), past_k / past_v (1, kv_heads, past, head_dim).
    """
    g = GraphBuilder(np.float32, seed)
    h, nh, nkv, hd = lm.hidden, lm.heads, lm.kv_heads, lm.head_dim
    x = g.add_input("x", [1, tokens, h])
    pk = g.add_input("past_k", [1, nkv, past, hd])
    pv = g.add_input("past_v", [1, nkv, past, hd])
    hn = norm(g, x, h)

    def heads(t: str, n: int, length: int) -> str:
        (r,) = g.op("Reshape", [t, g.const([1, length, n, hd])])  # (1, S, n, hd)
        return g.op("Transpose", [r], perm=[0, 2, 1, 3])[0]  # (1, n, S, hd)

    q = heads(g.linear(hn, h, lm.q_dim, precision, bias=lm.qkv_bias), nh, tokens)
    k = heads(g.linear(hn, h, lm.kv_dim, precision, bias=lm.qkv_bias), nkv, tokens)
    v = heads(g.linear(hn, h, lm.kv_dim, precision, bias=lm.qkv_bias), nkv, tokens)
    (k_all,) = g.op("Concat", [pk, k], axis=2)  # (1, nkv, P+S, hd)
    (v_all,) = g.op("Concat", [pv, v], axis=2)
    g.add_output(k_all)
    g.add_output(v_all)
    if nkv != nh:  # repeat_kv: (1, nkv, L, hd) -> (1, nh, L, hd)
        length = past + tokens
        shape5 = g.const([1, nkv, nh // nkv, length, hd])
        k_all = g.op(
            "Reshape",
            [
                g.op("Expand", [g.op("Unsqueeze", [k_all, g.const([2])])[0], shape5])[0],
                g.const([1, nh, length, hd]),
            ],
        )[0]
        v_all = g.op(
            "Reshape",
            [
                g.op("Expand", [g.op("Unsqueeze", [v_all, g.const([2])])[0], shape5])[0],
                g.const([1, nh, length, hd]),
            ],
        )[0]
    o = attention(g, q, k_all, v_all, hd)  # (1, nh, S, hd)
    (o,) = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3])[0], g.const([1, tokens, lm.q_dim])])
    (x2,) = g.op("Add", [x, g.linear(o, lm.q_dim, h, precision)])
    hn2 = norm(g, x2, h)
    act = silu_gate(
        g, g.linear(hn2, h, lm.intermediate, precision), g.linear(hn2, h, lm.intermediate, precision)
    )
    (y,) = g.op("Add", [x2, g.linear(act, lm.intermediate, h, precision)])
    g.add_output(y)
    rng = np.random.default_rng(seed)
    feeds = {
        "x": rng.standard_normal((1, tokens, h), dtype=np.float32),
        "past_k": rng.standard_normal((1, nkv, past, hd), dtype=np.float32),
        "past_v": rng.standard_normal((1, nkv, past, hd), dtype=np.float32),
    }
    return g, feeds


def vit_layer(v: VitDims, layer: int, precision: str, seed: int = 0) -> tuple:
    """One ViT block of ``v`` (its window size at ``layer``) on (tokens, hidden)."""
    g = GraphBuilder(np.float32, seed)
    n, h, nh = v.tokens, v.hidden, v.heads
    hd = h // nh
    w = (v.window[layer] if v.window else None) or n
    x = g.add_input("x", [n, h])
    qkv = g.linear(norm(g, x, h), h, 3 * h, precision, bias=True)
    (r,) = g.op("Reshape", [qkv, g.const([n // w, w, 3, nh, hd])])  # (windows, w, 3, nh, hd)
    (r,) = g.op("Transpose", [r], perm=[2, 0, 3, 1, 4])  # (3, windows, nh, w, hd)
    q, k, vv = g.op("Split", [r, g.const([1, 1, 1])], n_out=3, axis=0)
    q, k, vv = (g.op("Squeeze", [t, g.const([0])])[0] for t in (q, k, vv))
    o = attention(g, q, k, vv, hd)  # (windows, nh, w, hd)
    (o,) = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3])[0], g.const([n, h])])
    (x2,) = g.op("Add", [x, g.linear(o, h, h, precision, bias=True)])
    hn2 = norm(g, x2, h)
    if v.gated_mlp:
        act = silu_gate(
            g,
            g.linear(hn2, h, v.intermediate, precision, True),
            g.linear(hn2, h, v.intermediate, precision, True),
        )
    else:
        (act,) = g.op("Gelu", [g.linear(hn2, h, v.intermediate, precision, True)], domain="com.microsoft")
    (y,) = g.op("Add", [x2, g.linear(act, v.intermediate, h, precision, True)])
    g.add_output(y)
    return g, {"x": np.random.default_rng(seed).standard_normal((n, h), dtype=np.float32)}


def dense_stack(linears: tuple[Dense, ...], precision: str, seed: int = 0) -> tuple:
    """Independent linears (patch embeddings, merger, projector), each on its own input."""
    g = GraphBuilder(np.float32, seed)
    feeds = {}
    rng = np.random.default_rng(seed)
    for i, d in enumerate(linears):
        x = g.add_input(f"x{i}", [d.tokens, d.in_features])
        g.add_output(g.linear(x, d.in_features, d.out_features, precision, bias=d.bias))
        feeds[x] = rng.standard_normal((d.tokens, d.in_features), dtype=np.float32)
    return g, feeds


def output_head(lm: LmDims, precision: str, seed: int = 0) -> tuple:
    """Final norm + the head's ``head_rows`` rows for one token."""
    g = GraphBuilder(np.float32, seed)
    x = g.add_input("x", [1, lm.hidden])
    g.add_output(g.linear(norm(g, x, lm.hidden), lm.hidden, lm.head_rows, precision))
    return g, {"x": np.random.default_rng(seed).standard_normal((1, lm.hidden), dtype=np.float32)}
