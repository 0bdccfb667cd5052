"""Export-friendly Qwen2.5-VL text decoder with explicit KV tensors, and its ONNX export.

Data flow: inputs_embeds (B, S, H) + position_ids (3, B, S) + attention_mask (B, P+S) + past K/V per layer
(B, kv_heads, P, hd) --per layer: RMSNorm -> q/k/v (bias) -> multimodal rotary (mrope sections of
t/h/w positions) -> concat past -> GQA attention with a causal + padding additive mask built in-graph ->
o_proj -> SwiGLU MLP--> final RMSNorm of the LAST position --head (sliced rows of the tied lm_head)-->
logits (B, rows), present K/V (B, kv_heads, P+S, hd). With ``logits_all`` (``nora-edge export --multi-token``)
the final RMSNorm and the head run on EVERY new position: logits_all (B, S, rows) is a second output and logits
is its last row, so one graph (one copy of the weights) serves plain greedy and the multi-token verify call.

One graph serves prefill (P = 0) and decode (S = 1). Batches must be LEFT-padded (attention_mask 0 on the
pads): logits are taken at the last position of every row. The math mirrors transformers'
``Qwen2_5_VLTextModel`` (``Qwen2_5_VLRotaryEmbedding.recomposition_frequencies``, ``apply_rotary_pos_emb``,
``repeat_kv``, eager attention); keys are cached after rotary, as HF does. Linears are ``x @ W_t (+ b)`` so the
graph holds MatMul, never Gemm.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nora_edge import bundle
from nora_edge.errors import ExportError
from nora_edge.export.vision import MatMulLinear, RMSNorm, rotate_half

HEADS = ("action", "full")


def head_rows_for(ckpt_meta: dict, head: str, vocab_size: int) -> list[int]:
    """Qwen id of every logits row.

    Args:
        ckpt_meta: ``action_base``, ``num_action_tokens``, ``end_ids`` (im_end first, then generation eos ids).
        head: "action" -> action ids (row i = FAST id i) then the end ids; "full" -> every id 0..vocab-1.
        vocab_size: rows of the lm_head.

    Raises:
        ExportError: unknown head or an id outside the vocabulary.
    """
    if head == "full":
        return list(range(vocab_size))
    if head != "action":
        raise ExportError(f"head must be one of {HEADS}, got {head!r}")
    base, count = int(ckpt_meta["action_base"]), int(ckpt_meta["num_action_tokens"])
    rows = list(range(base, base + count))
    for i in ckpt_meta["end_ids"]:
        if int(i) not in rows:
            rows.append(int(i))
    bad = [r for r in rows if not 0 <= r < vocab_size]
    if bad:
        raise ExportError(f"head rows {bad[:5]} are outside the lm_head's {vocab_size} rows")
    return rows


class MultimodalRotary(nn.Module):
    """Qwen2.5-VL mrope: cos/sin (B, S, hd) from (3, B, S) t/h/w positions."""

    def __init__(self, rotary_emb: nn.Module) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rotary_emb.inv_freq.detach().float().clone(), persistent=False)
        self.section = [int(s) for s in rotary_emb.mrope_section]
        self.scaling = float(rotary_emb.attention_scaling)
        if sum(self.section) != self.inv_freq.shape[0]:
            raise ExportError(
                f"mrope_section {self.section} does not sum to head_dim/2 = {self.inv_freq.shape[0]}"
            )

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (3, B, S, hd/2)
        parts, start = [], 0
        for i, n in enumerate(self.section):
            parts.append(freqs[i % 3, :, :, start : start + n])  # (B, S, n) from t, h or w
            start += n
        emb = torch.cat(parts, dim=-1)
        emb = torch.cat((emb, emb), dim=-1)  # (B, S, hd)
        return emb.cos() * self.scaling, emb.sin() * self.scaling


class DecoderLayer(nn.Module):
    """One decoder layer with explicit past/present K/V."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        attn = layer.self_attn
        self.q, self.k, self.v, self.o = (
            MatMulLinear(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        )
        self.gate, self.up, self.down = (
            MatMulLinear(p) for p in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
        )
        self.act = layer.mlp.act_fn
        self.norm1, self.norm2 = RMSNorm(layer.input_layernorm), RMSNorm(layer.post_attention_layernorm)
        self.num_heads, self.num_kv_heads = int(attn.num_heads), int(attn.num_key_value_heads)
        self.head_dim, self.scaling = int(attn.head_dim), float(attn.scaling)

    def project(self, x, cos, sin):
        """Input norm, q/k/v projections and rotary: x (B, S, H) -> q (B, Hq, S, hd), k, v (B, Hkv, S, hd)."""
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, S, hd)
        k = self.k(h).reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v(h).reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        c, sn = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, hd)
        return q * c + rotate_half(q) * sn, k * c + rotate_half(k) * sn, v

    def finish(self, x, out):
        """o_proj + residual, then the SwiGLU MLP block: attention output (B, Hq, S, hd) -> x (B, S, H)."""
        b, s, _ = x.shape
        x = x + self.o(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))
        h = self.norm2(x)
        return x + self.down(self.act(self.gate(h)) * self.up(h))

    def forward(self, x, cos, sin, mask, past_k, past_v):
        b, s, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        k_all = torch.cat((past_k, k), dim=2)  # (B, Hkv, P+S, hd)
        v_all = torch.cat((past_v, v), dim=2)
        rep = self.num_heads // self.num_kv_heads
        t = k_all.shape[2]
        kr = (
            k_all.unsqueeze(2)
            .expand(b, self.num_kv_heads, rep, t, self.head_dim)
            .reshape(b, self.num_heads, t, self.head_dim)
        )
        vr = (
            v_all.unsqueeze(2)
            .expand(b, self.num_kv_heads, rep, t, self.head_dim)
            .reshape(b, self.num_heads, t, self.head_dim)
        )
        scores = torch.matmul(q, kr.transpose(2, 3)) * self.scaling + mask  # (B, Hq, S, P+S)
        out = torch.matmul(torch.softmax(scores, dim=-1), vr)  # (B, Hq, S, hd)
        return self.finish(x, out), k_all, v_all


