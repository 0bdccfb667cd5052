"""nora_fast_select (C) against nora-edge's numpy constrained greedy step.

Data flow: per automaton state class (pending DFA state q x {start, middle, last coefficient}, plus the complete
state and states outside the automaton) 10,000 random logit rows (normal, rounded into ties, constant, NaN, -inf,
+inf; repetition penalty on random seen masks, with and without the top check) --one batched C call per
sub-batch--> ids, states, tops, statuses, seen masks == corpus.reference_select (generate.apply_repetition_penalty,
FastAutomaton.allowed/advance, lowest-model-id argmax), itself checked against generate.argmax_lowest_id row by row.
"""

from __future__ import annotations

import numpy as np
import pytest

from nora_edge.actions.automaton import AutomatonState
from nora_edge.errors import DetokenizationError, InputError
from nora_edge.generate import apply_repetition_penalty, argmax_lowest_id

from .corpus import (
    SEL_BAD_STATE,
    SEL_NO_ALLOWED,
    SEL_NOT_FINITE,
    SEL_OK,
    SEL_TOP_NOT_FINITE,
    reference_select,
)

PER_CLASS = 10_000
CALLS = (
    (0.4, 1.3, True, True),
    (0.4, 1.0, False, True),
    (0.2, 0.7, True, False),
)  # (share, penalty, seen, top)


