"""The shipped default bundle (action head, fp16 embeddings, constrained) == NORA's unrestricted reference.

The trained tiny fixtures (``tiny_trained_ckpt``, ``tiny_trained_ckpt_h5``) emit a decodable FAST chunk on
almost every input, so "ids and actions equal the reference's wherever its decode is well formed" is checked on real
decodes, not vacuously. Frames come in varied sizes (the 224x224 resize is part of what is compared). The
reference is ``ReferencePolicy`` (HF ``generate`` over the full vocabulary with the checkpoint's
generation_config: Qwen2.5-VL's, no length field, so HF's default 20 new tokens).

Two independent checks per fixture: this test's own 60 held-out pairs (frame seeds 11000+), and the check
``export`` ran on its own held-out pairs (frame seeds 7000000+) and recorded in the manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nora_edge.bundle import Bundle
from nora_edge.errors import DetokenizationError, ForcedTokenError
from nora_edge.policy import NoraPolicy
from tests.synthetic_pairs import held_out_pairs as pairs

N_PAIRS = 60
# ids + actions must match on at least 50 pairs (the acceptance bar); the trained fixtures measure 60/60
# well-formed references here (50/50 and 50/50 on the export's own pairs); random weights give 0.
MIN_MATCHED = 50


def _export(ckpt: Path, out: Path, **kw) -> Path:
    from nora_edge.export.pipeline import export_bundle

    return export_bundle(ckpt, out, progress=False, **kw)


@pytest.fixture(scope="module", params=[1, 5], ids=["h1", "h5"])
def trained(request, tmp_path_factory):
    """One trained fixture: its reference, the default bundle exported WITH validation on N_PAIRS
    synthetic-task pairs, that bundle's policy as shipped (constrained, forced_tokens="raise"), and a full-head fp32 bundle
    in HF-parity mode."""
    from nora_edge.export.reference import ReferencePolicy
    from nora_edge.export.synthetic_task import instruction_list

    ckpt = request.getfixturevalue("tiny_trained_ckpt" if request.param == 1 else "tiny_trained_ckpt_h5")
    root = tmp_path_factory.mktemp(f"trained_h{request.param}")
    default = _export(
        ckpt, root / "default", validation_prompts=N_PAIRS, validation_instructions=instruction_list()
    )
    full = _export(ckpt, root / "full", head="full", embeddings_dtype="float32", validate=False)
    return SimpleNamespace(
        ckpt=ckpt,
        ref=ReferencePolicy.from_pretrained(ckpt),
        bundle=default,
        default=NoraPolicy.load(default, providers="cpu", threads=1),
        parity=NoraPolicy.load(full, providers="cpu", threads=1, constrained=False),
        end_ids=set(Bundle.load(default).actions.end_ids),
    )


def test_default_bundle_equals_reference_on_held_out_pairs(trained) -> None:
    from nora_edge.export.validate_policy import ACTION_ATOL

    matched = malformed = 0
    for image, instruction in pairs(N_PAIRS, seed=11):
        r = trained.ref.predict_action_chunk(image, instruction)
        # HF-parity mode (full head, fp32 table): HF greedy exactly, eos included; raises where NORA is
        # malformed
        if r.well_formed:
            out = trained.parity.run_chunk(image, instruction)
            np.testing.assert_array_equal(out.ids, r.ids)
            np.testing.assert_allclose(out.actions, r.actions, atol=ACTION_ATOL, rtol=0)
        else:
            with pytest.raises(DetokenizationError):
                trained.parity.predict_action_chunk(image, instruction)
            np.testing.assert_array_equal(trained.parity.last_ids, r.ids)
        # the shipped default: action head, fp16 embeddings, automaton, forced tokens refused
        if (
            not r.well_formed
        ):  # NORA would send its zeros fallback; the runtime completes or refuses the chunk
            malformed += 1
            try:
                con = trained.default.run_chunk(image, instruction)
            except ForcedTokenError as e:
                assert e.output.flagged
            else:
                assert con.stopped == "complete"
            continue
        con = trained.default.run_chunk(image, instruction)
        assert con.stopped == "complete" and con.mode == "constrained"
        assert con.class_counts == {"model": con.ids.size, "repaired": 0, "forced_continue": 0}
        want = r.ids[:-1] if int(r.ids[-1]) in trained.end_ids else r.ids  # no step for <|im_end|>
        np.testing.assert_array_equal(con.ids, want)
        np.testing.assert_allclose(con.actions, r.actions, atol=ACTION_ATOL, rtol=0)
        matched += 1
    assert matched + malformed == N_PAIRS
    assert matched >= MIN_MATCHED, f"only {matched}/{N_PAIRS} pairs were well formed and matched"


def test_export_records_the_runtime_check(trained) -> None:
    """``export`` ran NoraPolicy on the staged default bundle against the reference; the manifest says so."""
    from nora_edge.export.validate_policy import ACTION_ATOL

    v = Bundle.load(trained.bundle).manifest["validation"]
    p = v["policy"]
    assert (p["mode"], p["head"], p["embeddings_dtype"]) == ("constrained", "action", "float16")
    assert p["pairs"] == N_PAIRS and p["well_formed"] >= MIN_MATCHED
    assert p["ids_equal"] == p["actions_compared"] == p["well_formed"]
    assert p["max_action_abs_err"] <= p["action_tolerance"] == ACTION_ATOL
    assert p["token_classes_by_reference"]["well_formed"]["repaired"] == 0
    assert p["token_classes_by_reference"]["well_formed"]["forced_continue"] == 0
    assert p["malformed"]["pairs"] == N_PAIRS - p["well_formed"]
    assert p["runtime_errors"] == [] and p["mismatched"] == [] and p["passed"]
    assert v["prompt_ids"]["prompts"] == v["preprocess"]["frames"] == N_PAIRS
    assert v["prompt_ids"]["passed"] and v["preprocess"]["passed"]
    t = v["decoder_table"]
    assert t["prompts"] == N_PAIRS and t["max_rel_err"] <= t["tolerance"] < t["rounding_effect_max_rel"]
    from nora_edge.bundle import format_info

    line = [x for x in format_info(Bundle.load(trained.bundle).info()).splitlines() if " policy:" in x]
    assert line == [
        f"validation     policy: passed ({N_PAIRS} pairs, {p['well_formed']} well formed, {p['ids_equal']} ids "
        f"equal, max action err {p['max_action_abs_err']:.2e} (tol {ACTION_ATOL}), repaired "
        f"{p['token_classes']['repaired']}, forced {p['token_classes']['forced_continue']})"
    ]


def _staged_copy(bundle_dir: Path, dst: Path) -> tuple[Path, dict]:
    """The bundle's files without manifest.json (a staging dir) and its sections minus the validation."""
    shutil.copytree(bundle_dir, dst, ignore=shutil.ignore_patterns("manifest.json"))
    m = Bundle.load(bundle_dir).manifest
    skip = ("schema_version", "nora_edge_version", "files", "validation")
    return dst, {k: v for k, v in m.items() if k not in skip}


