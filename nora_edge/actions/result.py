"""Batch decode with an explicit failure policy, shared by the tokenizers path and the byte-table path.

Data flow: ids (B sequences) --decode_one per chunk--> (T, D) or DetokenizationError
--policy--> ``raise``: first error propagates; ``hold``: the caller's ``last_good`` chunk replaces a failed
chunk and :class:`DecodeResult` records which chunks fell back and why. There is no zero fallback: a
fallback policy without a previous chunk is an :class:`~nora_edge.errors.InputError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from nora_edge.errors import DetokenizationError, InputError

ON_ERROR_POLICIES = ("raise", "hold")


@dataclass(frozen=True)
class DecodeResult:
    """Outcome of a batch decode under a fallback policy.

    Attributes:
        actions: float64 (B, T, D); rows where ``ok`` is False hold the caller's ``last_good`` chunk.
        ok: bool (B,); True where the chunk decoded strictly.
        reasons: per chunk None (ok) or the DetokenizationError message of the failure.
        policy: the policy that was applied ("hold").
    """

    actions: np.ndarray
    ok: np.ndarray
    reasons: tuple[str | None, ...]
    policy: str

    @property
    def fallback_used(self) -> bool:
        """True if any chunk was replaced by the fallback."""
        return not bool(np.all(self.ok))


def split_batch(ids: object) -> list[object]:
    """Normalize ``list[list[int]] | list[int] | ndarray (B, L) | ndarray (L,)`` to a list of sequences.

    A flat sequence (including an empty one) is one chunk, so an empty generation fails the count check
    instead of silently yielding an empty batch.
    """
    if isinstance(ids, np.ndarray):
        if ids.ndim == 2:
            return list(ids)  # (B, L) -> B x (L,)
        if ids.ndim <= 1:
            return [ids.reshape(-1)]
        raise InputError(f"FAST ids array must be (L,) or (B, L), got shape {ids.shape}")
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InputError(f"FAST ids must be a sequence of ints or of int sequences, got {type(ids).__name__}")
    if len(ids) and isinstance(ids[0], (Sequence, np.ndarray)) and not isinstance(ids[0], (str, bytes)):
        return list(ids)
    return [ids]


def check_last_good(last_good: object, batch: int, time_horizon: int, action_dim: int) -> np.ndarray:
    """Validate the fallback chunk: float (T, D) or (B, T, D), finite.

    Returns:
        float64 (B, T, D).
    """
    if last_good is None:
        raise InputError("on_error='hold' needs last_good (the previous good (T, D) chunk); got None")
    arr = np.asarray(last_good, dtype=np.float64)
    if arr.shape == (time_horizon, action_dim):
        arr = np.broadcast_to(arr, (batch, time_horizon, action_dim))  # (B, T, D)
    if arr.shape != (batch, time_horizon, action_dim):
        raise InputError(
            f"last_good has shape {arr.shape}, expected ({time_horizon}, {action_dim})"
            f" or ({batch}, {time_horizon}, {action_dim})"
        )
    if not np.all(np.isfinite(arr)):
        raise InputError("last_good contains NaN or inf")
    return arr


def decode_batch(
    decode_one: Callable[[object], np.ndarray],
    ids: object,
    time_horizon: int,
    action_dim: int,
    on_error: str,
    last_good: object,
) -> np.ndarray | DecodeResult:
    """Decode every chunk with ``decode_one`` and apply the failure policy.

    Args:
        decode_one: strict decode of one sequence to float64 (T, D).
        ids: see :func:`split_batch`.
        on_error: "raise" or "hold".
        last_good: fallback chunk for "hold", (T, D) or (B, T, D).

    Returns:
        float64 (B, T, D) for "raise"; :class:`DecodeResult` for "hold".
    """
    if on_error not in ON_ERROR_POLICIES:
        raise InputError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
    seqs = split_batch(ids)
    if on_error == "raise":
        return np.stack([decode_one(s) for s in seqs]).reshape(len(seqs), time_horizon, action_dim)
    fallback = check_last_good(last_good, len(seqs), time_horizon, action_dim)  # (B, T, D)
    actions = np.empty((len(seqs), time_horizon, action_dim), dtype=np.float64)
    ok = np.ones(len(seqs), dtype=bool)
    reasons: list[str | None] = []
    for b, seq in enumerate(seqs):
        try:
            actions[b] = decode_one(seq)
            reasons.append(None)
        except DetokenizationError as exc:
            actions[b] = fallback[b]
            ok[b] = False
            reasons.append(str(exc))
    return DecodeResult(actions=actions, ok=ok, reasons=tuple(reasons), policy=on_error)
