"""Token automaton for constrained greedy decoding of FAST ids.

Data flow (built once per (T, D)): byte table --per-id bytes--> UTF-8 DFA restricted to the coefficient
alphabet U+0000..alphabet_max (states: char boundary + every proper prefix of an allowed char's encoding)
--run each token from each DFA state--> per (state, id): valid, chars completed, next state
--DP over (coefficients remaining, state)--> reach table.
At generation time: state (done, pending) --allowed()--> bool (V,) mask, a handful of vectorised numpy ops:
an id is allowed iff its bytes continue the pending char validly and exactly T*D coefficients stay reachable.
So every sequence built from allowed ids decodes strictly into (T, D), and ``is_complete`` says when to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nora_edge.actions.bytetable import ByteTable, detokenization_error
from nora_edge.errors import InputError

NOOP_BYTE = 256  # padding column of the DFA: leaves every state unchanged
MAX_PREFIX = 3  # a pending UTF-8 prefix needs at most 3 more bytes
MASK_CACHE_SIZE = 4096  # cached masks per automaton (<= 4096 * V bytes)


@dataclass(frozen=True)
class AutomatonState:
    """Decoding progress.

    Attributes:
        done: coefficients (code points) completed so far.
        pending: DFA state of the unfinished char (0 = at a char boundary).
    """

    done: int
    pending: int


def build_utf8_dfa(alphabet_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte DFA accepting UTF-8 strings of code points 0..alphabet_max.

    Returns:
        delta: int32 (Q+1, 257) next state; row Q is the dead state, column 256 the no-op byte.
        completes: bool (Q+1, 257), True where the byte finishes a char.
        prefix_len: int32 (Q,) pending bytes held by each state (state 0: boundary, length 0).
    """
    if not 0 <= alphabet_max <= 0xD7FF:
        raise InputError(f"automaton supports an alphabet up to U+D7FF, got alphabet_max {alphabet_max}")
    complete = {chr(cp).encode("utf-8") for cp in range(alphabet_max + 1)}
    prefixes = sorted({enc[:j] for enc in complete for j in range(1, len(enc))})
    states = [b"", *prefixes]
    index = {p: i for i, p in enumerate(states)}
    dead = len(states)
    delta = np.full((dead + 1, NOOP_BYTE + 1), dead, dtype=np.int32)
    completes = np.zeros((dead + 1, NOOP_BYTE + 1), dtype=bool)
    for i, prefix in enumerate(states):
        delta[i, NOOP_BYTE] = i
        for b in range(256):
            seq = prefix + bytes((b,))
            if seq in complete:
                delta[i, b], completes[i, b] = 0, True
            elif seq in index:
                delta[i, b] = index[seq]
    prefix_len = np.array([len(p) for p in states], dtype=np.int32)
    return delta, completes, prefix_len


def leading_bytes(table: ByteTable, width: int) -> np.ndarray:
    """int32 (V, width): each id's first ``width`` bytes, padded with the no-op byte 256."""
    lengths = table.lengths.astype(np.int64)  # (V,)
    pos = np.arange(width)[None, :]  # (1, width)
    index = np.minimum(
        table.offsets[:-1, None].astype(np.int64) + pos, max(table.data.size - 1, 0)
    )  # (V, width)
    return np.where(pos < lengths[:, None], table.data[index].astype(np.int32), NOOP_BYTE)


def scan_tokens(delta: np.ndarray, completes: np.ndarray, table: ByteTable, start_state: int, start_pos: int):
    """Run every token through the DFA from ``start_state``, beginning at byte ``start_pos``.

    Ids are processed longest first, so position ``p`` touches only the ids longer than ``p``: the work is
    proportional to the total byte count, not V * (longest token).

    Returns:
        (count int32 (V,), end int32 (V,)): chars completed and the final state (dead = Q).
    """
    lengths = table.lengths.astype(np.int64)  # (V,)
    order = np.argsort(-lengths, kind="stable")  # longest first
    starts = table.offsets[:-1].astype(np.int64)[order]  # (V,)
    longer = np.searchsorted(-lengths[order], -np.arange(int(lengths.max())), side="left")  # (Lmax,) ids > p
    state = np.full(lengths.size, start_state, dtype=np.int32)
    count = np.zeros(lengths.size, dtype=np.int32)
    for pos in range(start_pos, int(lengths.max())):
        n = int(longer[pos])
        col = table.data[starts[:n] + pos]  # (n,) byte at ``pos`` of the n longest ids
        sub = state[:n]
        count[:n] += completes[sub, col]
        state[:n] = delta[sub, col]
    out_count, out_state = np.empty_like(count), np.empty_like(state)
    out_count[order], out_state[order] = count, state
    return out_count, out_state


