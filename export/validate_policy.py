"""Validate what ships: ``NoraPolicy`` on the staged bundle files against NORA's unrestricted reference.

Data flow: staging dir + manifest sections --:func:`staged_bundle` (a provisional manifest, read back and
deleted at once: the final manifest is still the last file written)--> ``Bundle`` --``NoraPolicy.load(
providers="cpu", forced_tokens="flag")`` (constrained, the default runtime; nothing raises on forced tokens
during validation)--> per held-out pair (validate.PromptCase, holding NORA's ``ReferenceResult``):
  preprocessing + prompt builder vs the HF processor (pixel values, ids, mrope positions);
  ``run_chunk`` vs the reference: ids equal (minus the reference's end token: the constrained runtime stops
  when the chunk completes and never emits it) and actions within :data:`ACTION_ATOL` wherever the reference
  is well formed; where it is malformed (NORA would send its zeros fallback), where the runtime first left
  the reference's ids is classified and counted, never failed.
A head="full" bundle is also run unconstrained (HF-parity mode): its ids must equal the reference's on every
pair, and it must raise exactly where the reference is malformed.

What fails the export: a prompt or pixel mismatch; an id mismatch, an action over tolerance or a runtime error
on a pair whose reference is well formed; any HF-parity mismatch. A checkpoint whose reference is never well
formed (random weights) compares no ids; the manifest says so (``well_formed: 0``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nora_edge import bundle as B
from nora_edge.errors import DetokenizationError
from nora_edge.generate import TOKEN_CLASSES

# Actions: compared where the ids are (or must be) equal, so both sides decode the same FAST ids, the
# runtime with its byte table + iDCT + unnormalize (float64), the reference with FAST's decode (scipy iDCT) +
# unnormalize (float64). Two float64 implementations of the same math differ by rounding only (~1e-15 robot
# units for |a| <= ~1.5); measured 0.0 on the export's 50 + 50 held-out pairs of the trained tiny fixtures
# (h1, h5) with the default bundle (action head, fp16 table). The fp16 table moves the logits (3.1e-5
# relative on the fp32-weight tiny model, validate.py) but acts on actions only through an id flip, which the
# ids check catches. 1e-9 is 1e6 x the
# rounding bound and ~1e-6 of one FAST quantization step ((q99 - q01) / 2 / scale / sqrt(T) >= 8.7e-4 robot
# units on the fixtures' norm stats), so any decoded difference fails and rounding never does.
ACTION_ATOL = 1e-9
# Pixel values: the runtime's numpy resize / rescale / normalize vs the HF image processor. Measured 0.0 (max
# abs) on the held-out frames; the values are float32 in [-1.8, 2.2], so 1e-5 is ~40 float32 ulps: rounding
# order may differ, a wrong resize or normalization (>= 1e-2) may not.
PIXEL_ATOL = 1e-5


def staged_bundle(staging: Path, sections: dict) -> B.Bundle:
    """The staged files as a loaded Bundle, before the real manifest exists.

    A provisional manifest (sizes, no hashes; ``validation: {"provisional": true}``) is written, read back
    with ``Bundle.load`` (so the sections are checked exactly as the runtime reads them) and deleted at once.
    """
    from nora_edge import __version__

    files = {rel: {"size": (staging / rel).stat().st_size} for rel in B.list_files(staging)}
    manifest = {"schema_version": B.SCHEMA_VERSION, "nora_edge_version": __version__, "files": files}
    manifest.update(sections)
    manifest["validation"] = {"provisional": True}
    path = staging / B.MANIFEST
    path.write_text(json.dumps(manifest), encoding="utf-8")
    try:
        return B.Bundle.load(staging, verify=False)
    finally:
        path.unlink()


def check_inputs(policy, cases: list) -> dict:
    """The shipped preprocessing and prompt builder vs the HF processor on every pair."""
    from nora_edge.preprocess import preprocess_image

    bad_ids, bad_pos, err = [], [], 0.0
    for i, c in enumerate(cases):
        pixel_values, grid = preprocess_image(c.image, policy.image_spec)
        prompt = policy.prompt.build(c.instruction, grid)
        if tuple(int(v) for v in grid[0]) != c.grid or not np.array_equal(prompt.input_ids, c.input_ids):
            bad_ids.append(i)
        elif not np.array_equal(prompt.position_ids, c.position_ids):
            bad_pos.append(i)
        if pixel_values.shape == c.pixel_values.shape:
            err = max(err, float(np.abs(pixel_values.astype(np.float64) - c.pixel_values).max()))
        else:
            err = float("inf")
    return {
        "prompt_ids": {
            "prompts": len(cases),
            "mismatched": bad_ids,
            "mismatched_positions": bad_pos,
            "passed": not bad_ids and not bad_pos,
        },
        "preprocess": {
            "frames": len(cases),
            "max_abs_err": err,
            "tolerance": PIXEL_ATOL,
            "passed": bool(err <= PIXEL_ATOL),
        },
    }


def expected_ids(reference, end_ids: set[int]) -> np.ndarray:
    """The reference's ids without its final end token (the constrained runtime never emits one)."""
    ids = reference.ids
    return ids[:-1] if ids.size and int(ids[-1]) in end_ids else ids


