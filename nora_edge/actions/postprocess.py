"""The action post-processing chain: normalized FAST actions -> the robot's own units and gripper convention.

Data flow: manifest ``postprocess`` (ordered list of steps) --:meth:`Chain.from_json` (every field checked)-->
:class:`Chain` --:meth:`Chain.validate` (action dim, stats, keys, order)--> the runtime binds the q01/q99 stats
(:meth:`Chain.stats_for`) and applies the steps in order in float64 (:meth:`Chain.apply`).

Steps (each explicit in the manifest, with its parameters and where they came from):

- ``{"op": "unnormalize", "mode": "q01_q99", "key": K | null, "source": "norm_stats.json"}``: NORA's own
  ``a = 0.5 * (x + 1) * (q99 - q01) + q01`` (declare-lab/nora ``inference/nora.py``, ``Nora.inference``) with
  the stats of key K from the bundle's ``norm_stats`` (null: the caller's unnorm key, today's behaviour).
- ``{"op": "unnormalize", "mode": "min_max", "min": [...], "max": [...], "source": ...}``: LeRobot's
  ``Unnormalize`` MIN_MAX, ``a = (x + 1) / 2 * (max - min) + min`` (huggingface/lerobot
  ``lerobot/common/policies/normalize.py``; the 1e-8 eps is only in ``Normalize``'s denominators).
- ``{"op": "unnormalize", "mode": "mean_std", "mean": [...], "std": [...], "source": ...}``: LeRobot MEAN_STD,
  ``a = x * std + mean`` (same file, no eps on unnormalize).
- any unnormalize may carry ``"mask": [bool] * D``: False leaves that dim as the model produced it.
- ``{"op": "gripper_rescale", "dim": d}``: ``a[d] = 2 * (a[d] - 0) / (1 - 0) - 1`` ([0, 1] -> [-1, 1]);
  ``{"op": "gripper_binarize", "dim": d}``: ``a[d] = sign(a[d])`` (together: NORA's
  ``normalize_gripper_action(action, binarize=True)``, ``inference/nora.py``);
  ``{"op": "gripper_invert", "dim": d}``: ``a[d] = a[d] * -1.0`` (``invert_gripper_action``).

A manifest without the section holds :func:`default_chain` (q01_q99 by the caller's key over every dim).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nora_edge.actions.normalize import NormStats
from nora_edge.errors import InputError, NoraEdgeError

UNNORMALIZE = "unnormalize"
GRIPPER_OPS = ("gripper_rescale", "gripper_binarize", "gripper_invert")
OPS = (UNNORMALIZE, *GRIPPER_OPS)
Q01_Q99, MIN_MAX, MEAN_STD = "q01_q99", "min_max", "mean_std"
MODE_FIELDS = {Q01_Q99: (), MIN_MAX: ("min", "max"), MEAN_STD: ("mean", "std")}
NORM_STATS_SOURCE = "norm_stats.json"
_FIELDS = {UNNORMALIZE: {"op", "mode", "key", "source", "mask", "min", "max", "mean", "std"}}
_FIELDS.update({op: {"op", "dim"} for op in GRIPPER_OPS})


@dataclass(frozen=True, eq=False)
class Step:
    """One chain step.

    Attributes:
        op: one of :data:`OPS`.
        mode: unnormalize only: "q01_q99", "min_max" or "mean_std".
        key: q01_q99 only: the norm_stats key, or None for the caller's unnorm key.
        params: min_max: {"min", "max"}; mean_std: {"mean", "std"}; each (D,) float64.
        mask: unnormalize only: (D,) bool, False = dim left as produced, or None (every dim).
        dim: gripper steps only: the action dimension (negative counts from the end).
        source: where the statistics came from (e.g. "meta/stats.json[action]").
    """

    op: str
    mode: str | None = None
    key: str | None = None
    params: Mapping[str, np.ndarray] | None = None
    mask: np.ndarray | None = None
    dim: int | None = None
    source: str = ""

    def to_json(self) -> dict:
        if self.op != UNNORMALIZE:
            return {"op": self.op, "dim": self.dim}
        d: dict = {"op": self.op, "mode": self.mode}
        if self.mode == Q01_Q99:
            d["key"] = self.key
        for name in MODE_FIELDS[self.mode]:
            d[name] = [float(v) for v in self.params[name]]
        if self.mask is not None:
            d["mask"] = [bool(v) for v in self.mask]
        d["source"] = self.source
        return d

    def describe(self) -> str:
        """One line for ``nora-edge info``."""
        if self.op != UNNORMALIZE:
            return f"{self.op} dim {self.dim}"
        what = f"key {self.key!r}" if self.mode == Q01_Q99 and self.key else "the caller's unnorm key"
        if self.mode != Q01_Q99:
            what = ", ".join(f"{n} {_short(self.params[n])}" for n in MODE_FIELDS[self.mode])
        mask = f", mask {[int(m) for m in self.mask]}" if self.mask is not None else ""
        return f"unnormalize {self.mode} ({what}{mask}) from {self.source or '?'}"


def _short(v: np.ndarray) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"


def _fail(error: type[NoraEdgeError], where: str, msg: str) -> None:
    raise error(f"{where}: {msg}")


def _vector(value, error: type[NoraEdgeError], where: str) -> np.ndarray:
    """A non-empty list of real numbers -> (D,) float64 (bools and strings rejected)."""
    ok = isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0
    if ok and not isinstance(value, np.ndarray):
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    arr = np.asarray(value, dtype=np.float64) if ok else None
    if arr is None or arr.ndim != 1:
        _fail(error, where, f"must be a non-empty list of numbers, got {value!r:.80}")
    if not np.isfinite(arr).all():
        bad = [i for i, v in enumerate(arr) if not math.isfinite(v)]
        _fail(error, where, f"holds NaN/inf at dims {bad}")
    return arr


def parse_step(d, error: type[NoraEdgeError], w: str) -> Step:
    """One step object -> :class:`Step`; ``error`` names ``w.field`` (unknown op/mode/field, bad types, NaN/inf)."""
    if not isinstance(d, dict):
        _fail(error, w, f"must be an object, got {d!r:.80}")
    op = d.get("op")
    if op not in OPS:
        _fail(error, f"{w}.op", f"unknown op {op!r}; known: {list(OPS)}")
    extra = sorted(set(d) - _FIELDS[op])
    if extra:
        _fail(error, w, f"unknown field(s) {extra} for op '{op}'")
    if op != UNNORMALIZE:
        dim = d.get("dim")
        if isinstance(dim, bool) or not isinstance(dim, int):
            _fail(error, f"{w}.dim", f"must be an int, got {dim!r}")
        return Step(op, dim=dim)
    mode = d.get("mode")
    if mode not in MODE_FIELDS:
        _fail(error, f"{w}.mode", f"unknown mode {mode!r}; known: {list(MODE_FIELDS)}")
    key = d.get("key")
    if mode == Q01_Q99 and key is not None and not isinstance(key, str):
        _fail(error, f"{w}.key", f"must be a string or null, got {key!r}")
    if mode != Q01_Q99 and key is not None:
        _fail(error, f"{w}.key", f"only mode q01_q99 takes an unnorm key (mode is {mode})")
    for name in set(("min", "max", "mean", "std")) - set(MODE_FIELDS[mode]):
        if name in d:
            _fail(error, f"{w}.{name}", f"is not a parameter of mode {mode}")
    params = {}
    for name in MODE_FIELDS[mode]:
        if name not in d:
            _fail(error, w, f"mode {mode} needs field '{name}'")
        params[name] = _vector(d[name], error, f"{w}.{name}")
    mask = d.get("mask")
    if mask is not None:
        if not isinstance(mask, list) or not mask or not all(isinstance(m, bool) for m in mask):
            _fail(error, f"{w}.mask", f"must be a non-empty list of booleans, got {mask!r:.80}")
        mask = np.asarray(mask, dtype=bool)
    source = d.get("source", "")
    if not isinstance(source, str):
        _fail(error, f"{w}.source", f"must be a string, got {source!r:.80}")
    return Step(UNNORMALIZE, mode, key, params or None, mask, None, source)


@dataclass(frozen=True, eq=False)
class Chain:
    """An ordered, validated list of :class:`Step` (exactly one unnormalize, first)."""

    steps: tuple[Step, ...]

    @property
    def unnormalize(self) -> Step:
        return self.steps[0]

    @property
    def takes_unnorm_key(self) -> bool:
        """True when the caller picks the q01/q99 key per call (default chain); else pass unnorm_key=None."""
        s = self.unnormalize
        return s.mode == Q01_Q99 and s.key is None

    @classmethod
    def from_json(cls, data, error: type[NoraEdgeError], where: str) -> Chain:
        """Parse the manifest section (a list of step objects); ``error`` names ``where[i].field``."""
        if not isinstance(data, list) or not data:
            _fail(error, where, f"must be a non-empty list of steps, got {data!r:.80}")
        return cls(tuple(parse_step(d, error, f"{where}[{i}]") for i, d in enumerate(data)))

    def to_json(self) -> list[dict]:
        return [s.to_json() for s in self.steps]

    def describe(self) -> list[str]:
        return [s.describe() for s in self.steps]

    def validate(
        self,
        action_dim: int,
        norm_stats: Mapping[str, NormStats],
        error: type[NoraEdgeError],
        where: str,
    ) -> Chain:
        """Check the chain against the action dimension and the bundle's q01/q99 stats; returns self.

        Raises:
            error: naming ``where[i].field``: unnormalize missing, not first or applied twice; a gripper step
                applied twice on one dim (or rescale after binarize); a dim out of range; statistics whose
                length differs from ``action_dim``, NaN/inf, min >= max, std <= 0; an unnorm key that does not
                exist; a mask of the wrong length.
        """
        D = int(action_dim)
        unnorm = [i for i, s in enumerate(self.steps) if s.op == UNNORMALIZE]
        if unnorm != [0]:
            _fail(error, where, f"needs exactly one unnormalize step, first; it is at steps {unnorm}")
        seen: dict[tuple[str, int], int] = {}
        for i, s in enumerate(self.steps):
            w = f"{where}[{i}]"
            if s.op != UNNORMALIZE:
                if not -D <= s.dim < D:
                    _fail(error, f"{w}.dim", f"{s.dim} is out of range for action dim {D}")
                d = s.dim % D
                if (s.op, d) in seen:
                    _fail(error, w, f"{s.op} on dim {d} applied twice (steps {seen[(s.op, d)]} and {i})")
                if s.op == "gripper_rescale" and ("gripper_binarize", d) in seen:
                    _fail(
                        error, w, f"gripper_rescale on dim {d} after gripper_binarize (rescale comes first)"
                    )
                seen[(s.op, d)] = i
                continue
            if s.mask is not None and s.mask.shape != (D,):
                _fail(error, f"{w}.mask", f"has {s.mask.size} entries, the action dim is {D}")
            if s.mode == Q01_Q99:
                if s.key is not None and s.key not in norm_stats:
                    _fail(
                        error, f"{w}.key", f"unnorm key {s.key!r} does not exist; known: {sorted(norm_stats)}"
                    )
                keys = [s.key] if s.key is not None else sorted(norm_stats)
                if not keys:
                    _fail(error, w, "q01_q99 needs norm_stats, and there are none")
                for k in keys:
                    if norm_stats[k].action_dim != D:
                        _fail(
                            error,
                            w,
                            f"norm_stats '{k}' have {norm_stats[k].action_dim} dims, codec.action_dim {D}",
                        )
                continue
            for name, v in s.params.items():
                if v.shape != (D,):
                    _fail(
                        error,
                        f"{w}.{name}",
                        f"has {v.size} dims, the action dim is {D} (from {s.source or '?'})",
                    )
            if s.mode == MIN_MAX:
                bad = np.nonzero(s.params["min"] >= s.params["max"])[0].tolist()
                if bad:
                    _fail(error, f"{w}.min", f"min >= max at dims {bad} (from {s.source or '?'})")
            else:
                bad = np.nonzero(s.params["std"] <= 0)[0].tolist()
                if bad:
                    _fail(error, f"{w}.std", f"std <= 0 at dims {bad} (from {s.source or '?'})")
        return self

    def stats_for(self, norm_stats: Mapping[str, NormStats], unnorm_key: str | None) -> NormStats | None:
        """The q01/q99 stats the unnormalize step uses for this call (None for min_max / mean_std).

        Raises:
            InputError: unnorm_key missing with several keys, unknown, or given although the chain's statistics
                are fixed (the key would be ignored: the caller must know).
        """
        s = self.unnormalize
        if s.mode == Q01_Q99 and s.key is None:
            if unnorm_key is None:
                if len(norm_stats) != 1:
                    raise InputError(
                        f"unnorm_key is required: the bundle has {len(norm_stats)} keys {sorted(norm_stats)}"
                    )
                return next(iter(norm_stats.values()))
            if not isinstance(unnorm_key, str) or unnorm_key not in norm_stats:
                raise InputError(f"unknown unnorm_key {unnorm_key!r}; the bundle has {sorted(norm_stats)}")
            return norm_stats[unnorm_key]
        if unnorm_key is not None and unnorm_key != s.key:
            raise InputError(
                f"unnorm_key {unnorm_key!r} given, but the bundle's chain fixes its statistics "
                f"({s.describe()}); pass unnorm_key=None"
            )
        return norm_stats[s.key] if s.mode == Q01_Q99 else None

    def label(self, stats: NormStats | None) -> str:
        """What ChunkOutput.unnorm_key reports: the q01/q99 key, else the statistics' source."""
        return stats.key if stats is not None else self.unnormalize.source

    def apply(self, normalized: np.ndarray, stats: NormStats | None = None) -> np.ndarray:
        """Run every step in order.

        Args:
            normalized: (..., D) FAST-decoded actions in [-1, 1] space.
            stats: the q01/q99 stats from :meth:`stats_for` (q01_q99 chains only).

        Returns:
            (..., D) float64 actions in the robot's units and gripper convention (a new array).
        """
        x = np.asarray(normalized, dtype=np.float64)
        a = x.copy()
        for s in self.steps:
            if s.op == UNNORMALIZE:
                if s.mode == Q01_Q99:
                    if stats is None:
                        raise InputError("the chain unnormalizes with q01/q99 stats but none were given")
                    a = stats.unnormalize(x, apply_mask=False)
                elif s.mode == MIN_MAX:
                    lo, hi = s.params["min"], s.params["max"]
                    a = (x + 1.0) / 2.0 * (hi - lo) + lo
                else:
                    a = x * s.params["std"] + s.params["mean"]
                if s.mask is not None:
                    a = np.where(s.mask, a, x)
            elif s.op == "gripper_rescale":
                a[..., s.dim] = 2.0 * (a[..., s.dim] - 0.0) / (1.0 - 0.0) - 1.0
            elif s.op == "gripper_binarize":
                a[..., s.dim] = np.sign(a[..., s.dim])
            else:
                a[..., s.dim] = a[..., s.dim] * -1.0
        return a


