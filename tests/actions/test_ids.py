"""ActionIdMap: Qwen <-> FAST ids, derived from added tokens, with typed range errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nora_edge.actions import ActionIdMap
from nora_edge.errors import CheckpointError, DetokenizationError, InputError


def added_tokens(base, size):
    tokens = {f"<robot_action_{i}>": base + i for i in range(size)}
    tokens["<|im_end|>"] = 151645
    return tokens


@settings(deadline=None, max_examples=50)
@given(base=st.integers(0, 200_000), size=st.integers(1, 4096), seed=st.integers(0, 2**32 - 1))
def test_roundtrip(base, size, seed):
    id_map = ActionIdMap(base, size)
    fast = np.random.default_rng(seed).integers(0, size, size=(3, 17))
    qwen = id_map.to_qwen(fast)
    assert np.all(qwen - base == fast) and id_map.is_action(qwen).all()
    np.testing.assert_array_equal(id_map.to_fast(qwen), fast)
    assert (id_map.logits_slice.start, id_map.logits_slice.stop) == (base, base + size)


def test_from_added_tokens_reads_base():
    id_map = ActionIdMap.from_added_tokens(added_tokens(151665, 2048))
    assert (id_map.base, id_map.size) == (151665, 2048)
    other = ActionIdMap.from_added_tokens(added_tokens(1000, 16))
    assert (other.base, other.size) == (1000, 16)


def test_from_added_tokens_errors():
    with pytest.raises(CheckpointError, match="no <robot_action_i> tokens"):
        ActionIdMap.from_added_tokens({"<|im_end|>": 5})
    gap = added_tokens(100, 8)
    del gap["<robot_action_3>"]
    with pytest.raises(CheckpointError, match=r"missing for i in \[3\]"):
        ActionIdMap.from_added_tokens(gap)
    shuffled = added_tokens(100, 8)
    shuffled["<robot_action_5>"] = 999
    with pytest.raises(CheckpointError, match="<robot_action_5> has id 999, expected 105"):
        ActionIdMap.from_added_tokens(shuffled, source="added_tokens.json")


def test_range_errors():
    id_map = ActionIdMap(100, 10)
    with pytest.raises(
        DetokenizationError, match=r"model id 110 at position 1 is not an action token \[100, 110\)"
    ):
        id_map.to_fast([105, 110])
    with pytest.raises(InputError, match=r"FAST id -1 at position 0 is outside \[0, 10\)"):
        id_map.to_qwen([-1])
    assert id_map.is_action([99, 100, 109, 110]).tolist() == [False, True, True, False]
    with pytest.raises(InputError, match="base >= 0 and size >= 1"):
        ActionIdMap(5, 0)