def first_divergence(a: np.ndarray, b: np.ndarray) -> int:
    """First index where ``a`` and ``b`` differ (the shorter length when one is a prefix of the other)."""
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def classify_malformed(out, reference, head: set[int]) -> str:
    """Where the constrained runtime first left a malformed reference's ids, and why.

    Returns:
        "length_limit": the runtime agreed on every reference id; the reference hit its length limit (HF's
        default of 20 new tokens with Qwen2.5-VL's generation_config) before the chunk was complete.
        "model_agrees": the runtime's own top choice there was the reference's id; the automaton overrode it
        (an end before the chunk was complete, or an id that would break it).
        "outside_head": the reference chose an id the bundle's head has no row for (action head, text id).
        "disagree": the runtime's model chose another id where the reference's was available to it.
    """
    k = first_divergence(out.ids, reference.ids)
    if k >= reference.ids.size:
        return "length_limit"
    want = int(reference.ids[k])
    if k < out.top_ids.size and int(out.top_ids[k]) == want:
        return "model_agrees"
    return "outside_head" if want not in head else "disagree"


def compare_constrained(policy, cases: list, end_ids: set[int], head: set[int]) -> dict:
    """``run_chunk`` (constrained, forced tokens flagged) vs the reference on every pair; see module doc.

    Returns:
        the manifest entry: pairs; well_formed (references that decode); reference_truncated (references that
        ended without an end id, i.e. at HF's length limit); ids_equal, actions_compared, max_action_abs_err
        (over well-formed pairs); token_classes (every pair) and token_classes_by_reference; malformed
        (:func:`classify_malformed` counts); mismatched (first 10 {pair, step}); runtime_errors; passed.
    """
    classes = {"well_formed": dict.fromkeys(TOKEN_CLASSES, 0), "malformed": dict.fromkeys(TOKEN_CLASSES, 0)}
    malformed = dict.fromkeys(("length_limit", "model_agrees", "outside_head", "disagree"), 0)
    well = equal = compared = truncated = 0
    max_err = 0.0
    mismatched, errors = [], []
    for i, c in enumerate(cases):
        r = c.reference
        well += r.well_formed
        truncated += not r.ids.size or int(r.ids[-1]) not in end_ids  # HF stopped at its length limit
        try:
            out = policy.run_chunk(c.image, c.instruction, r.unnorm_key)
        except DetokenizationError as e:  # not expected from a constrained chunk in "flag" mode; counted
            errors.append({"pair": i, "well_formed": bool(r.well_formed), "error": str(e)[:200]})
            continue
        side = "well_formed" if r.well_formed else "malformed"
        for name, n in out.class_counts.items():
            classes[side][name] += n
        if not r.well_formed:
            malformed[classify_malformed(out, r, head)] += 1
            continue
        want = expected_ids(r, end_ids)
        if np.array_equal(out.ids, want):
            equal += 1
        else:
            mismatched.append({"pair": i, "step": first_divergence(out.ids, want)})
        compared += 1
        max_err = max(max_err, float(np.abs(out.actions - r.actions).max()))
    failed_runs = sum(e["well_formed"] for e in errors)
    return {
        "mode": policy.mode,
        "pairs": len(cases),
        "well_formed": well,
        "reference_truncated": truncated,
        "ids_equal": equal,
        "actions_compared": compared,
        "max_action_abs_err": max_err,
        "action_tolerance": ACTION_ATOL,
        "token_classes": {
            name: classes["well_formed"][name] + classes["malformed"][name] for name in TOKEN_CLASSES
        },
        "token_classes_by_reference": classes,
        "malformed": {"pairs": len(cases) - well, **malformed},
        "mismatched": mismatched[:10],
        "runtime_errors": errors[:10],
        "passed": bool(equal == well and max_err <= ACTION_ATOL and failed_runs == 0),
        "rule": "ids equal (minus the end token) and actions within action_tolerance on every pair whose "
        "reference is well formed; malformed references are counted, not failed",
    }


def compare_hf_parity(policy, cases: list) -> dict:
    """Unconstrained runtime (full head) vs the reference: ids equal on every pair, raises where malformed."""
    equal = raised = raised_where_malformed = 0
    max_err = 0.0
    mismatched = []
    for i, c in enumerate(cases):
        r = c.reference
        try:
            out = policy.run_chunk(c.image, c.instruction, r.unnorm_key)
            ids = out.ids
        except DetokenizationError:
            out, ids = None, policy.last_ids
            raised += 1
            raised_where_malformed += not r.well_formed
        if ids is not None and np.array_equal(ids, r.ids):
            equal += 1
        else:
            mismatched.append(i)
        if out is not None and r.well_formed:
            max_err = max(max_err, float(np.abs(out.actions - r.actions).max()))
    malformed = sum(not c.reference.well_formed for c in cases)
    return {
        "mode": policy.mode,
        "pairs": len(cases),
        "ids_equal": equal,
        "raised": raised,
        "reference_malformed": malformed,
        "max_action_abs_err": max_err,
        "action_tolerance": ACTION_ATOL,
        "mismatched": mismatched[:10],
        "passed": bool(
            equal == len(cases) and raised == malformed == raised_where_malformed and max_err <= ACTION_ATOL
        ),
    }