def attention_bias(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Additive (B, 1, S, P+S) mask: causal over absolute positions and 0/1 padding from ``attention_mask``."""
    total = attention_mask.shape[1]
    k_pos = torch.arange(total, dtype=torch.int64)  # (P+S,)
    q_pos = k_pos[total - seq :]  # (S,) absolute positions of the new tokens
    causal = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # (S, P+S)
    allowed = causal.unsqueeze(0) & (attention_mask.unsqueeze(1) != 0)  # (B, S, P+S)
    zero = torch.zeros((), dtype=torch.float32)
    neg = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
    return torch.where(allowed, zero, neg).unsqueeze(1)


class DecoderForExport(nn.Module):
    """fp32 decoder-with-KV wrapper over an HF Qwen2.5-VL model; logits of the last position for ``head_rows``.

    ``layer_class`` builds each layer (a subclass swaps in its own attention over the same weights).

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration``.
        head_rows: Qwen ids of the logits rows.
        free_source: delete each HF decoder layer once copied (keeps peak memory near one fp32 copy).
    """

    layer_class: type[DecoderLayer] = DecoderLayer

    def __init__(
        self, model: nn.Module, head_rows: list[int], *, free_source: bool = False, logits_all: bool = False
    ) -> None:
        super().__init__()
        self.logits_all = logits_all
        lm = model.model.language_model
        self.rotary = MultimodalRotary(lm.rotary_emb)
        layers = []
        for i in range(len(lm.layers)):
            layers.append(self.layer_class(lm.layers[i]))
            if free_source:
                lm.layers[i] = nn.Identity()
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(lm.norm)
        rows = torch.tensor(head_rows, dtype=torch.int64)
        w = model.lm_head.weight.detach()
        self.head_w_t = nn.Parameter(w.index_select(0, rows).float().t().contiguous(), requires_grad=False)
        first = self.layers[0]
        self.num_layers, self.num_kv_heads, self.head_dim = len(layers), first.num_kv_heads, first.head_dim
        self.hidden_size = int(w.shape[1])

    def hidden_states(self, inputs_embeds, position_ids, attention_mask, *past):
        """The decoder layers: (B, S, H) hidden states of the new positions (before the final norm) and the
        presents [k0, v0, k1, v1, ...]; arguments as :meth:`forward`."""
        seq = inputs_embeds.shape[1]
        cos, sin = self.rotary(position_ids)
        mask = attention_bias(attention_mask, seq)
        x = inputs_embeds
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return x, presents

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        """Args: see module docstring; ``past`` = k0, v0, k1, v1, ...

        Returns:
            (logits, k0, v0, k1, v1, ...); with ``logits_all`` (logits, logits_all, k0, v0, ...), where
            logits_all (B, S, rows) is the head at every new position and logits its last row.
        """
        x, presents = self.hidden_states(inputs_embeds, position_ids, attention_mask, *past)
        if (
            self.logits_all
        ):  # one head MatMul over every position; logits is its last row (same graph, same bits)
            every = torch.matmul(self.norm(x), self.head_w_t)  # (B, S, rows)
            return (every[:, -1, :], every, *presents)
        last = self.norm(x[:, -1, :])  # (B, H)
        return (torch.matmul(last, self.head_w_t), *presents)


def decoder_io_specs(dec: DecoderForExport) -> tuple[list, list]:
    """Input and output TensorSpecs with dims ``batch``, ``seq``, ``past``, ``total`` (= past + seq)."""
    kv = ("batch", dec.num_kv_heads, "past", dec.head_dim)
    kv_out = ("batch", dec.num_kv_heads, "total", dec.head_dim)
    ins = [
        bundle.TensorSpec(bundle.INPUTS_EMBEDS, "float32", ("batch", "seq", dec.hidden_size)),
        bundle.TensorSpec(bundle.POSITION_IDS, "int64", (3, "batch", "seq")),
        bundle.TensorSpec(bundle.ATTENTION_MASK, "int64", ("batch", "total")),
    ]
    rows = int(dec.head_w_t.shape[1])
    outs = [bundle.TensorSpec(bundle.LOGITS, "float32", ("batch", rows))]
    if dec.logits_all:
        outs.append(bundle.TensorSpec(bundle.LOGITS_ALL, "float32", ("batch", "seq", rows)))
    past, present = kv_specs(dec.num_layers, kv, kv_out)
    return ins + past, outs + present


def kv_specs(num_layers: int, past_shape: tuple, present_shape: tuple) -> tuple[list, list]:
    """TensorSpecs of every layer's past K/V (inputs) and present K/V (outputs), in graph order."""
    past, present = [], []
    for i in range(num_layers):
        past += [bundle.TensorSpec(f(i), "float32", past_shape) for f in (bundle.past_key, bundle.past_value)]
        present += [
            bundle.TensorSpec(f(i), "float32", present_shape)
            for f in (bundle.present_key, bundle.present_value)
        ]
    return past, present


def example_inputs(dec: DecoderForExport, batch: int = 2, seq: int = 5, past: int = 3) -> tuple:
    """Trace inputs with every dynamic dim distinct and > 1."""
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, seq, dec.hidden_size, generator=gen)
    pos = (torch.arange(seq) + past).view(1, 1, seq).expand(3, batch, seq).contiguous()
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    kv = [
        torch.randn(batch, dec.num_kv_heads, past, dec.head_dim, generator=gen)
        for _ in range(2 * dec.num_layers)
    ]
    return (embeds, pos, mask, *kv)


