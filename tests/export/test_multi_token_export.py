"""``export --multi-token``: the decoder's logits_all output validated against HF at every prompt position, the
multi-token loop against the plain loop's ids, and what quantized bundles record about their verify calls.

References: HF transformers' logits at every prompt position (the export's own validation), the plain greedy
loop of the same bundle (ids), and the sequential decode steps (for the batched-vs-sequential measurement).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from nora_edge.bundle import LOGITS_ALL, Bundle, format_info
from nora_edge.multitoken import MultiTokenConfig, MultiTokenWarning
from nora_edge.policy import NoraPolicy

PAIRS = 3


@pytest.fixture(scope="module")
def mt_bundle(tiny_trained_ckpt_h5, tmp_path_factory):
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.synthetic_task import instruction_list

    out = tmp_path_factory.mktemp("mt_export") / "fp32"
    return export_bundle(
        tiny_trained_ckpt_h5, out, multi_token=True, progress=False, validation_prompts=PAIRS,
        validation_instructions=instruction_list(),
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