def check_runtime(staging: Path, sections: dict, cases: list) -> dict:
    """Load the shipped runtime from ``staging`` and compare it with the references; manifest entries.

    Returns:
        {"prompt_ids", "preprocess", "policy"} (+ "hf_parity" for a head="full" bundle), each with "passed".
    """
    from nora_edge.policy import NoraPolicy

    b = staged_bundle(staging, sections)
    end_ids = set(b.actions.end_ids) | set(b.generation.eos_token_ids)
    head = {int(i) for i in b.actions.head_rows}
    with NoraPolicy.load(b, providers="cpu", forced_tokens="flag") as policy:
        results = check_inputs(policy, cases)
        results["policy"] = compare_constrained(policy, cases, end_ids, head)
        results["policy"]["head"] = b.actions.head
        results["policy"]["embeddings_dtype"] = b.embeddings["dtype"]
    if b.actions.head == "full":
        with NoraPolicy.load(b, providers="cpu", constrained=False) as policy:
            results["hf_parity"] = compare_hf_parity(policy, cases)
    if b.components["decoder"].meta.get("logits_all"):
        pairs = [(c.image, c.instruction, c.reference.unnorm_key) for c in cases]
        results["multi_token"] = compare_multi_token(b, pairs)
    return results


def compare_multi_token(b, pairs: list[tuple]) -> dict:
    """Multi-token decoding vs the plain loop of the same bundle: identical generated ids on every pair.

    Each pair runs twice in multi-token mode (the second pass drafts from the first, so verify calls with accepted
    proposals are exercised), against one plain run. The draft table never gates (``min_rate`` 0).

    Args:
        b: a loaded bundle whose decoder has ``logits_all``.
        pairs: (frame (H, W, 3) uint8, instruction, unnorm key or None).

    Returns:
        the manifest entry: pairs, runs compared, ids_equal, decoder calls (plain, multi-token), verify_calls,
        accepted proposals, fallbacks, passed; and what the tie-margin guard has to cover on this bundle: the
        plain ids re-run as one verify call vs the sequential steps (``batched_vs_sequential``: positions,
        max_abs) and ``guaranteed`` = max_abs < tie_margin / 2 (then equal ids follow from the guard, not only
        from the pairs tried; ``nora_edge.multitoken`` module docstring).
    """
    from nora_edge.drafts import DraftTable
    from nora_edge.multitoken import DEFAULT_TIE_MARGIN
    from nora_edge.multitoken_runner import MultiTokenRunner, batched_vs_sequential
    from nora_edge.policy import NoraPolicy

    plain_ids, plain_calls = [], 0
    with NoraPolicy.load(b, providers="cpu", forced_tokens="flag") as policy:
        for pair in pairs:
            plain_ids.append(_chunk_ids(policy, *pair))
            plain_calls += 2 * max(
                plain_ids[-1].size - 1, 0
            )  # the plain loop: one call per token but the last
    counts = dict.fromkeys(
        ("compared", "ids_equal", "decoder_calls", "verify_calls", "accepted", "fallbacks"), 0
    )
    with NoraPolicy.load(b, providers="cpu", forced_tokens="flag", decoding="multi-token") as policy:
        policy.multi_token.drafts = DraftTable(min_rate=0.0)
        for _ in range(2):
            for pair, want in zip(pairs, plain_ids, strict=True):
                got = _chunk_ids(policy, *pair)
                st = policy.multi_token.last_stats
                counts["compared"] += 1
                counts["ids_equal"] += int(np.array_equal(got, want))
                counts["decoder_calls"] += st.decoder_calls
                counts["verify_calls"] += st.verify_calls
                counts["accepted"] += st.accepted
                counts["fallbacks"] += int(st.fallback)
        runner = MultiTokenRunner(policy)
        numerics = [batched_vs_sequential(runner, image, text) for image, text, _ in pairs]
    max_abs = max((d["max_abs"] for d in numerics), default=0.0)
    return {
        "pairs": len(pairs),
        **counts,
        "plain_decoder_calls": plain_calls,
        "batched_vs_sequential": {
            "positions": sum(d["positions"] for d in numerics),
            "max_abs": max_abs,
            "selection_changed": sum(d["changed"] for d in numerics),
        },
        "tie_margin": DEFAULT_TIE_MARGIN,
        "guaranteed": bool(max_abs < DEFAULT_TIE_MARGIN / 2),
        "passed": counts["compared"] == 2 * len(pairs) and counts["ids_equal"] == counts["compared"],
    }


def _chunk_ids(policy, image, instruction, unnorm_key) -> np.ndarray:
    """The ids a chunk generated (kept by the policy even when its decode then fails)."""
    try:
        policy.run_chunk(image, instruction, unnorm_key)
    except DetokenizationError:
        pass
    return policy.last_ids
