"""100,000 random / mutated id sequences through strict decode, compared with the published algorithm."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.fft import idct

from nora_edge.errors import DetokenizationError

from .reference import published_decode, smooth_chunk

N_SEQUENCES = 100_000
SMALL_SHAPES = [(1, 1), (1, 7), (2, 3), (5, 1)]


def encoding_pool(kind, fast, rng):
    """Encodings of chunks like the fixture's fit data: list of (ids, T, D)."""
    if kind == "wide":
        chunks = np.cumsum(rng.normal(0.0, 1.0, (300, 5, 3)), axis=1) * 12.0  # (B, T, D)
        ok = [c for c in chunks if np.all(np.abs(fast.quantize(c)) < 1000)]
        return [(ids, 5, 3) for ids in fast.encode(np.stack(ok))]
    pool = []
    for t, d in [(1, 7), (5, 7), (10, 7), (1, 14), (5, 1)]:
        chunks = np.stack([smooth_chunk(rng, t, d) for _ in range(60)])  # (B, T, D)
        pool += [(ids, t, d) for ids in fast.encode(chunks)]
    return pool


def make_sequences(fast, rng, pool, n_sequences):
    """Half fully random (lengths 0..60, ids partly out of range), half mutated encodings of real chunks."""
    v = fast.vocab_size
    out = []
    for i in range(n_sequences):
        if i % 2 == 0:
            t, d = SMALL_SHAPES[rng.integers(len(SMALL_SHAPES))]
            length = int(rng.integers(0, 61)) if rng.random() < 0.5 else int(rng.integers(0, t * d + 2))
            ids = (
                rng.integers(-3, v + 3, size=length)
                if rng.random() < 0.2
                else rng.integers(0, v, size=length)
            )
            out.append((ids.tolist(), t, d))
            continue
        ids, t, d = pool[rng.integers(len(pool))]
        ids = list(ids)
        for _ in range(int(rng.integers(1, 4))):
            op = rng.integers(5)
            pos = int(rng.integers(len(ids) + 1))
            if op == 0 and ids:
                ids[min(pos, len(ids) - 1)] = int(rng.integers(0, v))
            elif op == 1 and ids:
                del ids[min(pos, len(ids) - 1)]
            elif op == 2:
                ids.insert(pos, int(rng.integers(0, v)))
            elif op == 3 and len(ids) > 1:
                j = min(pos, len(ids) - 2)
                ids[j], ids[j + 1] = ids[j + 1], ids[j]
            else:  # swap in the tokens of a random (often out-of-alphabet) BMP character
                cp = int(rng.integers(0, 0xD800))
                ids[pos:pos] = fast.tokenizer.encode(chr(cp)).ids
                if ids and rng.random() < 0.5:
                    del ids[min(pos + 1, len(ids) - 1)]
        out.append((ids, t, d))
    return out


def reference_or_none(fast, ids, t, d):
    try:
        return published_decode(fast.tokenizer, ids, t, d, fast.scale, fast.min_token)
    except Exception:  # the published code catches everything (and then returns zeros)
        return None


@pytest.mark.parametrize(
    ("kind", "n_sequences", "reasons"),
    [
        ("main", N_SEQUENCES, ("ok", "wrong_count", "invalid_utf8", "id_out_of_range")),
        (
            "wide",
            20_000,
            ("ok", "wrong_count", "invalid_utf8", "id_out_of_range", "coefficient_out_of_range"),
        ),
    ],
)
def test_fuzz_strict_decode(kind, n_sequences, reasons, fast_main, fast_wide):
    fast = {"main": fast_main, "wide": fast_wide}[kind]
    rng = np.random.default_rng(1234)
    counts = {"ok": 0}
    pool = encoding_pool(kind, fast, rng)
    for n, (ids, t, d) in enumerate(make_sequences(fast, rng, pool, n_sequences)):
        try:
            coeffs = fast.table.decode_coefficients(ids, t, d)
            reason = None
        except DetokenizationError as exc:
            reason = exc.reason
        counts[reason or "ok"] = counts.get(reason or "ok", 0) + 1
        if n % 10 == 0:  # the tokenizers path agrees with the table path
            try:
                other = fast.decode_coefficients(ids, t, d)
                assert reason is None, (ids, reason)
                np.testing.assert_array_equal(other, coeffs)
            except DetokenizationError as exc:
                assert exc.reason == reason, (ids, exc.reason, reason)
        ref = reference_or_none(fast, ids, t, d)
        if reason is None:
            assert ref is not None, ids
            np.testing.assert_array_equal(coeffs, ref[0])
            if n % 10 == 0:
                actions = fast.table.decode_chunk(ids, t, d)
                np.testing.assert_allclose(actions, ref[1], rtol=0, atol=1e-12)
        elif reason == "wrong_count":
            assert ref is None, (
                ids
            )  # bytes were valid and in range: the published decode sees the same string
        elif reason == "invalid_utf8":
            assert "\ufffd" in fast.tokenizer.decode([i for i in ids if 0 <= i < fast.vocab_size])
        elif reason == "id_out_of_range":
            assert any(not 0 <= i < fast.vocab_size for i in ids)
        else:
            assert reason == "coefficient_out_of_range", reason
    assert sum(counts.values()) == n_sequences
    for key in reasons:
        assert counts.get(key, 0) > 20, counts  # every branch is exercised


def test_idct_reference_is_scipy(fast_main):
    """The fuzz compares against scipy's idct; make sure a successful decode really is that."""
    ids = fast_main.encode(smooth_chunk(np.random.default_rng(0), 5, 7))[0]
    coeffs = fast_main.table.decode_coefficients(ids, 5, 7)
    np.testing.assert_allclose(
        fast_main.table.decode_chunk(ids, 5, 7), idct(coeffs / 10.0, axis=0, norm="ortho"), rtol=0, atol=1e-12
    )
