"""FastAutomaton: random walks decode, real encodings are accepted, masks equal an independent oracle."""

from __future__ import annotations

import codecs
import functools

import numpy as np
import pytest

from nora_edge.actions import FastAutomaton
from nora_edge.errors import DetokenizationError, InputError

from .reference import published_decode, smooth_chunk


@pytest.mark.parametrize(("kind", "t", "d"), [("main", 1, 7), ("main", 10, 7), ("h5", 5, 7), ("wide", 5, 3)])
def test_random_walks_decode_strictly(kind, t, d, fast_main, fast_h5, fast_wide):
    fast = {"main": fast_main, "h5": fast_h5, "wide": fast_wide}[kind]
    auto = FastAutomaton.from_tokenizer(fast, t, d)
    rng = np.random.default_rng(0)
    for _ in range(150):
        state, ids = auto.start(), []
        while not auto.is_complete(state):
            mask = auto.allowed(state)
            assert mask.any(), (ids, state)  # never a dead end
            token = int(rng.choice(np.flatnonzero(mask)))
            ids.append(token)
            state = auto.advance(state, token)
        assert not auto.allowed(state).any()
        coeffs = fast.table.decode_coefficients(ids, t, d)  # strict: raises on any problem
        ref = published_decode(fast.tokenizer, ids, t, d, fast.scale, fast.min_token)
        np.testing.assert_array_equal(coeffs, ref[0])


@pytest.mark.parametrize(("t", "d"), [(1, 7), (5, 7), (10, 14), (50, 1)])
def test_encodings_are_accepted_and_complete_exactly_at_the_end(fast_main, t, d):
    auto = FastAutomaton.from_tokenizer(fast_main.table, t, d)
    rng = np.random.default_rng(t * 100 + d)
    for _ in range(40):
        chunk = smooth_chunk(rng, t, d)
        try:
            ids = fast_main.encode(chunk)[0]
        except InputError:
            continue  # not encodable with this vocabulary (see test_fast_codec)
        state = auto.start()
        for token in ids:
            assert not auto.is_complete(state)
            assert auto.allowed(state)[token]
            state = auto.advance(state, token)
        assert auto.is_complete(state)


class Oracle:
    """Reachability by brute force: Python's incremental UTF-8 decoder, the alphabet bound, memoized search."""

    def __init__(self, table, total):
        self.tokens = [table.token_bytes(i) for i in range(table.vocab_size)]
        self.alphabet_max, self.total = table.alphabet_max, total

    def step(self, done, pending, token):
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        decoder.setstate((pending, 0))
        try:
            text = decoder.decode(token, final=False)
        except UnicodeDecodeError:
            return None
        if any(ord(ch) > self.alphabet_max for ch in text) or done + len(text) > self.total:
            return None
        pending = decoder.getstate()[0]
        if pending and self.smallest_completion(pending) > self.alphabet_max:
            return None  # the unfinished char can only end above the alphabet
        return done + len(text), pending

    @staticmethod
    @functools.cache
    def smallest_completion(pending):
        """Smallest code point whose UTF-8 encoding starts with ``pending`` (found by trying bytes)."""
        lead = pending[0]
        size = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        rest = size - len(pending)
        for b in range(0x80, 0xC0):
            try:
                return ord((pending + bytes([b]) + b"\x80" * (rest - 1)).decode("utf-8"))
            except UnicodeDecodeError:
                continue
        return 0x110000

    @functools.cache  # noqa: B019 (one oracle per test)
    def completable(self, done, pending):
        if done == self.total and pending == b"":
            return True
        return any(
            (nxt := self.step(done, pending, tok)) is not None and self.completable(*nxt)
            for tok in self.tokens
        )

    def mask(self, done, pending):
        out = np.zeros(len(self.tokens), dtype=bool)
        for i, tok in enumerate(self.tokens):
            nxt = self.step(done, pending, tok)
            out[i] = nxt is not None and self.completable(*nxt)
        return out