def token_transitions(
    delta: np.ndarray, completes: np.ndarray, table: ByteTable
) -> tuple[np.ndarray, np.ndarray]:
    """Chars completed and next state for every (DFA state, id).

    A pending state returns to the boundary within ``MAX_PREFIX`` bytes or dies, after which the run equals
    the boundary run started at that byte; only those first bytes are simulated per state.

    Returns:
        adv int32 (Q, V) and nxt int32 (Q, V) (nxt == Q where the id is invalid from that state).
    """
    n_states = delta.shape[0] - 1
    n_ids = table.vocab_size
    from_boundary = [scan_tokens(delta, completes, table, 0, p) for p in range(MAX_PREFIX + 1)]
    tail_count = np.stack([c for c, _ in from_boundary])  # (MAX_PREFIX+1, V)
    tail_end = np.stack([e for _, e in from_boundary])  # (MAX_PREFIX+1, V)
    head = leading_bytes(table, MAX_PREFIX)  # (V, MAX_PREFIX)
    adv = np.zeros((n_states, n_ids), dtype=np.int32)
    nxt = np.zeros((n_states, n_ids), dtype=np.int32)
    adv[0], nxt[0] = from_boundary[0]
    ids = np.arange(n_ids)
    for q in range(1, n_states):
        state = np.full(n_ids, q, dtype=np.int32)
        returned_at = np.zeros(n_ids, dtype=np.int32)  # byte position after the pending char completed
        for pos in range(MAX_PREFIX):
            col = head[:, pos]
            finish = completes[state, col] & (returned_at == 0)
            returned_at[finish] = pos + 1
            state = np.where(returned_at == 0, delta[state, col], state)
        back = returned_at > 0
        adv[q] = np.where(back, 1 + tail_count[returned_at, ids], 0)
        nxt[q] = np.where(back, tail_end[returned_at, ids], state)
    return adv, nxt


def reach_table(adv: np.ndarray, nxt: np.ndarray, prefix_len: np.ndarray, total: int) -> np.ndarray:
    """reach[r, q]: from pending state q with r coefficients still to complete, some id sequence ends exactly.

    Transitions that complete nothing go to a longer prefix, so for each r the states are solved from the
    longest prefix down to the boundary.

    Returns:
        bool (total+1, Q).
    """
    n_states = adv.shape[0]
    dead = n_states
    q_idx, v_idx = np.nonzero(nxt != dead)
    pairs = np.unique(np.stack([q_idx, adv[q_idx, v_idx], nxt[q_idx, v_idx]], axis=1), axis=0)  # (P, 3)
    reach = np.zeros((total + 1, n_states), dtype=bool)
    reach[0, 0] = True
    levels = [np.flatnonzero(prefix_len == k) for k in sorted(set(prefix_len.tolist()), reverse=True)]
    by_level = [pairs[np.isin(pairs[:, 0], lv)] for lv in levels]
    for r in range(1, total + 1):
        for lv_pairs in by_level:
            ok = lv_pairs[:, 1] <= r
            src, a, dst = lv_pairs[ok, 0], lv_pairs[ok, 1], lv_pairs[ok, 2]
            hit = reach[r - a, dst]
            reach[r, src[hit]] = True
    return reach


