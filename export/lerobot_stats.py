"""Action statistics from a LeRobot dataset (``meta/stats.json``) and the post-processing chain built from them.

Data flow: ``PATH`` (a LeRobot dataset root holding ``meta/stats.json``, or a JSON file of the same shape:
``{feature: {"min": [...], "max": [...], "mean": [...], "std": [...], ...}}``) --:func:`read_stats` (the
``stats_key`` feature, every needed field checked)--> (min, max, mean, std) --:func:`build_chain` (mode,
gripper steps, validated against the checkpoint's action dim)--> the manifest's ``postprocess`` section.

NORA's LeRobot fine-tuning (declare-lab/nora ``lerobot_training/lerobot_training.py``) normalizes actions with
LeRobot's MIN_MAX mode from these statistics, hence min_max by default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from nora_edge.actions.normalize import NormStats
from nora_edge.actions.postprocess import (
    MEAN_STD,
    MIN_MAX,
    MODE_FIELDS,
    Q01_Q99,
    Chain,
    default_chain,
    gripper_step,
    unnormalize_step,
)
from nora_edge.errors import ExportError, InputError

STATS_JSON = "meta/stats.json"


def stats_file(path: str | Path) -> Path:
    """The stats JSON: ``path`` itself, or ``path/meta/stats.json`` for a dataset root."""
    p = Path(path)
    if p.is_dir():
        p = p / STATS_JSON
    if not p.is_file():
        raise ExportError(f"{p}: statistics file not found (a LeRobot dataset root or its {STATS_JSON})")
    return p


def read_stats(path: str | Path, key: str = "action", mode: str = MIN_MAX) -> tuple[Path, dict[str, list]]:
    """The fields ``mode`` needs from ``stats[key]``.

    Returns:
        (the file read, {"min", "max"} or {"mean", "std"} -> (D,) lists as written).

    Raises:
        ExportError: unreadable JSON, a missing key or field, naming the file and field.
    """
    p = stats_file(path)
    if mode not in (MIN_MAX, MEAN_STD):
        raise ExportError(f"{p}: norm mode must be '{MIN_MAX}' or '{MEAN_STD}', got {mode!r}")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{p}: not readable JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get(key), dict):
        known = sorted(data) if isinstance(data, dict) else []
        raise ExportError(f"{p}: no feature '{key}' (an object of statistics); features: {known}")
    entry = data[key]
    out = {}
    for name in MODE_FIELDS[mode]:
        if name not in entry:
            raise ExportError(
                f"{p}: field '{key}.{name}' is missing (mode {mode} needs {list(MODE_FIELDS[mode])})"
            )
        out[name] = entry[name]
    return p, out


def build_chain(
    action_dim: int,
    norm_stats: Mapping[str, NormStats],
    *,
    stats: str | Path | None = None,
    stats_key: str = "action",
    norm_mode: str = MIN_MAX,
    gripper: Sequence[str] = (),
    mask: Sequence[bool] | None = None,
) -> Chain:
    """The manifest's post-processing chain for an export.

    Args:
        action_dim: D of the checkpoint's FAST codec.
        norm_stats: the checkpoint's q01/q99 stats (used when ``stats`` is None).
        stats: a LeRobot dataset root or stats JSON; None keeps NORA's q01/q99 by the caller's unnorm key.
        stats_key: the feature in the stats file ("action").
        norm_mode: "min_max" (NORA's LeRobot fine-tuning) or "mean_std".
        gripper: gripper steps in order, ``"OP[:DIM]"`` (rescale, binarize, invert; DIM default -1).
        mask: (D,) per-dimension unnormalize mask (False: dimension left as the model produced it), or None.

    Raises:
        ExportError: naming the stats file and field (dims != action dim, NaN/inf, min >= max, std <= 0), an
            unknown gripper op, a dim out of range or a step applied twice.
    """
    if stats is None:
        first = unnormalize_step(
            Q01_Q99, source=default_chain().steps[0].source, error=ExportError, mask=mask
        )
    else:
        p, fields = read_stats(stats, stats_key, norm_mode)
        source = f"{p.name if p.name != 'stats.json' else STATS_JSON}[{stats_key}]"
        first = unnormalize_step(
            norm_mode, fields, source=source, error=ExportError, where=f"{p}: {stats_key}", mask=mask
        )
    try:
        steps = [gripper_step(g) for g in gripper]
    except InputError as e:
        raise ExportError(f"--gripper: {e}") from e
    chain = Chain((first, *steps))
    where = f"postprocess (stats {p}, feature '{stats_key}')" if stats is not None else "postprocess"
    return chain.validate(action_dim, norm_stats, ExportError, where)
