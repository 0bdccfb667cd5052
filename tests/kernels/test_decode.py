"""nora_fast_decode (C) against nora-edge's numpy strict decode, scipy's iDCT and the post-processing chain.

Data flow: valid id sequences (random walks through FastAutomaton) and a 100,000-sequence fuzz corpus (random and
out-of-range ids, truncated / extended / spliced / mutated walks, byte-level junk, empty sequences) --one batched
C call per (codec, program)--> integer coefficients, float32 actions, statuses, error positions
== corpus.reference_decode (ByteTable.decode_coefficients + DetokenizationError.reason, scipy.fft.idct, Chain.apply).
"""

from __future__ import annotations

import numpy as np
import pytest

from .corpus import SEQ_STATUS, apply_ops, fuzz_sequences, random_walks, reference_decode

FUZZ = {"main_1x7": 10_000, "main_5x7": 20_000, "h5_5x7": 10_000, "wide_5x3": 20_000, "wide_10x3": 10_000,
        "main_10x14": 5_000, "testdata": 25_000}  # fmt: skip
TOL = 1e-6  # float32 output vs float64 reference: |c - r| <= TOL * max(1, |r|)


def programs_of(codec) -> list[tuple[int, str | None]]:
    """(C program index, Chain key) for every program and for normalized actions (-1, None)."""
    return [(-1, None)] + [(i, key) for i, (key, _) in enumerate(codec.tables.programs)]


def compare(clib, ctx, codec, seqs, program, key, ref=None) -> dict:
    """One C call over ``seqs``; every output equal to the reference (actions within TOL). Returns status counts."""
    c = clib.decode(ctx, seqs, program, total=codec.total)
    status, pos, coeffs, actions = ref if ref is not None else reference_decode(codec, seqs, key)
    np.testing.assert_array_equal(c["status"], status)
    np.testing.assert_array_equal(c["pos"], pos)
    np.testing.assert_array_equal(c["coeffs"], coeffs)
    ok = status == 0
    assert np.isnan(c["actions"][~ok]).all()
    err = np.abs(c["actions"][ok].astype(np.float64) - actions[ok])
    assert (err <= TOL * np.maximum(1.0, np.abs(actions[ok]))).all(), float(err.max(initial=0))
    assert c["rc"] == (0 if ok.all() else 7), clib.error()
    return {r: int((status == s).sum()) for r, s in SEQ_STATUS.items() if (status == s).any()}


@pytest.fixture(scope="module")
def all_codecs(codecs, testdata_codec):
    return {**codecs, "testdata": testdata_codec}


@pytest.fixture(scope="module")
def walks(all_codecs):
    rng = np.random.default_rng(21)
    return {name: random_walks(c, 300, rng) for name, c in all_codecs.items()}


def test_valid_walks_decode_like_numpy(clib, open_ctx, all_codecs, walks):
    """Property corpus: every valid walk decodes OK with the reference's coefficients and actions, for every
    program of every codec (q01/q99 by key + gripper steps, min_max with a mask, mean_std, none)."""
    compared = 0
    for name, codec in all_codecs.items():
        ctx = open_ctx(codec.native_dir)
        for program, key in programs_of(codec):
            if name == "testdata" and program >= 0:  # no Chain object: apply the native program's ops
                status, pos, coeffs, norm = reference_decode(codec, walks[name], None)
                t, d = codec.auto.time_horizon, codec.auto.action_dim
                acts = apply_ops(codec.tables.programs[program][1], norm.reshape(-1, t, d)).reshape(
                    norm.shape
                )
                counts = compare(clib, ctx, codec, walks[name], program, key, (status, pos, coeffs, acts))
            else:
                if key is not None:
                    assert clib.program(ctx, key) == (program, 0)  # percent-encoded keys round-trip
                counts = compare(clib, ctx, codec, walks[name], program, key)
            assert counts == {None: len(walks[name])}
            compared += len(walks[name])
    assert compared == 300 * sum(1 + len(c.tables.programs) for c in all_codecs.values())
    print(f"valid walks compared: {compared}")


def test_fuzz_statuses_match_numpy(clib, open_ctx, all_codecs, walks):
    """100,000 fuzzed sequences: identical status (DetokenizationError.reason), error position, coefficients and
    actions; every failure reason occurs."""
    rng = np.random.default_rng(22)
    totals: dict = {}
    for name, n in FUZZ.items():
        codec = all_codecs[name]
        ctx = open_ctx(codec.native_dir)
        seqs = fuzz_sequences(codec, walks[name], n, rng)
        for reason, k in compare(clib, ctx, codec, seqs, -1, None).items():
            totals[reason] = totals.get(reason, 0) + k
    assert sum(totals.values()) == sum(FUZZ.values()) >= 100_000
    for reason in ("id_out_of_range", "invalid_utf8", "coefficient_out_of_range", "wrong_count", None):
        assert totals.get(reason, 0) >= 100, totals
    print(f"fuzz sequences compared: {sum(totals.values())} {totals}")


def test_not_finite_after_post_processing(clib, open_ctx, tokenizers, tmp_path):
    """A program whose float64 result overflows float32 gives not_finite (NaN actions), like the reference."""
    from nora_edge.actions.native import native_text, write_native

    from .corpus import make_codec

    codec = make_codec(tokenizers["main"], 5, 7, "q01_q99", tmp_path / "n")
    seqs = random_walks(codec, 200, np.random.default_rng(23))
    status, pos, coeffs, norm = reference_decode(codec, seqs, None)
    prog = codec.tables.programs[0]
    base = apply_ops(prog[1], norm.reshape(-1, 5, 7))
    factor = 3.0e38 / float(np.median(np.abs(base[:, :, 2]).max(axis=1)))  # about half the chunks overflow
    huge = (prog[0], (*prog[1], ("scale", 2, factor, 0.0)))
    tables = type(codec.tables)(**{**codec.tables.__dict__, "programs": (huge,)})
    write_native(tmp_path / "n", tables)
    assert f"op scale 2 {factor!r}" in native_text(tables)
    ctx = open_ctx(tmp_path / "n")
    acts = apply_ops(huge[1], norm.reshape(-1, 5, 7)).reshape(norm.shape)
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(acts.astype(np.float32)).all(axis=1)
    status[bad], coeffs[bad], acts[bad] = SEQ_STATUS["not_finite"], 0, np.nan
    counts = compare(clib, ctx, codec, seqs, 0, None, (status, pos, coeffs, acts))
    assert counts.get("not_finite", 0) > 0 and counts.get(None, 0) > 0, counts