def export_decoder(
    model: nn.Module,
    out_path: str | Path,
    head_rows: list[int],
    *,
    head: str = "action",
    free_source: bool = False,
    logits_all: bool = False,
) -> bundle.ComponentSpec:
    """Export the text decoder with KV cache to ONNX.

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration``.
        out_path: .onnx file (external data ``<name>.data`` beside it when > 2 GB).
        head_rows: Qwen id per logits row (see :func:`head_rows_for`).
        head: "action" or "full" (recorded in the spec's meta).
        free_source: drop the HF decoder layers while copying them (the model is unusable afterwards).
        logits_all: also output ``logits_all`` (B, S, rows), the head at every new position, for lossless
            multi-token decoding (nora_edge.multitoken); meta ``logits_all: true``.

    Returns:
        the component spec for the manifest.
    """
    from nora_edge.export.onnx_io import export_module

    dec = DecoderForExport(model, head_rows, free_source=free_source, logits_all=logits_all).eval()
    ins, outs = decoder_io_specs(dec)
    data_files = export_module(dec, example_inputs(dec), Path(out_path), ins, outs, varargs_from=3)
    extra = {"logits_all": True} if logits_all else {}
    return decoder_spec(dec, out_path, data_files, ins, outs, head, len(head_rows), **extra)


DIM_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "hidden_size")  # the runtime's Decoder reads these


def decoder_spec(
    dims, out_path, data_files, ins: list, outs: list, head: str, rows: int, **meta
) -> bundle.ComponentSpec:
    """The fp32 decoder's manifest ComponentSpec; ``meta`` adds fields to the common ones.

    Args:
        dims: the text decoder's :data:`DIM_FIELDS`, as a mapping or as attributes (a DecoderForExport).
    """
    get = dims.__getitem__ if isinstance(dims, dict) else lambda k: getattr(dims, k)
    common = {**{k: int(get(k)) for k in DIM_FIELDS}, "head": head, "num_rows": rows}
    return bundle.ComponentSpec(
        file=Path(out_path).name,
        data_files=tuple(data_files),
        precision="fp32",
        inputs=tuple(ins),
        outputs=tuple(outs),
        meta={**common, **meta},
    )
