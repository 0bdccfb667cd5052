"""The optional verify decoder: the portable decoder-with-KV graph returning head logits at EVERY new position.

Data flow: inputs_embeds (B, S, H) + position_ids (3, B, S) + attention_mask (B, P+S) + past K/V per layer
(B, kv_heads, P, hd) --the same layers as ``decoder.onnx`` (:class:`~nora_edge.export.decoder.DecoderForExport`,
same weights, same head rows)--> final RMSNorm of every new position --head--> logits_all (B, S, rows), present
K/V (B, kv_heads, P+S, hd).

Multi-token decoding (:mod:`nora_edge.multitoken`) feeds the pending token plus K proposed tokens in one call and
reads the greedy choice after each of them. The plain ``decoder.onnx`` (last-position logits) is unchanged, so the
C runtime and every existing bundle keep working; :func:`add_verify_graph` writes a NEW bundle that is the old one
plus the optional ``components.decoder_verify`` entry (:data:`nora_edge.bundle.DECODER_VERIFY`), which only the
multi-token path reads. The weights are stored a second time (sharing ``decoder.onnx``'s external data is left
for later).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nora_edge import bundle
from nora_edge.errors import ExportError
from nora_edge.export.decoder import (
    DecoderForExport,
    decoder_io_specs,
    decoder_spec,
    example_inputs,
)


class VerifyDecoderForExport(DecoderForExport):
    """:class:`DecoderForExport` whose head runs on every new position: logits (B, S, rows)."""

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        """Args: as :meth:`DecoderForExport.forward`. Returns (logits_all (B, S, rows), k0, v0, k1, v1, ...)."""
        x, presents = self.hidden_states(inputs_embeds, position_ids, attention_mask, *past)
        return (torch.matmul(self.norm(x), self.head_w_t), *presents)  # (B, S, rows)


def verify_io_specs(dec: VerifyDecoderForExport) -> tuple[list, list]:
    """The decoder's specs with the logits output replaced by ``logits_all`` (batch, seq, rows)."""
    ins, outs = decoder_io_specs(dec)
    rows = int(dec.head_w_t.shape[1])
    return ins, [bundle.TensorSpec(bundle.LOGITS_ALL, "float32", ("batch", "seq", rows)), *outs[1:]]


def export_decoder_verify(
    model: torch.nn.Module, out_path: str | Path, head_rows: list[int], *, head: str
) -> bundle.ComponentSpec:
    """Export the verify decoder of ``model`` (a ``Qwen2_5_VLForConditionalGeneration``) to ONNX.

    Returns:
        the ``decoder_verify`` component spec (meta as the decoder's plus ``"logits": "all_positions"``).
    """
    from nora_edge.export.onnx_io import export_module

    dec = VerifyDecoderForExport(model, list(head_rows)).eval()
    ins, outs = verify_io_specs(dec)
    data_files = export_module(dec, example_inputs(dec), Path(out_path), ins, outs, varargs_from=3)
    return decoder_spec(dec, out_path, data_files, ins, outs, head, len(head_rows), logits="all_positions")


def add_verify_graph(
    src: str | Path, checkpoint: str | Path, out: str | Path, *, overwrite: bool = False
) -> Path:
    """Write ``out``: the fp32 bundle ``src`` plus ``decoder_verify.onnx`` exported from ``checkpoint``.

    Args:
        src: a bundle exported from ``checkpoint`` with the portable fp32 decoder.
        checkpoint: the NORA-format checkpoint ``src`` came from (its weights make the verify graph).
        out: the new bundle directory (written atomically, manifest last).

    Raises:
        ExportError: ``src``'s decoder is not the portable fp32 graph (static / fused / quantized decoders
            would not be reproduced by the fp32 verify graph), or its head rows disagree.
        BundleError: ``src`` does not load or ``out`` exists.
    """
    from nora_edge.checkpoint import NoraCheckpoint
    from nora_edge.export.bundle_writer import BundleWriter
    from nora_edge.export.pipeline import load_model

    b = bundle.Bundle.load(src)
    dspec = b.components["decoder"]
    if dspec.precision != "fp32" or dspec.meta.get("kv_cache") in ("static", "shared"):
        raise ExportError(
            f"{src}: the verify graph reproduces the portable fp32 decoder only; this decoder is "
            f"precision {dspec.precision!r}, kv_cache {dspec.meta.get('kv_cache')!r}"
        )
    ckpt = NoraCheckpoint.load(checkpoint, None, time_horizon=b.codec.time_horizon)
    model, _ = load_model(ckpt)
    rows = [int(r) for r in b.actions.head_rows.tolist()]
    with BundleWriter(out, overwrite=overwrite) as w:
        for rel in b.manifest["files"]:
            w.copy_file(rel, b.path / rel)
        vspec = export_decoder_verify(model, w.path / bundle.DECODER_VERIFY_ONNX, rows, head=b.actions.head)
        sections = {
            k: v for k, v in b.manifest.items() if k not in ("schema_version", "nora_edge_version", "files")
        }
        sections["components"] = {**sections["components"], bundle.DECODER_VERIFY: vspec.to_json()}
        return w.commit(sections)