def random_logits(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """(b, n) float32 rows of eight kinds (row index mod 8): normal x3, rounded (ties), constant, NaN, -inf, +inf."""
    x = (rng.standard_normal((b, n), dtype=np.float32) * 3).astype(np.float32)
    kind = np.arange(b) % 8
    x[kind == 3] = np.round(x[kind == 3])
    x[kind == 4] = np.float32(rng.normal())
    for r in np.flatnonzero(kind == 5):
        x[r, rng.integers(0, n, rng.integers(1, 4))] = np.nan
    for r in np.flatnonzero(kind == 6):
        x[r, rng.random(n) < rng.choice([1.0, 0.5, 0.98])] = -np.inf
    for r in np.flatnonzero(kind == 7):
        x[r, rng.integers(0, n)] = np.inf if r % 16 == 7 else -np.inf
    return x


def state_classes(codec, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Class name -> (done, pending) int32 (PER_CLASS,) each."""
    total, q = codec.total, codec.auto.dfa_states
    out = {}
    for p in range(q):
        for name, lo, hi in (("start", 0, 1), ("middle", 1, max(total - 1, 2)), ("last", total - 1, total)):
            out[f"q{p}_{name}"] = (
                rng.integers(lo, hi, PER_CLASS).astype(np.int32),
                np.full(PER_CLASS, p, np.int32),
            )
    out["complete"] = (np.full(PER_CLASS, total, np.int32), rng.integers(0, q, PER_CLASS).astype(np.int32))
    bad_done = rng.choice([-1, total + 1, 1 << 30, -(1 << 30)], PER_CLASS)
    bad_pending = rng.choice([-1, q, q + 7, 1 << 30], PER_CLASS)
    pick = rng.integers(0, 3, PER_CLASS)
    done = np.where(pick == 1, rng.integers(0, total + 1, PER_CLASS), bad_done)
    pending = np.where(pick == 0, rng.integers(0, q, PER_CLASS), bad_pending)
    out["bad_state"] = (done.astype(np.int32), pending.astype(np.int32))
    return out


def greedy_step(codec, logits, seen, penalty, state) -> tuple[int, int, int]:
    """generate.greedy's loop body for one row, in its order (top choice first): (status, id, top row).

    A state outside the automaton (greedy never holds one) raises InputError in FastAutomaton.allowed.
    """
    tb, auto = codec.tables, codec.auto
    scores = apply_repetition_penalty(logits, seen, penalty)
    try:
        top = argmax_lowest_id(scores, tb.head_ids)
    except DetokenizationError:
        return SEL_TOP_NOT_FINITE, -1, -1
    try:
        allowed = auto.allowed(state)
    except InputError:
        return SEL_BAD_STATE, -1, -1
    if not allowed.any():
        return SEL_NO_ALLOWED, -1, -1
    masked = np.full(auto.vocab_size, -np.inf, dtype=np.float32)
    masked[allowed] = scores[tb.action_rows[allowed]]
    try:
        fid = argmax_lowest_id(masked, tb.action_rows)
    except DetokenizationError:
        return SEL_NOT_FINITE, -1, -1
    auto.advance(state, fid)  # raises unless allowed
    return SEL_OK, fid, top


def agrees_with_greedy(g: tuple[int, int, int], status: int, fid: int, top_row: int, top: bool) -> bool:
    """The vectorised reference (and C) check the state before the top choice, and skip the top check when no top
    is requested; otherwise the outcome is greedy's."""
    if g[0] == SEL_TOP_NOT_FINITE:
        return status in (SEL_TOP_NOT_FINITE, SEL_BAD_STATE) if top else True
    return (g[0], g[1]) == (status, fid) and (not top or g[0] != SEL_OK or g[2] == top_row)


class Pool:
    """Random logit rows and seen masks drawn once; each class gets a fresh row order and column rotation (so
    each state meets different scores) without paying for new random numbers."""

    def __init__(self, rng: np.random.Generator, b: int, n: int) -> None:
        self.rng, self.logits, self.seen = rng, random_logits(rng, b, n), rng.random((b, n)) < 0.1

    def draw(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rng.permutation(self.logits.shape[0])[:b]
        shift = int(self.rng.integers(self.logits.shape[1]))
        return np.roll(self.logits[rows], shift, axis=1), np.roll(self.seen[rows], -shift, axis=1)


def run_class(clib, ctx, codec, done, pending, pool: Pool, counts: dict) -> int:
    """Every sub-batch of one class through C and the reference; returns rows compared."""
    n_rows, compared, start = codec.tables.head_ids.size, 0, 0
    for share, penalty, with_seen, top in CALLS:
        b = int(round(share * done.size))
        sl = slice(start, start + b)
        start += b
        logits, seen = pool.draw(b)
        seen = seen if with_seen else None
        c = clib.select(ctx, logits, seen, penalty, done[sl], pending[sl], top=top)
        r = reference_select(codec, logits, seen, penalty, done[sl], pending[sl], top=top)
        np.testing.assert_array_equal(c["status"], r["status"])
        np.testing.assert_array_equal(c["id"], r["id"])
        np.testing.assert_array_equal(c["done"], r["done"])
        np.testing.assert_array_equal(c["pending"], r["pending"])
        if top:
            ok = r["status"] == SEL_OK
            np.testing.assert_array_equal(c["top"][ok], r["top"][ok])
        if seen is not None:
            np.testing.assert_array_equal(c["seen"].astype(bool), r["seen"])
        assert c["rc"] == (0 if (r["status"] == SEL_OK).all() else 7), clib.error()
        for k in pool.rng.choice(b, min(b, 24), replace=False):  # the vectorised reference == greedy's step
            st = AutomatonState(int(done[sl][k]), int(pending[sl][k]))
            s_seen = seen[k] if seen is not None else np.zeros(n_rows, bool)
            g = greedy_step(codec, logits[k], s_seen, penalty, st)
            assert agrees_with_greedy(g, r["status"][k], r["id"][k], r["top"][k], top), (g, k)
            counts["greedy"] += 1
        for s in np.unique(r["status"]):
            counts[int(s)] = counts.get(int(s), 0) + int((r["status"] == s).sum())
        compared += b
    return compared


def test_select_matches_numpy_per_state_class(clib, open_ctx, testdata_codec):
    """>= 10,000 rows per state class on kernels/testdata (V 2048, Q 18: every 2-byte lead byte pending)."""
    codec = testdata_codec
    ctx = open_ctx(codec.native_dir)
    rng = np.random.default_rng(11)
    pool, counts = Pool(rng, PER_CLASS, codec.tables.head_ids.size), {"greedy": 0}
    classes = state_classes(codec, rng)
    per_class = {name: run_class(clib, ctx, codec, d, p, pool, counts) for name, (d, p) in classes.items()}
    assert len(per_class) == 3 * codec.auto.dfa_states + 2 == 56
    assert min(per_class.values()) >= PER_CLASS, per_class
    for s in (SEL_OK, SEL_BAD_STATE, SEL_TOP_NOT_FINITE, SEL_NO_ALLOWED, SEL_NOT_FINITE):
        assert counts.get(s, 0) > 100, counts
    assert counts["greedy"] == 56 * 3 * 24
    print(f"select rows compared: {sum(per_class.values())} in {len(per_class)} classes; statuses {counts}")


@pytest.mark.parametrize("name", ["main_5x7", "h5_5x7", "wide_5x3"])
def test_select_matches_numpy_other_codecs(clib, open_ctx, codecs, name):
    """Fewer rows per class (400) on the 2-byte, ASCII-only and 3-byte (Q 45) codecs."""
    codec = codecs[name]
    ctx = open_ctx(codec.native_dir)
    rng = np.random.default_rng(12)
    pool, counts, total = Pool(rng, 400, codec.tables.head_ids.size), {"greedy": 0}, 0
    for d, p in state_classes(codec, rng).values():
        total += run_class(clib, ctx, codec, d[:400], p[:400], pool, counts)
    assert total == 400 * (3 * codec.auto.dfa_states + 2)
    assert counts.get(SEL_OK, 0) > 0 and counts.get(SEL_BAD_STATE, 0) > 0


def test_select_walk_to_completion(clib, open_ctx, testdata_codec):
    """Whole chunks: 512 rows decoded step by step in one batch until every state is complete; each step's C
    states equal the reference, and once complete a row reports no_allowed."""
    codec = testdata_codec
    ctx = open_ctx(codec.native_dir)
    rng = np.random.default_rng(13)
    b, n_rows = 512, codec.tables.head_ids.size
    done, pending = np.zeros(b, np.int32), np.zeros(b, np.int32)
    seen = rng.random((b, n_rows)) < 0.05
    steps = 0
    while steps < 4 * codec.total + 1:
        logits = np.round(rng.standard_normal((b, n_rows), dtype=np.float32), 1)
        c = clib.select(ctx, logits, seen, 1.2, done, pending)
        r = reference_select(codec, logits, seen, 1.2, done, pending)
        for k in ("status", "id", "done", "pending"):
            np.testing.assert_array_equal(c[k], r[k])
        np.testing.assert_array_equal(c["seen"].astype(bool), r["seen"])
        done, pending, seen, steps = c["done"], c["pending"], r["seen"], steps + 1
        if (r["status"] == SEL_NO_ALLOWED).all():
            break
    assert (r["status"] == SEL_NO_ALLOWED).all() and ((done == codec.total) & (pending == 0)).all()
    assert steps > 2
