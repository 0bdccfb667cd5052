"""Fidelity of a quantized bundle against the fp32 reference, on held-out observations.

Data flow: held-out (image, instruction) samples -> reference run (an fp32 bundle in NoraPolicy, or the
PyTorch ``ReferencePolicy``) and candidate run (the quantized bundle in NoraPolicy, its decoder session
wrapped to record the logits of every step) -> :class:`PolicyRun` pairs -> :func:`compare_runs` (one raw
record per sample: both id sequences, per-step logits cosines, both action chunks, malformed-decode reasons)
-> :func:`aggregate` (computed from the records only) -> ``fidelity_report.json`` (aggregates + raw records,
so every aggregate can be recomputed) and ``fidelity_report.md``.

Definitions (per sample):
  token agreement   positions where both id sequences hold the same id / the longer length (1 if both empty).
  logits cosine     cosine of the two head-row logit vectors at every step whose context is identical in both
                    runs (steps 0 .. first divergence, inclusive); the logits that chose each token.
  action error      per DoF over the chunk's T steps, in robot units: L2 = sqrt(sum_t d^2), max = max_t |d|;
                    only when both runs decoded (a malformed decode is counted, never compared).
  gripper flips     time steps where the normalized gripper value (dim ``gripper_dim``) has a different sign.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nora_edge.atomic import write_text_atomic
from nora_edge.errors import DetokenizationError, InputError

REPORT_JSON = "fidelity_report.json"
REPORT_MD = "fidelity_report.md"
SCHEMA = 1


@dataclass(frozen=True)
class PolicyRun:
    """One inference as the report sees it.

    Attributes:
        ids: (N,) int64 generated ids.
        step_logits: per generated token the (rows,) logits it was chosen from, or None when unavailable.
        actions: (T, D) float64 robot-unit actions, None when the decode was malformed.
        normalized: (T, D) float64 actions in [-1, 1] space, None when malformed.
        error: why the decode was malformed (None when it decoded).
    """

    ids: np.ndarray
    step_logits: list[np.ndarray] | None
    actions: np.ndarray | None
    normalized: np.ndarray | None
    error: str | None


# --- running policies ----------------------------------------------------------------------------------
def run_nora(policy, image: np.ndarray, instruction: str, unnorm_key: str | None = None) -> PolicyRun:
    """Run a NoraPolicy whose decoder session is a ``RecordingSession`` recording ``logits``.

    A DetokenizationError (possible in unconstrained mode) becomes a malformed run; other errors propagate.
    """
    from nora_edge import bundle as B

    recorder = policy.decoder.session
    start = len(recorder.outputs)
    try:
        out = policy.run_chunk(image, instruction, unnorm_key)
    except DetokenizationError as e:
        logits = [np.asarray(o[B.LOGITS])[0] for o in recorder.outputs[start:]]
        return PolicyRun(np.zeros(0, np.int64), logits, None, None, str(e))
    logits = [np.asarray(o[B.LOGITS])[0] for o in recorder.outputs[start:]]  # (rows,) per step
    return PolicyRun(np.asarray(out.ids, np.int64), logits[: len(out.ids)], out.actions, out.normalized, None)


def run_reference(reference, image: np.ndarray, instruction: str, unnorm_key: str | None = None) -> PolicyRun:
    """Run the PyTorch ``ReferencePolicy`` (no step logits; a malformed decode is reported, not zeroed)."""
    r = reference.predict_action_chunk(image, instruction, unnorm_key)
    if not r.well_formed:
        return PolicyRun(np.asarray(r.ids, np.int64), None, None, None, r.reason or "malformed")
    return PolicyRun(np.asarray(r.ids, np.int64), None, np.asarray(r.actions), np.asarray(r.normalized), None)


# --- per-sample comparison -----------------------------------------------------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity in float64 (1.0 for two zero vectors, 0.0 when only one is zero)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def first_divergence(a: np.ndarray, b: np.ndarray) -> int | None:
    """First index where the sequences differ (a length difference counts); None when identical."""
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    if diff.size:
        return int(diff[0])
    return None if a.size == b.size else n


def compare_runs(index: int, instruction: str, ref: PolicyRun, test: PolicyRun, gripper_dim: int) -> dict:
    """The raw record of one sample (JSON-ready; see the module docstring for the definitions)."""
    r_ids, t_ids = np.asarray(ref.ids, np.int64), np.asarray(test.ids, np.int64)
    longest = max(r_ids.size, t_ids.size)
    n = min(r_ids.size, t_ids.size)
    agree = int((r_ids[:n] == t_ids[:n]).sum())
    div = first_divergence(r_ids, t_ids)
    cosines = None
    if ref.step_logits is not None and test.step_logits is not None:
        shared = min(len(ref.step_logits), len(test.step_logits), (div + 1) if div is not None else longest)
        cosines = [cosine(ref.step_logits[i], test.step_logits[i]) for i in range(shared)]
    record = {
        "index": index,
        "instruction": instruction,
        "ref_ids": r_ids.tolist(),
        "test_ids": t_ids.tolist(),
        "token_agreement": agree / longest if longest else 1.0,
        "exact_match": div is None,
        "first_divergence": div,
        "logits_cosine": cosines,
        "ref_error": ref.error,
        "test_error": test.error,
        "ref_actions": None if ref.actions is None else np.asarray(ref.actions, np.float64).tolist(),
        "test_actions": None if test.actions is None else np.asarray(test.actions, np.float64).tolist(),
        "ref_normalized": None if ref.normalized is None else np.asarray(ref.normalized, np.float64).tolist(),
        "test_normalized": None
        if test.normalized is None
        else np.asarray(test.normalized, np.float64).tolist(),
        "action_l2": None,
        "action_max": None,
        "gripper_flips": None,
    }
    if ref.actions is not None and test.actions is not None:
        a, b = np.asarray(ref.actions, np.float64), np.asarray(test.actions, np.float64)
        if a.shape != b.shape:
            raise InputError(f"sample {index}: action chunks differ in shape {a.shape} vs {b.shape}")
        d = b - a  # (T, D)
        record["action_l2"] = np.sqrt((d**2).sum(axis=0)).tolist()  # (D,)
        record["action_max"] = np.abs(d).max(axis=0).tolist()  # (D,)
        gr = np.asarray(ref.normalized, np.float64)[:, gripper_dim]  # (T,)
        gt = np.asarray(test.normalized, np.float64)[:, gripper_dim]
        record["gripper_flips"] = int((np.sign(gr) != np.sign(gt)).sum())
    return record


# --- aggregation (from records only) -------------------------------------------------------------------
def aggregate(records: Sequence[dict]) -> dict:
    """Summary numbers, each a function of the raw records alone.

    Returns:
        n, token_agreement_mean, exact_match_rate, logits_cosine_mean (mean of per-sample means),
        logits_cosine_min (over every compared step), n_action_compared, action_l2_mean_per_dof,
        action_max_per_dof, action_l2_mean (over DoF), gripper_flip_samples, gripper_flips_total,
        malformed_ref, malformed_test.
    """
    if not records:
        raise InputError("fidelity: no records to aggregate")
    cos = [r["logits_cosine"] for r in records if r["logits_cosine"]]
    acted = [r for r in records if r["action_l2"] is not None]
    out = {
        "n": len(records),
        "token_agreement_mean": float(np.mean([r["token_agreement"] for r in records])),
        "exact_match_rate": float(np.mean([r["exact_match"] for r in records])),
        "logits_cosine_mean": float(np.mean([np.mean(c) for c in cos])) if cos else None,
        "logits_cosine_min": float(min(min(c) for c in cos)) if cos else None,
        "n_action_compared": len(acted),
        "action_l2_mean_per_dof": None,
        "action_max_per_dof": None,
        "action_l2_mean": None,
        "gripper_flip_samples": sum(1 for r in acted if r["gripper_flips"]),
        "gripper_flips_total": int(sum(r["gripper_flips"] for r in acted)),
        "malformed_ref": sum(1 for r in records if r["ref_error"] is not None),
        "malformed_test": sum(1 for r in records if r["test_error"] is not None),
    }
    if acted:
        l2 = np.array([r["action_l2"] for r in acted])  # (S, D)
        mx = np.array([r["action_max"] for r in acted])  # (S, D)
        out["action_l2_mean_per_dof"] = l2.mean(axis=0).tolist()
        out["action_max_per_dof"] = mx.max(axis=0).tolist()
        out["action_l2_mean"] = float(l2.mean())
    return out


# --- writing -------------------------------------------------------------------------------------------


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v, digits) for v in x) + "]"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def render_markdown(report: dict) -> str:
    """The human-readable report: summary, then one line per sample."""
    agg = report["aggregates"]
    lines = [
        f"# Fidelity: {report['candidate']} vs {report['reference']}",
        "",
        f"{agg['n']} held-out samples; gripper dim {report['gripper_dim']}; decoding "
        f"{'constrained' if report.get('constrained', True) else 'unconstrained'}.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in agg.items()]
    lines += [
        "",
        "| # | instruction | token agr. | first div. | cos mean | L2 mean | gripper flips | malformed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["records"]:
        cos = float(np.mean(r["logits_cosine"])) if r["logits_cosine"] else None
        l2 = float(np.mean(r["action_l2"])) if r["action_l2"] is not None else None
        bad = ", ".join(k for k in ("ref_error", "test_error") if r[k] is not None) or "-"
        lines.append(
            f"| {r['index']} | {r['instruction'][:40]} | {_fmt(r['token_agreement'])} | "
            f"{_fmt(r['first_divergence'])} | {_fmt(cos)} | {_fmt(l2)} | {_fmt(r['gripper_flips'])} | {bad} |"
        )
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike[str], records: Sequence[dict], meta: dict) -> dict:
    """Write ``fidelity_report.json`` (meta + aggregates + raw records) and ``fidelity_report.md``.

    Returns:
        the report dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"schema": SCHEMA, **meta, "aggregates": aggregate(records), "records": list(records)}
    write_text_atomic(out_dir / REPORT_JSON, json.dumps(report, indent=1))
    write_text_atomic(out_dir / REPORT_MD, render_markdown(report))
    return report


