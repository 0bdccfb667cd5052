"""Mapping between model (Qwen) token ids and FAST ids.

Data flow: generated Qwen ids --ActionIdMap.to_fast--> FAST ids in [0, size) --> FastTokenizer.decode;
FastAutomaton mask (size,) --ActionIdMap.logits_slice--> the action block of the logits.
The base id is read from the checkpoint's added tokens (``<robot_action_{i}>``), never hard-coded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from nora_edge.actions.bytetable import detokenization_error
from nora_edge.errors import CheckpointError, InputError

ACTION_TOKEN_PATTERN = re.compile(r"<robot_action_(\d+)>")


@dataclass(frozen=True)
class ActionIdMap:
    """Contiguous block of ``size`` action tokens starting at Qwen id ``base``.

    Attributes:
        base: Qwen id of FAST id 0.
        size: number of action tokens (FAST vocabulary slots).
    """

    base: int
    size: int

    def __post_init__(self) -> None:
        for name in ("base", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InputError(f"ActionIdMap.{name} must be an integer, got {value!r}")
        if self.base < 0 or self.size < 1:
            raise InputError(
                f"ActionIdMap needs base >= 0 and size >= 1, got base={self.base}, size={self.size}"
            )

    @classmethod
    def from_added_tokens(
        cls, added_tokens: Mapping[str, int], source: str = "added_tokens.json"
    ) -> ActionIdMap:
        """Derive the map from a token -> id mapping (e.g. added_tokens.json).

        Raises:
            CheckpointError: no ``<robot_action_i>`` tokens, a gap in i, or ids that are not contiguous.
        """
        found = {}
        for token, tid in added_tokens.items():
            match = ACTION_TOKEN_PATTERN.fullmatch(token)
            if match:
                found[int(match.group(1))] = int(tid)
        if not found:
            raise CheckpointError(f"{source}: no <robot_action_i> tokens")
        size = max(found) + 1
        missing = sorted(set(range(size)) - set(found))
        if missing:
            raise CheckpointError(f"{source}: action tokens missing for i in {missing[:5]} (of {size})")
        base = found[0]
        wrong = [i for i in range(size) if found[i] != base + i]
        if wrong:
            i = wrong[0]
            raise CheckpointError(
                f"{source}: <robot_action_{i}> has id {found[i]}, expected {base + i} (ids must be contiguous)"
            )
        return cls(base, size)

    @property
    def logits_slice(self) -> slice:
        """Slice of the vocabulary axis holding the action tokens."""
        return slice(self.base, self.base + self.size)

    def is_action(self, qwen_ids: object) -> np.ndarray:
        """bool array, same shape as ``qwen_ids``: True where the id is an action token."""
        arr = np.asarray(qwen_ids, dtype=np.int64)
        return (arr >= self.base) & (arr < self.base + self.size)

    def to_fast(self, qwen_ids: object) -> np.ndarray:
        """Qwen ids -> FAST ids (int64, same shape).

        Raises:
            DetokenizationError: an id is not an action token (reason ``id_out_of_range``).
        """
        arr = np.asarray(qwen_ids, dtype=np.int64)
        bad = np.flatnonzero(~self.is_action(arr).reshape(-1))
        if bad.size:
            pos = int(bad[0])
            raise detokenization_error(
                "id_out_of_range",
                f"model id {int(arr.reshape(-1)[pos])} at position {pos} is not an action token"
                f" [{self.base}, {self.base + self.size})",
            )
        return arr - self.base

    def to_qwen(self, fast_ids: object) -> np.ndarray:
        """FAST ids -> Qwen ids (int64, same shape).

        Raises:
            InputError: a FAST id is outside [0, size).
        """
        arr = np.asarray(fast_ids, dtype=np.int64)
        bad = np.flatnonzero(((arr < 0) | (arr >= self.size)).reshape(-1))
        if bad.size:
            pos = int(bad[0])
            raise InputError(
                f"FAST id {int(arr.reshape(-1)[pos])} at position {pos} is outside [0, {self.size})"
            )
        return arr + self.base
