"""``export --multi-token``: the decoder's logits_all output validated against HF at every prompt position, the
multi-token loop against the plain loop's ids, and what quantized bundles record about their verify calls.

References: HF transformers' logits at every prompt position (the export's own validation), the plain greedy
loop of the same bundle (ids), and the sequential decode steps (for the batched-vs-sequential measurement).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from nora_edge.bundle import DRAFTS, DRAFTS_SECTION, LOGITS_ALL, Bundle, format_info
from nora_edge.drafts import DRAFTS_FORMAT, read_drafts
from nora_edge.errors import BundleError, NoraEdgeError
from nora_edge.multitoken import MultiTokenConfig, MultiTokenWarning
from nora_edge.policy import NoraPolicy

PAIRS = 3
CALIB = 6  # calibration frames the bundle's drafts.json is built from


def frames(seed: int, n: int) -> list:
    """(frame, instruction) samples of the trained fixture's task; seeds differ from the validation's pairs."""
    from nora_edge.export.quantize import CalibrationSample
    from nora_edge.export.quantize.calibration import synthetic_frame
    from nora_edge.export.synthetic_task import instruction_list

    rng, texts = np.random.default_rng(seed), instruction_list()
    return [CalibrationSample(synthetic_frame(rng), texts[i % len(texts)]) for i in range(n)]


@pytest.fixture(scope="module")
def mt_bundle(tiny_trained_ckpt_h5, tmp_path_factory):
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.synthetic_task import instruction_list

    out = tmp_path_factory.mktemp("mt_export") / "fp32"
    return export_bundle(
        tiny_trained_ckpt_h5, out, multi_token=True, progress=False, validation_prompts=PAIRS,
        validation_instructions=instruction_list(), calibration=frames(7, CALIB),
    )  # fmt: skip


def test_export_validates_logits_all_and_multi_token_ids(mt_bundle) -> None:
    b = Bundle.load(mt_bundle)
    v = b.manifest["validation"]
    every = v["decoder_prefill_all"]
    assert every["passed"] and every["prompts"] == PAIRS and every["last_row_equals_logits"] == PAIRS
    assert every["positions"] > PAIRS * 50  # every prompt position of every pair, not only the last
    assert every["max_rel_err"] <= every["tolerance"] == 1e-5
    mt = v["multi_token"]
    assert mt["passed"] and mt["compared"] == 2 * PAIRS == mt["ids_equal"]
    assert mt["verify_calls"] > 0 and mt["decoder_calls"] < mt["plain_decoder_calls"]
    # fp32: batched and sequential logits differ in the last bits only, so the guard guarantees the ids
    assert mt["guaranteed"] and 0 <= mt["batched_vs_sequential"]["max_abs"] < 1e-4
    assert b.manifest["export"]["multi_token"] is True
    line = next(x for x in format_info(b.info()).splitlines() if x.startswith("multi-token"))
    assert f"{2 * PAIRS}/{2 * PAIRS} chunks" in line and "guaranteed by the tie margin" in line
    assert [o.name for o in b.components["decoder"].outputs[:2]] == ["logits", LOGITS_ALL]


@pytest.mark.parametrize("recipe", ["int4", "int4-f32act"])
def test_quantized_bundle_records_its_own_multi_token_check(mt_bundle, recipe, tmp_path) -> None:
    from nora_edge.export.quantize import quantize_bundle

    q = Bundle.load(quantize_bundle(mt_bundle, tmp_path / recipe, recipe, n_calibration=4, n_fidelity=4))
    mt = q.manifest["validation"]["multi_token"]
    assert mt["passed"] and mt["compared"] == 8 == mt["ids_equal"]  # 4 held-out samples, twice
    assert q.components["decoder"].meta["logits_all"] and q.components["decoder"].precision != "fp32"
    src = Bundle.load(mt_bundle)  # the draft file travels with the quantized copy, byte for byte
    assert q.manifest[DRAFTS_SECTION] == src.manifest[DRAFTS_SECTION]
    assert q.manifest["files"][DRAFTS]["sha256"] == src.manifest["files"][DRAFTS]["sha256"]
    worst = mt["batched_vs_sequential"]["max_abs"]
    assert mt["batched_vs_sequential"]["positions"] > 0 and worst == worst  # measured, finite
    assert mt["guaranteed"] == (worst < mt["tie_margin"] / 2)
    if recipe == "int4-f32act":  # fp32 compute: the verify call matches the sequential steps to fp32 rounding
        assert mt["guaranteed"] and worst < 1e-4


def test_policy_warns_when_the_bundle_does_not_guarantee(mt_bundle) -> None:
    b = Bundle.load(mt_bundle)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MultiTokenWarning)  # the validated fp32 bundle: no warning
        with NoraPolicy.load(b, providers="cpu", decoding="multi-token") as p:
            assert p.multi_token.guaranteed is True
    entry = b.manifest["validation"]["multi_token"]
    entry["batched_vs_sequential"] = {
        **entry["batched_vs_sequential"],
        "max_abs": 0.05,
    }  # as an int8-compute graph
    with pytest.warns(MultiTokenWarning, match="int4-f32act"):
        with NoraPolicy.load(b, providers="cpu", decoding="multi-token") as p:
            assert p.multi_token.guaranteed is False
    with pytest.warns(MultiTokenWarning):  # the guard switched off guarantees nothing
        with NoraPolicy.load(
            b, providers="cpu", decoding="multi-token", multi_token=MultiTokenConfig(tie_margin=None)
        ):
            pass
    del b.manifest["validation"]["multi_token"]  # exported with validation off: unknown, said as None
    with NoraPolicy.load(b, providers="cpu", decoding="multi-token") as p:
        assert p.multi_token.guaranteed is None
    assert np.isfinite(entry["tie_margin"])


def plain_ids(b, samples) -> list[np.ndarray]:
    """The plain loop's generated ids on each sample (the reference every draft-file check compares with)."""
    out = []
    with NoraPolicy.load(b, providers="cpu", forced_tokens="flag") as p:
        for s in samples:
            try:
                p.run_chunk(s.image, s.instruction)
            except NoraEdgeError:  # a malformed chunk still generated ids
                pass
            out.append(p.last_ids.copy())
    return out


