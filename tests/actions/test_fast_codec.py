"""Encode / decode against the published algorithm (scipy + tokenizers), both decode paths, round-trip bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nora_edge.errors import InputError

from .reference import published_decode, published_encode, smooth_chunk

SHAPES = st.tuples(st.sampled_from([1, 5, 10, 50]), st.sampled_from([1, 7, 14]))


def in_alphabet(fast, coeffs: np.ndarray) -> bool:
    return bool(
        np.all(coeffs >= fast.min_token) and np.all(coeffs - fast.min_token <= fast.table.alphabet_max)
    )


def published_roundtrip_exact(fast, chunk: np.ndarray) -> bool:
    """The published encode -> decode gives back the quantized coefficients (no char silently dropped)."""
    t, d = chunk.shape
    ids = published_encode(fast.tokenizer, chunk, fast.scale, fast.min_token)
    ref = published_decode(fast.tokenizer, ids, t, d, fast.scale, fast.min_token)
    return ref is not None and np.array_equal(ref[0], fast.quantize(chunk)[0])


@settings(deadline=None, max_examples=80)
@given(shape=SHAPES, seed=st.integers(0, 2**32 - 1), amplitude=st.sampled_from([0.05, 0.35, 0.6]))
def test_encode_decode_match_published(fast_main, shape, seed, amplitude):
    t, d = shape
    chunk = smooth_chunk(np.random.default_rng(seed), t, d, amplitude)
    coeffs = fast_main.quantize(chunk)[0]  # (T, D)
    assume(in_alphabet(fast_main, coeffs))
    ref_ids = published_encode(fast_main.tokenizer, chunk, fast_main.scale, fast_main.min_token)
    ref = published_decode(fast_main.tokenizer, ref_ids, t, d, fast_main.scale, fast_main.min_token)
    if ref is None or not np.array_equal(ref[0], coeffs):
        # the published encode silently dropped bytes that never occurred in the fit data (the published
        # decode then fails the count or, worse, passes it with U+FFFD as a coefficient)
        with pytest.raises(InputError, match="not in the vocabulary"):
            fast_main.encode(chunk)
        return
    ids = fast_main.encode(chunk)[0]
    assert ids == ref_ids
    ref_coeffs, ref_actions = ref
    np.testing.assert_array_equal(ref_coeffs, coeffs)
    np.testing.assert_array_equal(fast_main.decode_coefficients(ids, t, d), ref_coeffs)
    np.testing.assert_array_equal(fast_main.table.decode_coefficients(ids, t, d), ref_coeffs)
    np.testing.assert_allclose(fast_main.decode(ids, t, d)[0], ref_actions, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast_main.table.decode([ids], t, d)[0], ref_actions, rtol=0, atol=1e-12)


def test_published_encode_can_drop_unseen_bytes(fast_main):
    """A code point inside the alphabet whose UTF-8 bytes never occurred in the fit data has no byte-level
    token: the published encode loses it silently, ours raises."""
    vocab = fast_main.tokenizer.get_vocab()
    missing = [
        cp
        for cp in range(fast_main.table.alphabet_max + 1)
        if fast_main.tokenizer.decode(fast_main.tokenizer.encode(chr(cp)).ids) != chr(cp)
    ]
    if not missing:
        pytest.skip("every alphabet char is encodable with this fit")
    cp = missing[0]
    assert chr(cp) in vocab  # the raw alphabet token exists but byte-level pre-tokenization never reaches it
    chunk = np.zeros((1, 1))
    chunk[0, 0] = (cp + fast_main.min_token) / fast_main.scale  # T = 1: the DCT is the identity
    assert fast_main.quantize(chunk)[0, 0, 0] == cp + fast_main.min_token
    with pytest.raises(InputError, match="not in the vocabulary"):
        fast_main.encode(chunk)


@settings(deadline=None, max_examples=60)
@given(shape=SHAPES, seed=st.integers(0, 2**32 - 1))
def test_roundtrip_error_bound(fast_main, shape, seed):
    t, d = shape
    chunk = smooth_chunk(np.random.default_rng(seed), t, d)
    assume(in_alphabet(fast_main, fast_main.quantize(chunk)) and published_roundtrip_exact(fast_main, chunk))
    err = fast_main.decode(fast_main.encode(chunk), t, d)[0] - chunk  # (T, D)
    # each coefficient is off by <= 0.5/scale; the orthonormal inverse keeps a column's L2 norm
    bound = 0.5 / fast_main.scale * np.sqrt(t)
    assert np.all(np.linalg.norm(err, axis=0) <= bound + 1e-12)
    assert np.all(np.abs(err) <= bound + 1e-12)


def test_wide_alphabet_paths_agree(fast_wide):
    rng = np.random.default_rng(3)
    chunks = np.cumsum(rng.normal(0.0, 1.0, (200, 5, 3)), axis=1) * 12.0  # (B, T, D)
    coeffs = fast_wide.quantize(chunks)
    keep = [b for b in range(len(chunks)) if in_alphabet(fast_wide, coeffs[b])]
    assert len(keep) > 150
    ids = fast_wide.encode(chunks[keep])
    assert any(
        max(cp for cp in (coeffs[b].ravel() - fast_wide.min_token)) >= 0x800 for b in keep
    )  # 3-byte chars
    for seq, b in zip(ids, keep, strict=True):
        ref_coeffs, ref_actions = published_decode(fast_wide.tokenizer, seq, 5, 3, 10.0, fast_wide.min_token)
        np.testing.assert_array_equal(ref_coeffs, coeffs[b])
        np.testing.assert_allclose(fast_wide.table.decode_chunk(seq, 5, 3), ref_actions, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(fast_wide.decode(ids, 5, 3), fast_wide.table.decode(ids, 5, 3))


def test_shapes_and_config_defaults(fast_h5):
    chunk = smooth_chunk(np.random.default_rng(4), 5, 7)
    ids = fast_h5.encode(chunk)
    assert isinstance(ids, list) and len(ids) == 1
    assert fast_h5.decode(ids).shape == (1, 5, 7)  # shape from processor_config
    assert fast_h5.decode(ids[0]).shape == (1, 5, 7)  # a flat list is one chunk
    assert fast_h5.decode(np.asarray(ids)).shape == (1, 5, 7)
    assert fast_h5.decode(ids).dtype == np.float64


def test_encode_clamps_below_min_like_published(fast_h5):
    chunk = smooth_chunk(np.random.default_rng(5), 5, 7)
    chunk[:, 0] = -50.0  # DC coefficient of dim 0 far below the fitted minimum
    coeffs = fast_h5.quantize(chunk)[0]
    assert coeffs[0, 0] < fast_h5.min_token
    ids = fast_h5.encode(chunk)[0]
    assert ids == published_encode(fast_h5.tokenizer, chunk, 10.0, fast_h5.min_token)
    decoded = fast_h5.decode_coefficients(ids, 5, 7)
    assert decoded[0, 0] == fast_h5.min_token  # the clamp is visible in the coefficients


@pytest.mark.parametrize("t", [4, 6])
def test_encode_rejects_shape_other_than_configured(fast_h5, t):
    with pytest.raises(InputError, match="time_horizon is"):
        fast_h5.encode(np.zeros((t, 7)))