class FastAutomaton:
    """Allowed-id masks that keep a FAST id sequence decodable into exactly T*D coefficients.

    Attributes:
        total: T*D, the coefficient count to reach.
        vocab_size: V.
    """

    def __init__(self, table: ByteTable, time_horizon: int, action_dim: int) -> None:
        for name, value in (("time_horizon", time_horizon), ("action_dim", action_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        self.time_horizon, self.action_dim = int(time_horizon), int(action_dim)
        self.total = self.time_horizon * self.action_dim
        self.vocab_size = table.vocab_size
        self.alphabet_max = table.alphabet_max
        delta, completes, self._prefix_len = build_utf8_dfa(table.alphabet_max)
        self._adv, self._nxt = token_transitions(delta, completes, table)  # (Q, V) each
        self._dead = self._adv.shape[0]
        self._reach = reach_table(self._adv, self._nxt, self._prefix_len, self.total)  # (total+1, Q)
        # (Q, V) ids never usable from a state at all: invalid bytes, or chars outside the alphabet
        self._valid = self._nxt != self._dead
        self._nxt_safe = np.where(self._valid, self._nxt, 0)
        for arr in (self._adv, self._nxt, self._reach):
            arr.setflags(write=False)
        self._mask_cache: dict[tuple[int, int], np.ndarray] = {}
        if not self._reach[self.total, 0]:
            raise InputError(f"no FAST id sequence decodes into exactly {self.total} coefficients")

    @classmethod
    def from_tokenizer(cls, source: object, time_horizon: int, action_dim: int) -> FastAutomaton:
        """Build from a :class:`~nora_edge.actions.fast.FastTokenizer` or a :class:`ByteTable`."""
        table = source if isinstance(source, ByteTable) else getattr(source, "table", None)
        if not isinstance(table, ByteTable):
            raise InputError(f"expected a FastTokenizer or ByteTable, got {type(source).__name__}")
        return cls(table, time_horizon, action_dim)

    @property
    def dfa_states(self) -> int:
        """Q: UTF-8 DFA states (0 = char boundary); Q itself is the dead state in :meth:`tables`."""
        return int(self._dead)

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The arrays the C library (``kernels/``) runs on, read-only.

        Returns:
            adv int32 (Q, V) coefficients each id completes from each state; nxt int32 (Q, V) next state
            (Q = invalid); reach bool (T*D+1, Q).
        """
        return self._adv, self._nxt, self._reach

    @property
    def never_allowed(self) -> np.ndarray:
        """bool (V,): ids that are invalid from every state (can never appear in a decodable sequence)."""
        return ~self._valid.any(axis=0)

    def start(self) -> AutomatonState:
        """State before the first id."""
        return AutomatonState(0, 0)

    def is_complete(self, state: AutomatonState) -> bool:
        """True when exactly T*D coefficients are complete and no char is pending."""
        return state.done == self.total and state.pending == 0

    def allowed(self, state: AutomatonState) -> np.ndarray:
        """bool (V,) mask of ids after which exact completion stays reachable (all False when complete).

        Masks are cached per state (bounded), so the returned array is shared and read-only.
        """
        key = (state.done, state.pending)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = self.compute_mask(state)
            if len(self._mask_cache) >= MASK_CACHE_SIZE:
                self._mask_cache.clear()
            self._mask_cache[key] = mask
        return mask

    def compute_mask(self, state: AutomatonState) -> np.ndarray:
        """Uncached :meth:`allowed`: a few vectorised ops over (V,); read-only result."""
        if not (0 <= state.done <= self.total and 0 <= state.pending < self._dead):
            raise InputError(f"invalid automaton state {state} (total {self.total}, {self._dead} DFA states)")
        left = self.total - state.done
        rest = left - self._adv[state.pending]  # (V,) coefficients still needed after each id
        mask = self._valid[state.pending] & (rest >= 0)
        mask &= self._reach[np.maximum(rest, 0), self._nxt_safe[state.pending]]
        mask.setflags(write=False)
        return mask

    def advance(self, state: AutomatonState, token_id: int) -> AutomatonState:
        """State after ``token_id``.

        Raises:
            DetokenizationError: the id is out of range or not allowed in ``state`` (reason ``not_allowed``).
        """
        tid = int(token_id)
        if not 0 <= tid < self.vocab_size:
            raise detokenization_error(
                "id_out_of_range", f"FAST id {tid} is outside the vocabulary [0, {self.vocab_size})"
            )
        if not self.allowed(state)[tid]:
            raise detokenization_error(
                "not_allowed",
                f"FAST id {tid} is not allowed after {state.done} of {self.total} coefficients"
                f" (pending state {state.pending}): the sequence could no longer decode into exactly"
                f" {self.total} coefficients",
            )
        q = state.pending
        return AutomatonState(state.done + int(self._adv[q, tid]), int(self._nxt[q, tid]))
