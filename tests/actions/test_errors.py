"""Every decode failure mode raises a typed error whose message names the problem; fallback policies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nora_edge.actions import FastTokenizer
from nora_edge.errors import CheckpointError, DetokenizationError, InputError

from .reference import smooth_chunk


def both_paths(fast, ids, t, d):
    """Run the tokenizers path and the byte-table path; both must raise the same reason."""
    reasons, messages = set(), []
    for decode in (lambda: fast.decode(ids, t, d), lambda: fast.table.decode(ids, t, d)):
        with pytest.raises(DetokenizationError) as info:
            decode()
        reasons.add(info.value.reason)
        messages.append(str(info.value))
    assert len(reasons) == 1
    return reasons.pop(), messages


def ids_of_bytes(fast, predicate):
    return [i for i in range(fast.vocab_size) if predicate(fast.table.token_bytes(i))]


def test_wrong_count_names_numbers(fast_h5):
    ids = fast_h5.encode(smooth_chunk(np.random.default_rng(0), 5, 7))[0]
    reason, messages = both_paths(fast_h5, ids, 5, 6)
    assert reason == "wrong_count"
    assert all("decoded 35 coefficients" in m and "5*6 = 30" in m for m in messages)


def test_empty_sequence_is_wrong_count(fast_h5):
    reason, messages = both_paths(fast_h5, [], 5, 7)
    assert reason == "wrong_count" and "decoded 0 coefficients" in messages[0]


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_id_out_of_range(fast_h5, bad):
    ids = [1, 2, bad, 3]
    reason, messages = both_paths(fast_h5, ids, 5, 7)
    assert reason == "id_out_of_range"
    assert all(f"FAST id {bad} at position 2" in m and f"[0, {fast_h5.vocab_size})" in m for m in messages)


def test_non_integer_ids(fast_h5):
    reason, messages = both_paths(fast_h5, [1.0, 2.5], 5, 7)
    assert reason == "not_integer" and "integers" in messages[0]


def test_invalid_utf8_names_byte_offset(fast_main):
    lone_cont = ids_of_bytes(fast_main, lambda b: len(b) == 1 and 0x80 <= b[0] <= 0xBF)
    ascii_ids = ids_of_bytes(fast_main, lambda b: len(b) == 1 and b[0] < 0x80)
    assert lone_cont and ascii_ids
    ids = [ascii_ids[0], ascii_ids[1], lone_cont[0]]
    reason, messages = both_paths(fast_main, ids, 1, 3)
    assert reason == "invalid_utf8"
    assert all("byte offset 2" in m and f"FAST id {lone_cont[0]} at position 2" in m for m in messages)


def test_truncated_char_at_end(fast_main):
    leads = ids_of_bytes(fast_main, lambda b: len(b) == 1 and 0xC2 <= b[0] <= 0xDF)
    ascii_ids = ids_of_bytes(fast_main, lambda b: len(b) == 1 and b[0] < 0x80)
    reason, messages = both_paths(fast_main, [ascii_ids[0], leads[0]], 1, 2)
    assert reason == "invalid_utf8" and "byte offset 1" in messages[0] and "end of data" in messages[0]


def test_literal_replacement_char_is_out_of_alphabet(fast_wide):
    """U+FFFD spelled with valid bytes (EF BF BD): tokenizers shows it as a replacement char; strict decode
    tells it apart from invalid UTF-8 and rejects it as a coefficient outside the fitted alphabet."""
    pieces = fast_wide.tokenizer.encode("\ufffd").ids
    assert fast_wide.table.concat_bytes(pieces) == "\ufffd".encode()
    ascii_ids = ids_of_bytes(fast_wide, lambda b: len(b) == 1 and b[0] < 0x80)
    reason, messages = both_paths(fast_wide, [ascii_ids[0], *pieces], 1, 2)
    assert reason == "coefficient_out_of_range"
    assert all("U+FFFD" in m and "index 1" in m and "alphabet" in m for m in messages)


def test_missing_shape(fast_main):
    with pytest.raises(InputError, match="time_horizon and action_dim"):
        fast_main.decode([1, 2, 3])
    with pytest.raises(InputError, match="action_dim must be a positive integer"):
        fast_main.decode([1, 2, 3], 1, 0)


def test_hold_policy(fast_h5):
    rng = np.random.default_rng(1)
    good = fast_h5.encode(smooth_chunk(rng, 5, 7))[0]
    last_good = smooth_chunk(rng, 5, 7)
    batch = [good, good[:-1], good]
    for decode in (fast_h5.decode, lambda ids, **kw: fast_h5.table.decode(ids, 5, 7, **kw)):
        result = decode(batch, on_error="hold", last_good=last_good)
        assert result.fallback_used and result.policy == "hold"
        assert result.ok.tolist() == [True, False, True]
        assert result.reasons[0] is None and "expected time_horizon*action_dim" in result.reasons[1]
        np.testing.assert_array_equal(result.actions[1], last_good)
        np.testing.assert_array_equal(result.actions[0], fast_h5.decode([good])[0])
    clean = fast_h5.decode([good], on_error="hold", last_good=last_good)
    assert not clean.fallback_used and clean.reasons == (None,)


def test_hold_needs_previous_chunk(fast_h5):
    with pytest.raises(InputError, match="needs last_good"):
        fast_h5.decode([[1]], on_error="hold")
    with pytest.raises(InputError, match=r"last_good has shape \(4, 7\)"):
        fast_h5.decode([[1]], on_error="hold", last_good=np.zeros((4, 7)))
    with pytest.raises(InputError, match="NaN"):
        fast_h5.decode([[1]], on_error="hold", last_good=np.full((5, 7), np.nan))


def test_unknown_policy(fast_h5):
    with pytest.raises(InputError, match="on_error must be one of"):
        fast_h5.decode([[1]], on_error="zeros")


def test_strict_never_returns_for_bad_batch(fast_h5):
    good = fast_h5.encode(smooth_chunk(np.random.default_rng(2), 5, 7))[0]
    with pytest.raises(DetokenizationError):
        fast_h5.decode([good, good[:3]])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: (d / "processor_config.json").unlink(), "processor_config.json"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
        (lambda d: (d / "processor_config.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "tokenizer.json").write_text("{}"), "cannot be loaded"),
    ],
)
def test_from_pretrained_file_errors(tmp_path, fast_h5, mutate, match):
    fast_h5.save_pretrained(tmp_path)
    mutate(tmp_path)
    with pytest.raises(CheckpointError, match=match):
        FastTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("scale", None, "field 'scale'"),
        ("scale", -1, "field 'scale'"),
        ("min_token", 1.5, "field 'min_token'"),
        ("vocab_size", 10, "more than processor_config.json vocab_size 10"),
        ("time_horizon", 0, "field 'time_horizon'"),
        ("action_dim", "7", "field 'action_dim'"),
    ],
)
def test_from_pretrained_field_errors(tmp_path, fast_h5, field, value, match):
    fast_h5.save_pretrained(tmp_path)
    path = tmp_path / "processor_config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        FastTokenizer.from_pretrained(tmp_path)


def test_from_pretrained_missing_field(tmp_path, fast_h5):
    fast_h5.save_pretrained(tmp_path)
    path = tmp_path / "processor_config.json"
    cfg = json.loads(path.read_text())
    del cfg["min_token"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing field\(s\) \['min_token'\]"):
        FastTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("chunks", "match"),
    [
        (np.zeros((5,)), "shape"),
        (np.full((5, 7), np.inf), "NaN or inf"),
        (np.zeros((5, 6)), "action_dim is 6"),
    ],
)
def test_encode_errors(fast_h5, chunks, match):
    with pytest.raises(InputError, match=match):
        fast_h5.encode(chunks)
