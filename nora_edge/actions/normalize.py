"""Action (un)normalization with NORA's q01/q99 statistics.

NORA's reference maps a normalized action x in [-1, 1] back with ``a = 0.5 * (x + 1) * (q99 - q01) + q01``
on *every* dimension. norm_stats.json also carries a ``mask`` (OpenVLA convention: False = dimension not
normalized, e.g. the gripper), but NORA's inference code ignores it. That is a known trap: we reproduce the
reference by default (``apply_mask=False``) and make the choice explicit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nora_edge.errors import CheckpointError


@dataclass(frozen=True)
class NormStats:
    """Per-dimension q01/q99 (and optional mask) of one dataset key.

    Attributes:
        key: the unnorm key (dataset name) these stats belong to.
        q01: (D,) float64 lower 1% quantile.
        q99: (D,) float64 upper 99% quantile.
        mask: (D,) bool, True where the dimension was normalized, or None when absent.
    """

    key: str
    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        q01 = np.asarray(self.q01, dtype=np.float64)
        q99 = np.asarray(self.q99, dtype=np.float64)
        if q01.ndim != 1 or q01.shape != q99.shape or q01.size == 0:
            raise CheckpointError(
                f"norm stats '{self.key}': q01 {q01.shape} and q99 {q99.shape} must be equal-length 1-D arrays"
            )
        if not (np.isfinite(q01).all() and np.isfinite(q99).all()):
            raise CheckpointError(f"norm stats '{self.key}': q01/q99 contain NaN or inf")
        if self.mask is not None and np.asarray(self.mask).shape != q01.shape:
            raise CheckpointError(
                f"norm stats '{self.key}': mask shape {np.asarray(self.mask).shape} != q01 shape {q01.shape}"
            )
        object.__setattr__(self, "q01", q01)
        object.__setattr__(self, "q99", q99)
        if self.mask is not None:
            object.__setattr__(self, "mask", np.asarray(self.mask, dtype=bool))

    @property
    def action_dim(self) -> int:
        return int(self.q01.shape[0])

    @classmethod
    def from_json(cls, key: str, entry: dict, source: str = "norm_stats.json") -> NormStats:
        """Build from one ``norm_stats.json[key]`` entry (NORA/OpenVLA format: ``{"action": {"q01": ...}}``)."""
        action = entry.get("action") if isinstance(entry, dict) else None
        if not isinstance(action, dict):
            raise CheckpointError(f"{source}: key '{key}' has no 'action' object")
        for field in ("q01", "q99"):
            if field not in action:
                raise CheckpointError(f"{source}: '{key}.action' is missing field '{field}'")
        return cls(key=key, q01=action["q01"], q99=action["q99"], mask=action.get("mask"))

    def to_json(self) -> dict:
        action = {"q01": self.q01.tolist(), "q99": self.q99.tolist()}
        if self.mask is not None:
            action["mask"] = self.mask.tolist()
        return {"action": action}

    def unnormalize(self, x: np.ndarray, *, apply_mask: bool = False) -> np.ndarray:
        """Map normalized actions back to robot units.

        Args:
            x: (..., D) normalized actions.
            apply_mask: False reproduces NORA (every dim unnormalized); True leaves dims whose mask is
                False untouched (OpenVLA convention).

        Returns:
            (..., D) float64 actions.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.action_dim:
            raise CheckpointError(
                f"norm stats '{self.key}' have {self.action_dim} dims but the actions have {x.shape[-1]}"
            )
        out = 0.5 * (x + 1.0) * (self.q99 - self.q01) + self.q01
        if apply_mask:
            if self.mask is None:
                raise CheckpointError(f"norm stats '{self.key}' have no 'mask' but apply_mask=True")
            out = np.where(self.mask, out, x)
        return out

    def normalize(self, a: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`unnormalize` (all dims), clipped to [-1, 1] like NORA's training."""
        a = np.asarray(a, dtype=np.float64)
        span = np.where(self.q99 - self.q01 == 0, 1.0, self.q99 - self.q01)
        return np.clip(2.0 * (a - self.q01) / span - 1.0, -1.0, 1.0)