# --- the whole report ----------------------------------------------------------------------------------
def recording_policy(bundle, *, constrained: bool = True, threads: int | None = None):
    """A CPU NoraPolicy for ``bundle`` (path or policy) whose decoder records its logits."""
    from nora_edge import bundle as B
    from nora_edge.policy import NoraPolicy

    from .quantize.calibration import RecordingSession

    policy = (
        bundle
        if isinstance(bundle, NoraPolicy)
        else NoraPolicy.load(bundle, providers="cpu", threads=threads, constrained=constrained, verify=False)
    )
    if not isinstance(policy.decoder.session, RecordingSession):
        policy.decoder.session = RecordingSession(policy.decoder.session, (B.LOGITS,))
    policy.decoder.session.record_feeds = False
    return policy


def fidelity_report(
    reference,
    candidate,
    samples: Sequence,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    unnorm_key: str | None = None,
    gripper_dim: int = -1,
    constrained: bool = True,
    labels: tuple[str, str] | None = None,
) -> dict:
    """Compare ``candidate`` with ``reference`` on ``samples`` and (optionally) write the report files.

    Args:
        reference: fp32 bundle path, a NoraPolicy, or a ``ReferencePolicy`` (PyTorch; no logits cosine).
        candidate: quantized bundle path or NoraPolicy.
        samples: held-out :class:`~nora_edge.export.quantize.calibration.CalibrationSample` list.
        out_dir: where to write ``fidelity_report.json`` / ``.md`` (None: only return the dict).
        unnorm_key: norm-stats key (None: the bundle's only key).
        gripper_dim: action dimension holding the gripper (default the last).
        constrained: decoding mode of the NoraPolicy runs.
        labels: (reference, candidate) names for the report (default: paths / class names).

    Returns:
        the report dict (``aggregates`` and ``records``).
    """
    if not samples:
        raise InputError("fidelity_report: no held-out samples")
    is_torch_ref = type(reference).__name__ == "ReferencePolicy"
    # one model loaded at a time: every reference run first (a 3B fp32 bundle holds ~14 GB), then the candidate
    ref = reference if is_torch_ref else recording_policy(reference, constrained=constrained)
    run_ref = run_reference if is_torch_ref else run_nora
    ref_runs = [run_ref(ref, s.image, s.instruction, unnorm_key) for s in samples]
    del ref
    test = recording_policy(candidate, constrained=constrained)
    records = [
        compare_runs(i, s.instruction, r, run_nora(test, s.image, s.instruction, unnorm_key), gripper_dim)
        for i, (s, r) in enumerate(zip(samples, ref_runs, strict=True))
    ]
    names = labels or (_label(reference), _label(candidate))
    meta = {
        "reference": names[0],
        "candidate": names[1],
        "gripper_dim": gripper_dim,
        "constrained": constrained,
    }
    if out_dir is None:
        return {"schema": SCHEMA, **meta, "aggregates": aggregate(records), "records": records}
    return write_report(out_dir, records, meta)


def _label(obj) -> str:
    if isinstance(obj, str | os.PathLike):
        return Path(obj).name
    bundle = getattr(obj, "bundle", None)
    return bundle.path.name if bundle is not None else type(obj).__name__