def test_draft_file_holds_the_models_own_chunks(mt_bundle) -> None:
    b = Bundle.load(mt_bundle)
    section = b.manifest[DRAFTS_SECTION]
    texts = {s.instruction for s in frames(7, CALIB)}
    assert section["file"] == DRAFTS and section["chunks"] == CALIB and section["instructions"] == len(texts)
    chunks = read_drafts(b.file(DRAFTS), vocab_size=b.embeddings["shape"][0])
    want = plain_ids(b, frames(7, CALIB))
    compared = 0
    for (text, ids), sample, ref in zip(chunks, frames(7, CALIB), want, strict=True):
        assert text == sample.instruction and np.array_equal(ids, ref) and ids.size > 0
        compared += 1
    assert compared == CALIB and section["tokens"] == sum(r.size for r in want)
    assert "drafts: drafts.json, 6 chunks" in format_info(b.info())


def test_seeded_table_drafts_from_the_first_chunk(mt_bundle) -> None:
    """A fresh process: with the bundle's drafts the first chunk already verifies proposals; ids stay plain's."""
    b = Bundle.load(mt_bundle)
    held = frames(11, 4)  # frames the draft file was not built from
    samples = frames(7, 2) + held
    want = plain_ids(b, samples)
    seen = {}
    for seeded in (True, False):
        # no learning: each chunk sees only the file
        cfg = MultiTokenConfig(learn=False, bundle_drafts=seeded)
        with NoraPolicy.load(
            b, providers="cpu", forced_tokens="flag", decoding="multi-token", multi_token=cfg
        ) as p:
            assert p.multi_token.seeded == (CALIB if seeded else 0)
            calls, proposed = [], 0
            for s, ref in zip(samples, want, strict=True):
                try:
                    p.run_chunk(s.image, s.instruction)
                except NoraEdgeError:
                    pass
                assert np.array_equal(p.last_ids, ref)
                st = p.multi_token.last_stats
                calls.append(st.decoder_calls)
                proposed += st.proposed
        seen[seeded] = (calls, proposed)
    plain_calls = [max(r.size - 1, 0) for r in want]
    assert seen[False] == (plain_calls, 0)  # an empty table proposes nothing: one call per token
    calls, proposed = seen[True]
    # the first two are frames the file was built from
    assert proposed > 0 and calls[0] < plain_calls[0] and calls[1] < plain_calls[1]
    assert sum(calls) < sum(plain_calls)


def test_read_drafts_names_the_problem(tmp_path) -> None:
    path = tmp_path / DRAFTS
    cases = [
        ("not json", "unreadable"),
        (json.dumps({"format": "other", "chunks": []}), "format must be"),
        (json.dumps({"format": DRAFTS_FORMAT, "chunks": {}}), "'chunks' must be a list"),
        (
            json.dumps({"format": DRAFTS_FORMAT, "chunks": [{"instruction": "a", "ids": [1, -2]}]}),
            r"chunks\[0\]",
        ),
        (json.dumps({"format": DRAFTS_FORMAT, "chunks": [{"ids": [1]}]}), r"chunks\[0\]"),
        (
            json.dumps({"format": DRAFTS_FORMAT, "chunks": [{"instruction": "a", "ids": [1, 99]}]}),
            ">= vocab size",
        ),
        (
            json.dumps({"format": DRAFTS_FORMAT, "chunks": [{"instruction": "a", "ids": [2**64]}]}),
            "beyond int64",
        ),
    ]
    for text, match in cases:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(BundleError, match=match):
            read_drafts(path, vocab_size=50)
    path.write_text(json.dumps({"format": DRAFTS_FORMAT, "chunks": [{"instruction": "a", "ids": [3, 4]}]}))
    ((text, ids),) = read_drafts(path, vocab_size=50)
    assert text == "a" and ids.tolist() == [3, 4] and len(cases) == 7