@pytest.mark.parametrize(("kind", "t", "d"), [("main", 1, 1), ("main", 1, 3), ("h5", 1, 2), ("wide", 1, 2)])
def test_masks_equal_bruteforce_oracle(kind, t, d, fast_main, fast_h5, fast_wide):
    """Exactness: over every state reachable from the start (both sides stepped by the same ids), the mask
    allows exactly the ids after which the oracle can still finish with T*D coefficients."""
    fast = {"main": fast_main, "h5": fast_h5, "wide": fast_wide}[kind]
    auto = FastAutomaton.from_tokenizer(fast, t, d)
    oracle = Oracle(fast.table, t * d)
    frontier = {(0, b""): auto.start()}
    visited = set()
    while frontier:
        key, state = frontier.popitem()
        visited.add(key)
        done, pending = key
        mask = auto.allowed(state)
        np.testing.assert_array_equal(mask, oracle.mask(done, pending))
        assert auto.is_complete(state) == (done == t * d and pending == b"")
        for token in np.flatnonzero(mask).tolist():
            nxt = oracle.step(done, pending, oracle.tokens[token])
            if nxt not in visited:
                frontier.setdefault(nxt, auto.advance(state, token))
    seen = len(visited)
    assert seen > t * d  # more than the plain path: pending states were visited too


def test_never_allowed_ids_are_undecodable(fast_wide):
    auto = FastAutomaton.from_tokenizer(fast_wide, 5, 3)
    never = np.flatnonzero(auto.never_allowed)
    assert never.size > 0  # e.g. alphabet tokens that stand for bytes 0xC0, 0xF5..0xFF
    for token in never.tolist():
        raw = fast_wide.table.token_bytes(token)
        # no surrounding context makes it valid: try it alone, and behind every possible pending lead
        for lead in [b"", *[bytes([b]) for b in range(0xC2, 0xF0)]]:
            try:
                text = (lead + raw).decode("utf-8", errors="strict")
            except UnicodeDecodeError:
                try:
                    codecs.getincrementaldecoder("utf-8")().decode(lead + raw, final=False)
                except UnicodeDecodeError:
                    continue
                text = ""
            assert any(ord(c) > fast_wide.table.alphabet_max for c in text) or not text


def test_advance_rejects_disallowed_and_out_of_range(fast_h5):
    auto = FastAutomaton.from_tokenizer(fast_h5, 5, 7)
    state = auto.start()
    banned = np.flatnonzero(~auto.allowed(state))
    if banned.size:
        with pytest.raises(DetokenizationError, match="not allowed after 0 of 35") as info:
            auto.advance(state, int(banned[0]))
        assert info.value.reason == "not_allowed"
    with pytest.raises(DetokenizationError, match="outside the vocabulary"):
        auto.advance(state, fast_h5.vocab_size)
    # one coefficient left: only ids completing exactly one more coefficient are allowed
    ids = fast_h5.encode(smooth_chunk(np.random.default_rng(3), 5, 7))[0]
    for token in ids[:-1]:
        state = auto.advance(state, token)
    mask = auto.allowed(state)
    assert mask[ids[-1]]
    left = 35 - state.done
    for token in np.flatnonzero(mask).tolist()[:200]:
        assert auto.advance(state, token).done <= 35
    assert left >= 1


def test_bad_construction(fast_h5):
    with pytest.raises(InputError, match="time_horizon"):
        FastAutomaton.from_tokenizer(fast_h5, 0, 7)
    with pytest.raises(InputError, match="FastTokenizer or ByteTable"):
        FastAutomaton.from_tokenizer(object(), 5, 7)


def test_cached_masks_are_read_only_and_equal_fresh(fast_h5):
    auto = FastAutomaton.from_tokenizer(fast_h5, 5, 7)
    state = auto.start()
    for token in fast_h5.encode(smooth_chunk(np.random.default_rng(4), 5, 7))[0]:
        cached = auto.allowed(state)
        assert auto.allowed(state) is cached and not cached.flags.writeable
        np.testing.assert_array_equal(cached, auto.compute_mask(state))
        state = auto.advance(state, token)
    with pytest.raises(InputError, match="invalid automaton state"):
        auto.allowed(type(state)(99, 0))
