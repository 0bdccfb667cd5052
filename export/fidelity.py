"""Fidelity of a quantized bundle against the fp32 reference, on held-out observations.

Data flow: held-out (image, instruction) samples -> reference run (an fp32 bundle in NoraPolicy, or the
PyTorch ``ReferencePolicy``) and candidate run (the quantized bundle in NoraPolicy, its vision and decoder
sessions wrapped to record the image embeddings and the logits of every step) -> :class:`PolicyRun` pairs;
with a bundle reference also a *decoder-only* candidate run (the candidate decoder fed the reference's image
embeddings, so its numbers hold the decoder's error alone) -> :func:`compare_runs` (one raw record per
sample: id sequences, per-step logits cosines, image-embedding cosine, both action chunks, token classes,
malformed-decode reasons) -> :func:`aggregate` (computed from the records only) -> ``fidelity_report.json``
(aggregates + raw records, so every aggregate can be recomputed) and ``fidelity_report.md``.

NoraPolicy runs load with ``forced_tokens="flag"``: a chunk the model did not fully choose is returned with its
token classes ("model", "repaired", "forced_continue"; ``nora_edge.generate.TOKEN_CLASSES``) so the rates can
be counted instead of the chunk being refused.

Definitions (per sample):
  token agreement   positions where both id sequences hold the same id / the longer length (1 if both empty).
  first divergence  first position where the id sequences differ (a length difference counts); None if equal.
  logits cosine     cosine of the two head-row logit vectors at every step whose context is identical in both
                    runs (steps 0 .. first divergence, inclusive); the logits that chose each token.
  image-embeds cos. cosine of the two (merged, H) vision outputs, flattened.
  action error      per DoF over the chunk's T steps, in robot units: L2 = sqrt(sum_t d^2), max = max_t |d|;
                    only when both runs decoded (a malformed decode is counted, never compared). As a fraction
                    of the DoF's q01..q99 range it is |d normalized| / 2 (NORA unnormalizes every dim linearly).
  gripper flips     time steps where the normalized gripper value (dim ``gripper_dim``) has a different sign.
  repaired / forced chunks with at least one "repaired" / "forced_continue" token (what the runtime's default
                    ``forced_tokens="raise"`` refuses); malformed: chunks that did not decode.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nora_edge.atomic import write_text_atomic
from nora_edge.errors import InputError

from .fidelity_runs import PolicyRun, recording_policy, run_nora, run_reference

REPORT_JSON = "fidelity_report.json"
REPORT_MD = "fidelity_report.md"
SCHEMA = 2  # 2: image-embeds and decoder-only fields, token classes, rates, action error fractions


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


def _id_fields(ref: PolicyRun, test: PolicyRun) -> tuple[float, int | None, list[float] | None]:
    """(token agreement, first divergence, per-step logits cosines or None) of two runs."""
    r_ids, t_ids = np.asarray(ref.ids, np.int64), np.asarray(test.ids, np.int64)
    longest = max(r_ids.size, t_ids.size)
    n = min(r_ids.size, t_ids.size)
    agree = int((r_ids[:n] == t_ids[:n]).sum())
    div = first_divergence(r_ids, t_ids)
    cosines = None
    if ref.step_logits is not None and test.step_logits is not None:
        shared = min(len(ref.step_logits), len(test.step_logits), (div + 1) if div is not None else longest)
        cosines = [cosine(ref.step_logits[i], test.step_logits[i]) for i in range(shared)]
    return (agree / longest if longest else 1.0), div, cosines


def _list(x) -> list | None:
    return None if x is None else np.asarray(x, np.float64).tolist()


def compare_runs(
    index: int,
    instruction: str,
    ref: PolicyRun,
    test: PolicyRun,
    gripper_dim: int,
    decoder_only: PolicyRun | None = None,
) -> dict:
    """The raw record of one sample (JSON-ready; see the module docstring for the definitions).

    Args:
        decoder_only: the candidate decoder's run on the reference's image embeddings (``decoder_*`` fields).
    """
    agree, div, cosines = _id_fields(ref, test)
    emb_cos = None
    if ref.image_embeds is not None and test.image_embeds is not None:
        emb_cos = cosine(ref.image_embeds, test.image_embeds)
    record = {
        "index": index,
        "instruction": instruction,
        "ref_ids": np.asarray(ref.ids, np.int64).tolist(),
        "test_ids": np.asarray(test.ids, np.int64).tolist(),
        "token_agreement": agree,
        "exact_match": div is None,
        "first_divergence": div,
        "logits_cosine": cosines,
        "image_embeds_cosine": emb_cos,
        "ref_classes": None if ref.classes is None else list(ref.classes),
        "test_classes": None if test.classes is None else list(test.classes),
        "decoder_ids": None,
        "decoder_token_agreement": None,
        "decoder_first_divergence": None,
        "decoder_logits_cosine": None,
        "ref_error": ref.error,
        "test_error": test.error,
        "ref_actions": _list(ref.actions),
        "test_actions": _list(test.actions),
        "ref_normalized": _list(ref.normalized),
        "test_normalized": _list(test.normalized),
        "action_l2": None,
        "action_max": None,
        "gripper_flips": None,
    }
    if decoder_only is not None:
        d_agree, d_div, d_cos = _id_fields(ref, decoder_only)
        record["decoder_ids"] = np.asarray(decoder_only.ids, np.int64).tolist()
        record["decoder_token_agreement"] = d_agree
        record["decoder_first_divergence"] = d_div
        record["decoder_logits_cosine"] = d_cos
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
def _mean(xs: list) -> float | None:
    return float(np.mean(xs)) if xs else None


def _class_stats(records: Sequence[dict], side: str) -> tuple[dict | None, float | None, float | None]:
    """(token counts per class, repaired-chunk rate, forced-chunk rate) of one side ("ref" / "test")."""
    from nora_edge.generate import TOKEN_CLASSES

    known = [r[f"{side}_classes"] for r in records if r[f"{side}_classes"] is not None]
    if not known:
        return None, None, None
    counts = {c: sum(cl.count(c) for cl in known) for c in TOKEN_CLASSES}
    repaired = sum("repaired" in cl for cl in known) / len(known)
    forced = sum("forced_continue" in cl for cl in known) / len(known)
    return counts, repaired, forced


def _increase(test: float | None, ref: float | None) -> float | None:
    return None if test is None or ref is None else test - ref


def aggregate(records: Sequence[dict]) -> dict:
    """Summary numbers, each a function of the raw records alone.

    Returns:
        n; end to end: token_agreement_mean, exact_match_rate, first_divergence_min / _mean (over the
        samples that diverge), logits_cosine_mean (mean of per-sample means), logits_cosine_min (over every
        compared step); vision: image_embeds_cosine_mean / _min; decoder alone (on the reference's image
        embeddings): decoder_token_agreement_mean, decoder_exact_match_rate, decoder_logits_cosine_mean /
        _min; actions: n_action_compared, action_l2_mean_per_dof, action_max_per_dof, action_l2_mean (robot
        units), action_err_frac_mean / _max (fraction of the q01..q99 range), gripper_flip_samples,
        gripper_flips_total, gripper_flip_rate (per compared time step); rates per chunk: malformed_ref /
        malformed_test (counts), malformed_rate_*, repaired_rate_*, forced_continue_rate_* for ref, test and
        increase (test - ref); token_classes_ref / _test (token counts per class). None = not measured.
    """
    if not records:
        raise InputError("fidelity: no records to aggregate")
    n = len(records)
    cos = [r["logits_cosine"] for r in records if r["logits_cosine"]]
    dec = [r for r in records if r["decoder_ids"] is not None]
    dec_cos = [r["decoder_logits_cosine"] for r in dec if r["decoder_logits_cosine"]]
    emb = [r["image_embeds_cosine"] for r in records if r["image_embeds_cosine"] is not None]
    divs = [r["first_divergence"] for r in records if r["first_divergence"] is not None]
    acted = [r for r in records if r["action_l2"] is not None]
    out = {
        "n": n,
        "token_agreement_mean": float(np.mean([r["token_agreement"] for r in records])),
        "exact_match_rate": float(np.mean([r["exact_match"] for r in records])),
        "first_divergence_min": min(divs) if divs else None,
        "first_divergence_mean": _mean(divs),
        "logits_cosine_mean": _mean([np.mean(c) for c in cos]),
        "logits_cosine_min": float(min(min(c) for c in cos)) if cos else None,
        "image_embeds_cosine_mean": _mean(emb),
        "image_embeds_cosine_min": float(min(emb)) if emb else None,
        "decoder_token_agreement_mean": _mean([r["decoder_token_agreement"] for r in dec]),
        "decoder_exact_match_rate": _mean([r["decoder_first_divergence"] is None for r in dec]),
        "decoder_logits_cosine_mean": _mean([np.mean(c) for c in dec_cos]),
        "decoder_logits_cosine_min": float(min(min(c) for c in dec_cos)) if dec_cos else None,
        "n_action_compared": len(acted),
        "action_l2_mean_per_dof": None,
        "action_max_per_dof": None,
        "action_l2_mean": None,
        "action_err_frac_mean": None,
        "action_err_frac_max": None,
        "gripper_flip_samples": sum(1 for r in acted if r["gripper_flips"]),
        "gripper_flips_total": int(sum(r["gripper_flips"] for r in acted)),
        "gripper_flip_rate": None,
        "malformed_ref": sum(1 for r in records if r["ref_error"] is not None),
        "malformed_test": sum(1 for r in records if r["test_error"] is not None),
    }
    out["malformed_rate_ref"] = out["malformed_ref"] / n
    out["malformed_rate_test"] = out["malformed_test"] / n
    out["malformed_rate_increase"] = out["malformed_rate_test"] - out["malformed_rate_ref"]
    counts_ref, rep_ref, forced_ref = _class_stats(records, "ref")
    counts_test, rep_test, forced_test = _class_stats(records, "test")
    out.update(
        repaired_rate_ref=rep_ref,
        repaired_rate_test=rep_test,
        repaired_rate_increase=_increase(rep_test, rep_ref),
        forced_continue_rate_ref=forced_ref,
        forced_continue_rate_test=forced_test,
        forced_continue_rate_increase=_increase(forced_test, forced_ref),
        token_classes_ref=counts_ref,
        token_classes_test=counts_test,
    )
    if acted:
        l2 = np.array([r["action_l2"] for r in acted])  # (S, D)
        mx = np.array([r["action_max"] for r in acted])  # (S, D)
        frac = np.stack(
            [np.abs(np.subtract(r["test_normalized"], r["ref_normalized"])) / 2 for r in acted]
        )  # (S, T, D)
        out["action_l2_mean_per_dof"] = l2.mean(axis=0).tolist()
        out["action_max_per_dof"] = mx.max(axis=0).tolist()
        out["action_l2_mean"] = float(l2.mean())
        out["action_err_frac_mean"] = float(frac.mean())
        out["action_err_frac_max"] = float(frac.max())
        out["gripper_flip_rate"] = out["gripper_flips_total"] / (frac.shape[0] * frac.shape[1])
    return out


# --- writing -------------------------------------------------------------------------------------------


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v, digits) for v in x) + "]"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _classes_txt(classes: list[str] | None) -> str:
    if classes is None:
        return "n/a"
    return f"{classes.count('repaired')}/{classes.count('forced_continue')}"


def render_markdown(report: dict) -> str:
    """The human-readable report: the gate (when quantize checked one), summary, then one line per sample."""
    agg = report["aggregates"]
    lines = [
        f"# Fidelity: {report['candidate']} vs {report['reference']}",
        "",
        f"{agg['n']} held-out samples; gripper dim {report['gripper_dim']}; decoding "
        f"{'constrained' if report.get('constrained', True) else 'unconstrained'}.",
        "",
    ]
    gate = report.get("validation")
    if gate is not None and gate.get("metrics"):
        lines += [f"Thresholds (recipe '{gate.get('recipe')}'): **{gate['status']}**", ""]
        lines += ["| component | metric | value | threshold | result |", "|---|---|---|---|---|"]
        for m in gate["metrics"]:
            verdict = "pass" if m["passed"] else "FAIL"
            lines.append(
                f"| {m['component']} | {m['metric']} | {_fmt(m['value'])} | {m['op']} {_fmt(m['threshold'])} "
                f"| {verdict} |"
            )
        lines.append("")
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in agg.items()]
    lines += [
        "",
        "| # | instruction | token agr. | first div. | cos mean | emb. cos | decoder agr. | L2 mean | gripper flips "
        "| repaired/forced (test) | malformed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["records"]:
        cos = float(np.mean(r["logits_cosine"])) if r["logits_cosine"] else None
        l2 = float(np.mean(r["action_l2"])) if r["action_l2"] is not None else None
        bad = ", ".join(k for k in ("ref_error", "test_error") if r[k] is not None) or "-"
        lines.append(
            f"| {r['index']} | {r['instruction'][:40]} | {_fmt(r['token_agreement'])} | "
            f"{_fmt(r['first_divergence'])} | {_fmt(cos)} | {_fmt(r['image_embeds_cosine'], 6)} | "
            f"{_fmt(r['decoder_token_agreement'])} | {_fmt(l2)} | {_fmt(r['gripper_flips'])} | "
            f"{_classes_txt(r['test_classes'])} | {bad} |"
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

    With a bundle reference every sample also runs the candidate's decoder on the reference's image
    embeddings (the ``decoder_*`` numbers: the decoder's own error, without the vision graph's).

    Returns:
        the report dict (``aggregates`` and ``records``).
    """
    if not samples:
        raise InputError("fidelity_report: no held-out samples")
    is_torch_ref = type(reference).__name__ == "ReferencePolicy"
    # one model loaded at a time: every reference run first (a 3B fp32 bundle holds ~14 GB)
    ref = reference if is_torch_ref else recording_policy(reference, constrained=constrained)
    run_ref = run_reference if is_torch_ref else run_nora
    ref_runs = [run_ref(ref, s.image, s.instruction, unnorm_key) for s in samples]
    del ref
    test = recording_policy(candidate, constrained=constrained)
    records = []
    for i, (s, r) in enumerate(zip(samples, ref_runs, strict=True)):
        run = run_nora(test, s.image, s.instruction, unnorm_key)
        dec = None
        if r.image_embeds is not None:
            dec = run_nora(test, s.image, s.instruction, unnorm_key, image_embeds=r.image_embeds)
        records.append(compare_runs(i, s.instruction, r, run, gripper_dim, dec))
    names = labels or (_label(reference), _label(candidate))
    meta = {
        "reference": names[0],
        "candidate": names[1],
        "gripper_dim": gripper_dim,
        "constrained": constrained,
        "forced_tokens": "flag",
    }
    if out_dir is None:
        return {"schema": SCHEMA, **meta, "aggregates": aggregate(records), "records": records}
    return write_report(out_dir, records, meta)


def _label(obj) -> str:
    if isinstance(obj, str | os.PathLike):
        return Path(obj).name
    bundle = getattr(obj, "bundle", None)
    return bundle.path.name if bundle is not None else type(obj).__name__