def test_runtime_check_fails_on_planted_defects(trained, tmp_path: Path) -> None:
    """The check the export runs fails when the shipped runtime is wrong: norm stats that unnormalize
    differently (ids equal, actions off) and action-token embeddings zeroed (ids diverge)."""
    from nora_edge.export.validate import held_out_pairs, reference_cases
    from nora_edge.export.validate_policy import ACTION_ATOL, check_runtime

    b = Bundle.load(trained.bundle)
    cases = reference_cases(trained.ref, b.actions.head_rows.tolist(), held_out_pairs(6, _instructions()))
    well = sum(c.reference.well_formed for c in cases)
    assert well >= 5

    staging, sections = _staged_copy(trained.bundle, tmp_path / "stats")
    assert check_runtime(staging, sections, cases)["policy"]["passed"]  # the unchanged copy passes
    for stats in sections["norm_stats"].values():
        stats["action"]["q99"] = [q + 0.01 for q in stats["action"]["q99"]]
    p = check_runtime(staging, sections, cases)["policy"]
    assert p["ids_equal"] == well and p["max_action_abs_err"] > 1e3 * ACTION_ATOL and not p["passed"]

    staging, sections = _staged_copy(trained.bundle, tmp_path / "table")
    table = np.load(staging / "embeddings.npy")
    table[b.actions.base : b.actions.base + b.actions.count] = 0
    np.save(staging / "embeddings.npy", table)
    p = check_runtime(staging, sections, cases)["policy"]
    assert p["ids_equal"] < well and p["mismatched"] and not p["passed"]


def _instructions() -> list[str]:
    from nora_edge.export.synthetic_task import instruction_list

    return instruction_list()


@pytest.mark.slow
def test_medium_runtime_ids_equal_reference_on_50_pairs(medium_ckpt: Path, tmp_path: Path) -> None:
    """Medium (random weights, T=5): ids equal on 50 pairs; actions wherever the reference is well formed."""
    from nora_edge.export.reference import ReferencePolicy

    ref = ReferencePolicy.from_pretrained(medium_ckpt)
    bundle = _export(medium_ckpt, tmp_path / "m", head="full", embeddings_dtype="float32", validate=False)
    pol = NoraPolicy.load(bundle, providers="cpu", constrained=False)
    for image, instruction in pairs(50, seed=12):
        r = ref.predict_action_chunk(image, instruction)
        if r.well_formed:
            out = pol.run_chunk(image, instruction)
            np.testing.assert_allclose(out.actions, r.actions, atol=1e-5, rtol=0)
        else:
            with pytest.raises(DetokenizationError):
                pol.predict_action_chunk(image, instruction)
            out = None
        np.testing.assert_array_equal(pol.last_ids if out is None else out.ids, r.ids)
