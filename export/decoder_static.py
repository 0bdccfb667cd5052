"""TensorRT-flavor text decoder: a static-shape KV cache of ``max_len`` slots written at a position index.

Data flow: inputs_embeds (1, S, H) + position_ids (3, 1, S) + cache_position (S,) int64 (the absolute slots
the new tokens take) + per layer past K/V (1, kv_heads, MAX, hd) --per layer: RMSNorm -> q/k/v ->
multimodal rotary (the modules of :class:`~nora_edge.export.decoder.DecoderLayer`, reused) -> ScatterElements
of the S new K/V rows into the past buffers at ``cache_position`` (= present K/V, same static shape) ->
grouped-query attention over all MAX slots, the query heads of one KV head stacked as rows of one MatMul (no
Expand of the cache), additive mask allowing slot j for new token i iff j <= cache_position[i] (slots never
written are never attended) -> o_proj -> SwiGLU MLP--> final RMSNorm of the LAST new token --sliced head-->
logits (1, rows), present K/V.

Only ``seq`` is dynamic, so one TensorRT optimization profile (seq 1..prompt) serves prefill and every decode
step, and the cache tensors keep one address-stable shape (CUDA-graph capturable). Every node is a standard
ai.onnx op (opset :data:`~nora_edge.export.onnx_io.OPSET`); :func:`export_decoder_static` runs
:func:`~nora_edge.export.trt_support.assert_tensorrt_compatible` on the file it writes. The graph does not
check ``cache_position < MAX`` (onnxruntime rejects an out-of-range index, TensorRT leaves it undefined): the
runtime (:mod:`nora_edge.static_kv`) refuses to overflow before it runs the graph.

Math = :class:`~nora_edge.export.decoder.DecoderForExport` on the written slots (transformers'
``Qwen2_5_VLTextModel`` eager attention); masked slots get float32's most negative value, as there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nora_edge import bundle
from nora_edge.errors import ExportError
from nora_edge.export.decoder import DecoderForExport, DecoderLayer, decoder_spec, kv_specs
from nora_edge.static_kv import CACHE_POSITION, KV_LAYOUT


def static_max_len(prompt_tokens: int, time_horizon: int, action_dim: int, multiple: int = 64) -> int:
    """Cache slots for one chunk: the prompt plus the constrained-decoding bound ``4*T*D + 1`` new tokens
    (:func:`nora_edge.generate.greedy`), rounded up to ``multiple``.

    Raises:
        ExportError: a non-positive argument.
    """
    if min(prompt_tokens, time_horizon, action_dim, multiple) < 1:
        raise ExportError(
            f"static_max_len needs positive sizes, got prompt={prompt_tokens} T={time_horizon} "
            f"D={action_dim} multiple={multiple}"
        )
    need = prompt_tokens + 4 * time_horizon * action_dim + 1
    return -(-need // multiple) * multiple


def slot_bias(cache_position: torch.Tensor, max_len: int) -> torch.Tensor:
    """Additive (S, MAX) mask: 0 where slot j <= cache_position[i], float32 min elsewhere."""
    slots = torch.arange(max_len, dtype=torch.int64)  # (MAX,)
    allowed = slots.unsqueeze(0) <= cache_position.unsqueeze(1)  # (S, MAX)
    zero = torch.zeros((), dtype=torch.float32)
    neg = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
    return torch.where(allowed, zero, neg)


class StaticDecoderLayer(DecoderLayer):
    """:class:`DecoderLayer` (same weights and modules) with the K/V written into static buffers."""

    def forward(self, x, cos, sin, bias, cache_position, past_k, past_v):
        """One layer on S new tokens.

        Args:
            x: (1, S, H) hidden states.
            cos, sin: (1, S, hd) rotary tables.
            bias: (S, MAX) additive slot mask.
            cache_position: (S,) int64 slots of the new tokens.
            past_k, past_v: (1, Hkv, MAX, hd) buffers.

        Returns:
            x (1, S, H), present k/v (1, Hkv, MAX, hd).
        """
        b, s, _ = x.shape
        hkv, hd = self.num_kv_heads, self.head_dim
        rep = self.num_heads // hkv
        q, k, v = self.project(x, cos, sin)  # (1, Hq, S, hd), (1, Hkv, S, hd) x 2
        index = cache_position.reshape(1, 1, s, 1).expand(b, hkv, s, hd)  # (1, Hkv, S, hd)
        k_all = past_k.scatter(2, index, k)  # ScatterElements: (1, Hkv, MAX, hd)
        v_all = past_v.scatter(2, index, v)
        qg = q.reshape(b, hkv, rep * s, hd)  # query heads of one KV head as rows (head-major)
        scores = torch.matmul(qg, k_all.transpose(2, 3)) * self.scaling  # (1, Hkv, rep*S, MAX)
        scores = scores.reshape(b, hkv, rep, s, -1) + bias  # (1, Hkv, rep, S, MAX)
        probs = torch.softmax(scores, dim=-1).reshape(b, hkv, rep * s, -1)
        out = torch.matmul(probs, v_all).reshape(b, self.num_heads, s, hd)  # (1, Hq, S, hd)
        return self.finish(x, out), k_all, v_all


class StaticDecoderForExport(DecoderForExport):
    """:class:`DecoderForExport` with static K/V buffers of ``max_len`` slots (batch 1).

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration``.
        head_rows: Qwen ids of the logits rows.
        max_len: cache slots (MAX).
        free_source: delete each HF decoder layer once copied.
    """

    layer_class = StaticDecoderLayer

    def __init__(
        self,
        model: nn.Module,
        head_rows: list[int],
        max_len: int,
        *,
        free_source: bool = False,
        logits_all: bool = False,
    ):
        if max_len < 2:
            raise ExportError(f"max_len must be >= 2 cache slots, got {max_len}")
        super().__init__(model, head_rows, free_source=free_source, logits_all=logits_all)
        self.max_len = int(max_len)

    def forward(self, inputs_embeds, position_ids, cache_position, *past):
        """Module docstring's inputs; ``past`` = k0, v0, k1, v1, ...

        Returns:
            (logits (1, rows), k0, v0, k1, v1, ...) with every K/V (1, Hkv, MAX, hd); with ``logits_all``
            (logits, logits_all (1, S, rows), k0, v0, ...), logits being logits_all's last row.
        """
        cos, sin = self.rotary(position_ids)
        bias = slot_bias(cache_position, self.max_len)
        x = inputs_embeds
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, bias, cache_position, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        if self.logits_all:
            every = torch.matmul(self.norm(x), self.head_w_t)  # (1, S, rows)
            return (every[:, -1, :], every, *presents)
        last = self.norm(x[:, -1, :])  # (1, H)
        return (torch.matmul(last, self.head_w_t), *presents)


def static_io_specs(dec: StaticDecoderForExport) -> tuple[list, list]:
    """Input and output TensorSpecs: batch 1, dynamic ``seq``, every KV tensor (1, kv_heads, MAX, hd)."""
    kv = (1, dec.num_kv_heads, dec.max_len, dec.head_dim)
    ins = [
        bundle.TensorSpec(bundle.INPUTS_EMBEDS, "float32", (1, "seq", dec.hidden_size)),
        bundle.TensorSpec(bundle.POSITION_IDS, "int64", (3, 1, "seq")),
        bundle.TensorSpec(CACHE_POSITION, "int64", ("seq",)),
    ]
    rows = int(dec.head_w_t.shape[1])
    outs = [bundle.TensorSpec(bundle.LOGITS, "float32", (1, rows))]
    if dec.logits_all:
        outs.append(bundle.TensorSpec(bundle.LOGITS_ALL, "float32", (1, "seq", rows)))
    past, present = kv_specs(dec.num_layers, kv, kv)
    return ins + past, outs + present


def static_example_inputs(dec: StaticDecoderForExport, seq: int = 5, past: int = 3) -> tuple:
    """Trace inputs: ``seq`` new tokens at slots ``past..past+seq-1`` (seq > 1 keeps the dim dynamic)."""
    if past + seq > dec.max_len:
        past, seq = 0, min(seq, dec.max_len)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, seq, dec.hidden_size, generator=gen)
    pos = (torch.arange(seq) + past).view(1, 1, seq).expand(3, 1, seq).contiguous()
    cache_position = torch.arange(past, past + seq, dtype=torch.int64)
    kv = [
        torch.randn(1, dec.num_kv_heads, dec.max_len, dec.head_dim, generator=gen)
        for _ in range(2 * dec.num_layers)
    ]
    return (embeds, pos, cache_position, *kv)


def export_decoder_static(
    model: nn.Module,
    out_path: str | Path,
    head_rows: list[int],
    max_len: int,
    *,
    head: str = "action",
    free_source: bool = False,
    check_versions: tuple[str, ...] = ("10.3", "latest"),
    logits_all: bool = False,
) -> bundle.ComponentSpec:
    """Export the static-KV text decoder to ONNX and check it against TensorRT's operator tables.

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration``.
        out_path: .onnx file (external data ``<name>.data`` beside it when > 1 GiB of weights).
        head_rows: Qwen id per logits row (:func:`~nora_edge.export.decoder.head_rows_for`).
        max_len: cache slots MAX (see :func:`static_max_len`).
        head: "action" or "full" (recorded in the meta).
        free_source: drop the HF decoder layers while copying them (the model is unusable afterwards).
        check_versions: TensorRT versions the graph is checked against
            (:func:`~nora_edge.export.trt_support.assert_tensorrt_compatible`).
        logits_all: also output the head at every new position (meta ``logits_all: true``; multi-token decoding).

    Returns:
        the component spec; meta adds ``kv_cache`` = "static", ``max_len`` and ``cache_position_input``.

    Raises:
        ExportError: export failed, or the graph holds an op/dtype a checked TensorRT version does not
            support.
    """
    from nora_edge.export.onnx_io import export_module
    from nora_edge.export.trt_support import assert_tensorrt_compatible

    dec = StaticDecoderForExport(
        model, head_rows, max_len, free_source=free_source, logits_all=logits_all
    ).eval()
    ins, outs = static_io_specs(dec)
    data_files = export_module(dec, static_example_inputs(dec), Path(out_path), ins, outs, varargs_from=3)
    for version in check_versions:
        assert_tensorrt_compatible(out_path, version)
    return decoder_spec(
        dec, out_path, data_files, ins, outs, head, len(head_rows),
        kv_cache=KV_LAYOUT, max_len=dec.max_len, cache_position_input=CACHE_POSITION,
        **({"logits_all": True} if logits_all else {}),
    )  # fmt: skip
