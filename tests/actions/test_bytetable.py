"""Byte table: per-id bytes against the tokenizers ByteLevel decoder, file formats, decode equality."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from nora_edge.actions import ByteTable
from nora_edge.actions.bytetable import RAW_META, byte_level_char_map
from nora_edge.errors import BundleError

from .reference import smooth_chunk


def test_char_map_is_tokenizers_byte_level_alphabet():
    mapping = byte_level_char_map()
    assert set(mapping) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(mapping.values()) == list(range(256))
    # the pre-tokenizer turns each byte of a char into exactly the char the map inverts
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for cp in [0, 32, 65, 127, 128, 200, 0x7FF, 0x800, 0xFFFD]:
        (piece, _), *_ = pre.pre_tokenize_str(chr(cp))
        assert bytes(mapping[ch] for ch in piece) == chr(cp).encode("utf-8")


def test_token_bytes_match_tokenizers_decode(any_fast):
    """Per id, the tokenizers decode is the lossy UTF-8 decode of the table's bytes; pairs of ids too."""
    tok, table = any_fast.tokenizer, any_fast.table
    for i in range(table.vocab_size):
        assert tok.decode([i]) == table.token_bytes(i).decode("utf-8", errors="replace"), i
    rng = np.random.default_rng(0)
    for pair in rng.integers(0, table.vocab_size, size=(3000, 2)).tolist():
        assert tok.decode(pair) == table.concat_bytes(pair).decode("utf-8", errors="replace"), pair


def test_arrays_layout(fast_main):
    table = fast_main.table
    assert table.offsets.dtype == np.int32 and table.offsets.shape == (fast_main.vocab_size + 1,)
    assert table.data.dtype == np.uint8 and table.data.shape == (int(table.offsets[-1]),)
    i = 300
    assert table.data[table.offsets[i] : table.offsets[i + 1]].tobytes() == table.token_bytes(i)


@pytest.mark.parametrize("fmt", ["npz", "raw"])
def test_save_load_decodes_identically(tmp_path, fast_h5, fmt):
    table = fast_h5.table
    if fmt == "npz":
        loaded = ByteTable.load(table.save(tmp_path / "codec.npz"))
    else:
        loaded = ByteTable.load_raw(table.save_raw(tmp_path / "codec"))
    np.testing.assert_array_equal(loaded.offsets, table.offsets)
    np.testing.assert_array_equal(loaded.data, table.data)
    assert (loaded.min_token, loaded.scale, loaded.alphabet_max) == (
        table.min_token,
        10.0,
        table.alphabet_max,
    )
    chunks = np.stack([smooth_chunk(np.random.default_rng(s), 5, 7) for s in range(20)])  # (B, T, D)
    ids = fast_h5.encode(chunks)
    np.testing.assert_array_equal(loaded.decode(ids, 5, 7), fast_h5.decode(ids))
    assert not [p for p in tmp_path.rglob(".*")]


def test_load_missing_and_bad_files(tmp_path, fast_h5):
    with pytest.raises(BundleError, match="not found"):
        ByteTable.load(tmp_path / "nope.npz")
    np.savez(tmp_path / "partial.npz", offsets=fast_h5.table.offsets)
    with pytest.raises(BundleError, match="lacks"):
        ByteTable.load(tmp_path / "partial.npz")
    raw = fast_h5.table.save_raw(tmp_path / "raw")
    (raw / RAW_META).write_text('{"format_version": 99}')
    with pytest.raises(BundleError, match="malformed"):
        ByteTable.load_raw(raw)
    (raw / RAW_META).unlink()
    with pytest.raises(BundleError, match=RAW_META):
        ByteTable.load_raw(raw)


def test_inconsistent_arrays_rejected(fast_h5):
    table = fast_h5.table
    with pytest.raises(BundleError, match="offsets"):
        ByteTable(table.offsets.astype(np.int64), table.data, table.min_token, 10.0, table.alphabet_max)
    with pytest.raises(BundleError, match="end at len"):
        ByteTable(table.offsets, table.data[:-1], table.min_token, 10.0, table.alphabet_max)