def default_chain() -> Chain:
    """Today's behaviour and what a manifest without ``postprocess`` means: q01_q99 by the caller's key."""
    return Chain((Step(UNNORMALIZE, Q01_Q99, None, None, None, None, NORM_STATS_SOURCE),))


def unnormalize_step(
    mode: str,
    stats: Mapping[str, Sequence[float]] | None = None,
    *,
    key: str | None = None,
    source: str = "",
    error: type[NoraEdgeError] = InputError,
    where: str = "",
    mask: Sequence[bool] | None = None,
) -> Step:
    """An unnormalize step: q01_q99 (``key``) or min_max / mean_std with ``stats[min/max or mean/std]``;
    ``mask`` (D,) False leaves that dimension as the model produced it.

    Raises:
        error: unknown mode, a missing or non-numeric statistic, NaN/inf (range checks: :meth:`Chain.validate`).
    """
    if mode not in MODE_FIELDS:
        raise error(f"{source or 'stats'}: norm mode must be one of {list(MODE_FIELDS)}, got {mode!r}")
    d: dict = {"op": UNNORMALIZE, "mode": mode, "source": source or NORM_STATS_SOURCE}
    if mode == Q01_Q99:
        d["key"] = key
    for name in MODE_FIELDS[mode]:
        d[name] = (stats or {}).get(name)
    if mask is not None:
        d["mask"] = [bool(m) for m in mask]
    return parse_step(d, error, where or source or "stats")


def gripper_step(spec: str) -> Step:
    """``"OP[:DIM]"`` (OP: rescale, binarize, invert, or the full gripper_* name; DIM default -1) -> Step."""
    op, _, dim = str(spec).partition(":")
    op = op if op.startswith("gripper_") else f"gripper_{op}"
    if op not in GRIPPER_OPS:
        raise InputError(f"gripper step {spec!r}: op must be one of rescale, binarize, invert")
    try:
        d = int(dim) if dim else -1
    except ValueError as e:
        raise InputError(f"gripper step {spec!r}: dim {dim!r} is not an int") from e
    return Step(op, dim=d)
