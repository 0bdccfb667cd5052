"""Storage precision of the (vocab, hidden) token-embedding table (a numpy array in the bundle).

Data flow: fp32 table (V, D) -> :func:`quantize_embedding_table` -> :class:`EmbeddingTable` (arrays to store:
``table`` fp32 / fp16 / int8 (V, D), plus ``scale`` float32 (V,) for int8) -> runtime lookup
``table[ids] * scale[ids, None]`` (:func:`lookup_rows` is the reference for it).

int8 is symmetric with one scale per row: ``scale[r] = max|row r| / 127``, ``q = round(row / scale)``, so
every stored value is within ``scale[r] / 2`` of the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nora_edge.errors import ExportError, InputError

from .recipes import EmbeddingRecipe

FP16_MAX = 65504.0


@dataclass(frozen=True)
class EmbeddingTable:
    """A stored embedding table: ``dtype`` "fp32" | "fp16" | "int8", ``table`` (V, D), ``scale`` (V,) or None."""

    dtype: str
    table: np.ndarray
    scale: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return int(self.table.nbytes + (self.scale.nbytes if self.scale is not None else 0))


def quantize_embedding_table(table: np.ndarray, recipe: EmbeddingRecipe) -> EmbeddingTable:
    """Convert an fp32 (V, D) table to the recipe's storage.

    Raises:
        InputError: ``table`` is not a finite 2-D float array.
        ExportError: fp16 requested but a value exceeds the fp16 range.
    """
    table = np.asarray(table)
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
        raise InputError(f"embedding table: expected a 2-D float array, got {table.dtype} {table.shape}")
    if not np.isfinite(table).all():
        raise InputError("embedding table: contains inf or NaN")
    table = table.astype(np.float32, copy=False)
    if recipe.dtype == "fp32":
        return EmbeddingTable("fp32", table, None)
    if recipe.dtype == "fp16":
        peak = float(np.abs(table).max(initial=0.0))
        if peak > FP16_MAX:
            raise ExportError(f"embedding table: max |x| = {peak:g} exceeds the fp16 range; use int8 or fp32")
        return EmbeddingTable("fp16", table.astype(np.float16), None)
    scale = np.abs(table).max(axis=1) / 127.0  # (V,)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(table / safe[:, None]), -127, 127).astype(np.int8)  # (V, D)
    return EmbeddingTable("int8", q, scale.astype(np.float32))


def lookup_rows(emb: EmbeddingTable, ids: np.ndarray) -> np.ndarray:
    """Reference lookup: float32 rows (..., D) for int ids (...)."""
    ids = np.asarray(ids)
    rows = emb.table[ids].astype(np.float32)
    if emb.scale is not None:
        rows *= emb.scale[ids][..., None]
    return rows
