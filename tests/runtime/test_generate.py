"""Selection rules of the greedy loop vs transformers' own logits processor and torch.argmax."""

from __future__ import annotations

import numpy as np
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from nora_edge.generate import apply_repetition_penalty, argmax_lowest_id


def test_repetition_penalty_bit_exact_vs_hf():
    rng = np.random.default_rng(0)
    for penalty in (1.05, 1.3, 0.9):
        logits = (rng.standard_normal(3000) * 4).astype(np.float32)
        ids = rng.integers(0, 3000, 400)  # prompt + generated so far, with repeats
        hf = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.from_numpy(ids)[None], torch.from_numpy(logits)[None]
        )
        seen = np.zeros(3000, bool)
        seen[ids] = True
        got = apply_repetition_penalty(logits, seen, penalty)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, hf[0].numpy())


def test_penalty_none_or_one_is_identity():
    x = np.array([-1.0, 2.0], np.float32)
    seen = np.array([True, True])
    assert apply_repetition_penalty(x, seen, None) is x
    assert apply_repetition_penalty(x, seen, 1.0) is x


def test_argmax_ties_follow_torch_over_the_vocab():
    """Head rows in a non-sorted order (action ids first, end ids after): ties go to the smallest Qwen id."""
    head_rows = np.array([10, 11, 12, 3, 1])
    scores = np.array([5.0, 1.0, 5.0, 5.0, 0.0], np.float32)
    row = argmax_lowest_id(scores, head_rows)
    full = np.full(13, -np.inf, np.float32)
    full[head_rows] = scores
    assert head_rows[row] == int(torch.argmax(torch.from_numpy(full)))
    assert argmax_lowest_id(np.array([0.0, 2.0], np.float32), np.array([5, 4])) == 1


def test_length_limit_follows_hf_rules():
    import pytest

    from nora_edge.errors import BundleError
    from nora_edge.generate import GreedyConfig, new_token_limit

    cfg = lambda new, total: GreedyConfig(None, 0, (1,), new, total, None)  # noqa: E731
    assert new_token_limit(cfg(20, 5), 100) == 20  # max_new_tokens wins over max_length, as in HF
    assert new_token_limit(cfg(None, 130), 100) == 30
    # no length field (Qwen2.5-VL-3B-Instruct's generation_config.json): HF's default max_length counts new tokens
    from transformers import GenerationConfig

    assert (
        new_token_limit(cfg(None, None), 100)
        == GenerationConfig._get_default_generation_params()["max_length"]
    )
    with pytest.raises(BundleError, match="leaves -4 new tokens"):
        new_token_limit(cfg(None, 96), 100)
