"""Token embedding table -> .npy for the runtime (it embeds prompt and generated ids with numpy).

Data flow: ``model.model.language_model.embed_tokens.weight`` (vocab, hidden) in the checkpoint's dtype
--cast to float16 (default) or float32--> ``embeddings.npy`` (written atomically) + a manifest entry
{file, dtype, shape, conversion error vs the fp32 values}.

fp16 is lossless for bf16 values inside fp16's normal range (bf16 has fewer mantissa bits); the conversion
error is measured and recorded, and values beyond fp16's range are an error, never silently clipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nora_edge.atomic import atomic_path
from nora_edge.errors import ExportError

DTYPES = {"float16": np.float16, "float32": np.float32}
FP16_MAX = float(np.finfo(np.float16).max)


def embedding_table(model: torch.nn.Module) -> torch.Tensor:
    """The (vocab, hidden) input embedding weight of a Qwen2.5-VL model (no copy)."""
    return model.get_input_embeddings().weight.detach()


def convert_table(weight: torch.Tensor, dtype: str) -> tuple[np.ndarray, dict]:
    """Cast the table; return it with {max_abs_err, max_rel_err} against the fp32 values.

    Raises:
        ExportError: unknown dtype, or a value beyond the fp16 range.
    """
    if dtype not in DTYPES:
        raise ExportError(f"embeddings dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    ref = weight.float().numpy()  # (V, H)
    peak = float(np.abs(ref).max()) if ref.size else 0.0
    if dtype == "float16" and peak > FP16_MAX:
        raise ExportError(f"embedding table has |value| {peak:.4g} > fp16 max {FP16_MAX}; use dtype float32")
    table = ref.astype(DTYPES[dtype])
    err = float(np.abs(table.astype(np.float32) - ref).max()) if ref.size else 0.0
    return table, {"max_abs_err": err, "max_rel_err": err / peak if peak else 0.0}


def save_npy_atomic(array: np.ndarray, path: Path) -> None:
    """np.save to a temp file in the same dir, fsync, rename."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)


def export_embeddings(model: torch.nn.Module, out_path: str | Path, *, dtype: str = "float16") -> dict:
    """Write the embedding table as .npy.

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration``.
        out_path: target .npy file.
        dtype: "float16" (default) or "float32".

    Returns:
        manifest entry {file, dtype, shape, conversion: {max_abs_err, max_rel_err}}.
    """
    out_path = Path(out_path)
    table, err = convert_table(embedding_table(model), dtype)
    save_npy_atomic(table, out_path)
    return {"file": out_path.name, "dtype": dtype, "shape": list(table.shape), "conversion": err}
