"""Corpora and numpy references for the libnora_fast tests, and the corpus files the C driver reads.

Data flow:
  smooth synthetic chunks --FastTokenizer.fit--> byte table --FastAutomaton (T, D)--> + a shuffled synthetic head
  + a post-processing chain --build_native / write_native--> codec/native/ dir (:func:`make_codec`)
  random walks through the automaton (valid), fuzzed id sequences (:func:`fuzz_sequences`), random logits
  --numpy reference (:func:`reference_select`: generate.apply_repetition_penalty + FastAutomaton.allowed/advance
  + the lowest-id argmax; :func:`reference_decode`: ByteTable.decode_coefficients, scipy's iDCT, Chain.apply)-->
  expected outputs --:class:`CorpusWriter`--> a corpus dir that ``kernels/tools/check_corpus.c`` replays.

Corpus dir format (all arrays little-endian, row-major): ``manifest.txt`` lines
  ``select NAME B STRIDE PENALTY HAS_SEEN HAS_TOP``: NAME.logits.f32 (B, STRIDE), NAME.seen.u8 (B, STRIDE) if
      HAS_SEEN, NAME.done.i32 / NAME.pending.i32 (B,); expected NAME.x_id.i32, NAME.x_done.i32,
      NAME.x_pending.i32, NAME.x_status.i32, NAME.x_top.i32 (B,) (-1 = not compared), NAME.x_seen.u8 if HAS_SEEN
  ``decode NAME B STRIDE PROGRAM``: NAME.ids.i32 (B, STRIDE), NAME.lengths.i32 (B,); expected NAME.x_status.i32,
      NAME.x_pos.i32 (B,), NAME.x_coeffs.i32 (B, T*D), NAME.x_actions.f64 (B, T*D) (NaN where failed)
  ``open NAME RC``: NAME/ is a native dir that nora_fast_ctx_open must answer with RC.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.fft import idct

from nora_edge.actions import ByteTable, FastAutomaton, FastTokenizer
from nora_edge.actions.automaton import AutomatonState
from nora_edge.actions.native import NativeTables, build_native, write_native
from nora_edge.actions.normalize import NormStats
from nora_edge.actions.postprocess import Chain
from nora_edge.errors import DetokenizationError, InputError
from nora_edge.generate import apply_repetition_penalty

# nora_fast.h status codes (nora_fast_sel_status / nora_fast_seq_status)
SEL_OK, SEL_BAD_STATE, SEL_TOP_NOT_FINITE, SEL_NO_ALLOWED, SEL_NOT_FINITE = range(5)
SEQ_STATUS = {
    None: 0,
    "id_out_of_range": 1,
    "invalid_utf8": 2,
    "coefficient_out_of_range": 3,
    "wrong_count": 4,
    "not_finite": 5,
}
OTHER_ROWS, BASE = 64, 5000  # non-action head rows; model id of FAST id 0


def smooth_chunks(seed: int, shapes: list[tuple[int, int]], per_shape: int, amp: float = 0.35) -> list:
    """Sums of three random sinusoids per dim, float64 (T, D) each (FAST's training data shape)."""
    rng = np.random.default_rng(seed)
    out = []
    for t, d in shapes:
        time = np.linspace(0.0, 1.0, t)[:, None]  # (T, 1)
        for _ in range(per_shape):
            a, f, p = (
                rng.normal(0, amp, (3, 1, d)),
                rng.uniform(0.2, 2, (3, 1, d)),
                rng.uniform(0, 6.3, (3, 1, d)),
            )
            out.append((a * np.sin(2 * np.pi * f * time + p)).sum(0) + rng.normal(0, 0.01, (t, d)))
    return out


def fit_tokenizer(kind: str) -> FastTokenizer:
    """fast_main-like (2-byte chars, vocab 2048), fast_h5-like (ASCII, 1024) or fast_wide-like (3-byte chars)."""
    if kind == "main":
        shapes = [(1, 7), (5, 7), (10, 7), (50, 7), (5, 1), (10, 14), (1, 14)]
        return FastTokenizer.fit(smooth_chunks(0, shapes, 300), scale=10.0, vocab_size=2048)
    if kind == "h5":
        return FastTokenizer.fit(smooth_chunks(1, [(5, 7)], 2000), scale=10.0, vocab_size=1024)
    rng = np.random.default_rng(2)
    walks = list(np.cumsum(rng.normal(0.0, 1.0, (2000, 5, 3)), axis=1) * 12.0)  # (B, T, D) random walks
    return FastTokenizer.fit(walks, scale=10.0, vocab_size=8192)


def make_chain(kind: str, d: int, rng: np.random.Generator) -> tuple[Chain, dict[str, NormStats]]:
    """q01/q99 by the caller's key (2 keys, one with a percent-encoded name) + NORA's gripper steps; min_max with
    a mask; or mean_std."""
    stats = {
        k: NormStats(k, rng.uniform(-1.0, -0.01, d), rng.uniform(0.01, 1.0, d))
        for k in ("robot_a", "b%20 é/x")
    }
    if kind == "q01_q99":
        steps = [{"op": "unnormalize", "mode": "q01_q99", "key": None, "source": "norm_stats.json"}]
        steps += [{"op": op, "dim": -1} for op in ("gripper_rescale", "gripper_binarize", "gripper_invert")]
    elif kind == "min_max":
        mask = [bool(m) for m in rng.integers(0, 2, d)]
        lo = rng.uniform(-3, -0.1, d)
        steps = [
            {"op": "unnormalize", "mode": "min_max", "min": lo.tolist(), "max": (-lo).tolist(), "mask": mask}
        ]
    else:
        steps = [{"op": "unnormalize", "mode": "mean_std", "mean": rng.normal(0, 1, d).tolist(),
                  "std": rng.uniform(0.1, 2, d).tolist()}]  # fmt: skip
    return Chain.from_json(steps, InputError, "test chain").validate(d, stats, InputError, "t"), stats


@dataclass
class Codec:
    """One codec as the tests see it: the numpy references and the native dir the C library reads."""

    table: ByteTable
    auto: FastAutomaton
    tables: NativeTables
    chain: Chain
    stats: dict[str, NormStats]
    native_dir: Path

    @property
    def total(self) -> int:
        return self.auto.total

    def program_stats(self, key: str) -> NormStats | None:
        """The stats Chain.apply takes for the program named ``key`` ("" = a chain without q01/q99)."""
        return self.stats.get(key) if key else None


def make_codec(tok: FastTokenizer, t: int, d: int, chain_kind: str, directory: Path, seed: int = 0) -> Codec:
    """Build and write codec/native/ for (T, D) with a shuffled head (ties depend on the model-id order)."""
    rng = np.random.default_rng(seed)
    table = tok.table
    auto = FastAutomaton(table, t, d)
    head = np.concatenate([np.arange(OTHER_ROWS), BASE + np.arange(table.vocab_size)])  # (n_rows,) model ids
    head = head[rng.permutation(head.size)]
    chain, stats = make_chain(chain_kind, d, rng)
    tables = build_native(table, auto, head, BASE, chain, stats)
    write_native(directory, tables)
    return Codec(table, auto, tables, chain, stats, directory)


# ---- selection reference -----------------------------------------------------------------------------------
def lowest_key_argmax(scores: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """generate.argmax_lowest_id over rows: (B, n) scores, (n,) distinct keys -> (index (B,), finite (B,)).

    Columns are visited in key order, so numpy's first-occurrence argmax is the lowest key among ties; a NaN
    anywhere is what argmax returns (numpy's max would be NaN too), so ``finite`` is False exactly when
    ``argmax_lowest_id`` raises.
    """
    order = np.argsort(keys, kind="stable")
    s = scores[:, order]  # (B, n) in key order
    i = s.argmax(axis=1)
    return order[i], np.isfinite(s[np.arange(s.shape[0]), i])


def reference_select(codec: Codec, logits, seen, penalty, done, pending, top: bool = True):
    """nora_edge.generate.greedy's constrained step on B rows, vectorised over rows with equal states.

    Args:
        logits: (B, n_rows) float32; seen: (B, n_rows) bool or None; penalty: float;
        done, pending: (B,) int automaton states; top: whether the model's own top choice is checked.

    Returns:
        dict of (B,) arrays: id (-1 unless OK), done, pending, top (-1 unless OK), status; seen (B, n_rows) after.
    """
    tb, auto = codec.tables, codec.auto
    b = logits.shape[0]
    seen_in = np.zeros(logits.shape, bool) if seen is None else seen.astype(bool)
    scores = apply_repetition_penalty(logits, seen_in, penalty)  # (B, n_rows) float32
    out = {k: np.full(b, -1, np.int64) for k in ("id", "top")}
    out["status"] = np.zeros(b, np.int64)
    out["done"], out["pending"] = done.astype(np.int64), pending.astype(np.int64)
    top_row, top_ok = lowest_key_argmax(scores, tb.head_ids)
    states = np.stack([done, pending], axis=1)
    for st in np.unique(states, axis=0):
        rows = np.flatnonzero((states == st).all(axis=1))
        try:
            mask = auto.allowed(AutomatonState(int(st[0]), int(st[1])))  # (V,)
        except InputError:
            out["status"][rows] = SEL_BAD_STATE
            continue
        ids = np.flatnonzero(mask)  # allowed FAST ids
        if ids.size:
            sub, ok = lowest_key_argmax(scores[np.ix_(rows, tb.action_rows[ids])], tb.action_rows[ids])
            fid, status = ids[sub], np.where(ok, SEL_OK, SEL_NOT_FINITE)
        else:
            fid, status = np.full(rows.size, -1), np.full(rows.size, SEL_NO_ALLOWED)
        if top:
            status = np.where(top_ok[rows], status, SEL_TOP_NOT_FINITE)
        out["status"][rows] = status
        good = rows[status == SEL_OK]
        out["id"][good] = fid[status == SEL_OK]
        out["top"][good] = top_row[good] if top else -1
        for f in np.unique(out["id"][good]):
            nxt = auto.advance(AutomatonState(int(st[0]), int(st[1])), int(f))
            hit = good[out["id"][good] == f]
            out["done"][hit], out["pending"][hit] = nxt.done, nxt.pending
    seen_out = seen_in.copy()
    if seen is not None and penalty != 1.0:
        ok = np.flatnonzero(out["status"] == SEL_OK)
        seen_out[ok, tb.action_rows[out["id"][ok]]] = True
    out["seen"] = seen_out
    return out


# ---- decode reference ----------------------------------------------------------------------------------------
def reference_decode_one(codec: Codec, ids: list[int]) -> tuple[int, int, np.ndarray | None]:
    """(status, error position, int64 (T*D,) coefficients or None) of one sequence (nora_edge's strict decode)."""
    table, t, d = codec.table, codec.auto.time_horizon, codec.auto.action_dim
    try:
        return 0, -1, table.decode_coefficients(ids, t, d).reshape(-1)
    except DetokenizationError as exc:
        reason = exc.reason  # type: ignore[attr-defined]
    arr = np.asarray(ids, np.int64)
    if reason == "id_out_of_range":
        return SEQ_STATUS[reason], int(np.flatnonzero((arr < 0) | (arr >= table.vocab_size))[0]), None
    if reason == "wrong_count":
        return SEQ_STATUS[reason], -1, None
    raw = b"".join(table.token_bytes(i) for i in ids)
    ends = np.cumsum(table.lengths[arr])  # (L,) end byte of each id
    if reason == "invalid_utf8":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return SEQ_STATUS[reason], int(np.searchsorted(ends, exc.start, side="right")), None
    text = raw.decode("utf-8")
    i = next(i for i, ch in enumerate(text) if ord(ch) > table.alphabet_max)
    offset = len(text[:i].encode("utf-8"))
    return SEQ_STATUS[reason], int(np.searchsorted(ends, offset, side="right")), None


def reference_decode(codec: Codec, seqs: list[list[int]], key: str | None):
    """Strict decode of every sequence; actions by scipy's orthonormal iDCT (the published FAST decode) and
    Chain.apply for program ``key`` (None: normalized actions).

    Returns:
        status (B,), pos (B,), coeffs int64 (B, T*D) (0 where failed), actions float64 (B, T*D) (NaN where failed).
    """
    t, d, total = codec.auto.time_horizon, codec.auto.action_dim, codec.total
    n = len(seqs)
    status, pos = np.zeros(n, np.int64), np.full(n, -1, np.int64)
    coeffs = np.zeros((n, total), np.int64)
    for b, s in enumerate(seqs):
        status[b], pos[b], c = reference_decode_one(codec, s)
        if c is not None:
            coeffs[b] = c
    ok = status == 0
    actions = np.full((n, total), np.nan)
    norm = idct(coeffs[ok].reshape(-1, t, d) / codec.table.scale, axis=1, norm="ortho")  # (n_ok, T, D)
    if key is not None:
        norm = codec.chain.apply(norm, codec.program_stats(key))
    actions[ok] = norm.reshape(-1, total)
    with np.errstate(over="ignore"):
        bad = ok & ~np.isfinite(actions.astype(np.float32)).all(axis=1)
    status[bad], coeffs[bad], actions[bad] = SEQ_STATUS["not_finite"], 0, np.nan
    return status, pos, coeffs, actions


def apply_ops(ops, x: np.ndarray) -> np.ndarray:
    """A native.txt program on float64 (B, T, D) actions, op by op as native.py documents them."""
    a = x.copy()
    for name, d, p, q in ops:
        col = a[..., d]
        if name == "range":
            a[..., d] = 0.5 * (col + 1.0) * (q - p) + p
        elif name == "affine":
            a[..., d] = col * p + q
        elif name == "scale":
            a[..., d] = col * p
        else:
            a[..., d] = np.sign(col)
    return a


# ---- id sequences ----------------------------------------------------------------------------------------
def random_walks(codec: Codec, n: int, rng: np.random.Generator) -> list[list[int]]:
    """``n`` valid sequences: each step a uniformly random allowed id (half biased to the shortest tokens)."""
    auto, lengths = codec.auto, codec.table.lengths
    out = []
    for k in range(n):
        state, ids = auto.start(), []
        while not auto.is_complete(state):
            allowed = np.flatnonzero(auto.allowed(state))
            if k % 2:
                allowed = allowed[lengths[allowed] == lengths[allowed].min()]
            ids.append(int(allowed[rng.integers(allowed.size)]))
            state = auto.advance(state, ids[-1])
        out.append(ids)
    return out


def spellings_above_alphabet(table: ByteTable, limit: int = 20_000) -> list[list[int]]:
    """Id sequences spelling one well-formed char just above the alphabet (each split of its 2-4 UTF-8 bytes
    into at most three tokens), for chars alphabet_max+1 .. +limit; may be empty."""
    by_bytes: dict[bytes, int] = {}
    for i in range(table.vocab_size):
        by_bytes.setdefault(table.token_bytes(i), i)
    out = []
    for cp in range(table.alphabet_max + 1, min(table.alphabet_max + limit, 0xD800)):
        e = chr(cp).encode("utf-8")
        cuts = [(a, b) for a in range(1, len(e) + 1) for b in range(a, len(e) + 1)]
        for a, b in cuts:
            parts = [p for p in (e[:a], e[a:b], e[b:]) if p]
            if all(p in by_bytes for p in parts):
                out.append([by_bytes[p] for p in parts])
                break
    return out


def fuzz_sequences(codec: Codec, walks: list[list[int]], n: int, rng: np.random.Generator) -> list[list[int]]:
    """``n`` sequences: random ids (some out of range), truncated / extended / spliced / mutated walks, byte-level
    junk (random single-byte and lead/continuation-byte tokens), empty sequences."""
    v = codec.table.vocab_size
    single = np.flatnonzero(codec.table.lengths == 1)  # byte-level tokens
    above = spellings_above_alphabet(codec.table)
    out: list[list[int]] = []
    for k in range(n):
        kind = k % 8
        w = walks[rng.integers(len(walks))]
        if kind == 0:
            s = rng.integers(0, v, rng.integers(1, 2 * len(w) + 2)).tolist()
        elif kind == 1:
            s = w[: rng.integers(0, len(w))]
        elif kind == 2:
            s = w + walks[rng.integers(len(walks))][: rng.integers(1, 4)]
        elif kind == 3:
            s = list(w)
            for _ in range(rng.integers(1, 3)):
                wild = (-1, v, v + 1, -(2**31), 2**31 - 1)[rng.integers(5)]
                s[rng.integers(len(s))] = int(rng.integers(0, v)) if k % 16 == 3 else wild
        elif kind == 4:
            s = single[rng.integers(0, single.size, rng.integers(1, 3 * len(w)))].tolist()
        elif kind == 5:
            s = [] if k % 16 == 5 else w[: rng.integers(0, len(w) + 1)] + w[rng.integers(0, len(w)) :]
        elif kind == 6 and k % 16 == 6:
            s = list(w)
            s.insert(int(rng.integers(len(s) + 1)), int(single[rng.integers(single.size)]))
        elif kind == 6:  # a well-formed char above the alphabet, spelled with byte tokens, at a char boundary
            s = (list(above[rng.integers(len(above))]) if above else [-1]) + list(w)
        else:
            s = list(w)
            del s[rng.integers(len(s))]
        out.append([int(i) for i in s])
    return out


def pack(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Sequences -> ids int32 (B, max(L, 1)) padded with -7 (never read) and lengths int32 (B,)."""
    lengths = np.array([len(s) for s in seqs], np.int32)
    ids = np.full((len(seqs), max(int(lengths.max(initial=0)), 1)), -7, np.int32)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
    return ids, lengths


# ---- corpus files for kernels/tools/check_corpus.c -----------------------------------------------------------
class CorpusWriter:
    """Writes cases into a corpus dir (module docstring) and counts them."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []

    def _arr(self, name: str, arr: np.ndarray, dtype: str) -> None:
        (self.dir / name).write_bytes(np.ascontiguousarray(arr, dtype=dtype).tobytes())

    def select(self, name: str, logits, seen, penalty: float, done, pending, ref: dict, top: bool) -> None:
        b, stride = logits.shape
        self._arr(f"{name}.logits.f32", logits, "<f4")
        for f, a in (("done", done), ("pending", pending)):
            self._arr(f"{name}.{f}.i32", a, "<i4")
        for f in ("id", "done", "pending", "status", "top"):
            self._arr(f"{name}.x_{f}.i32", ref[f], "<i4")
        if seen is not None:
            self._arr(f"{name}.seen.u8", seen, "u1")
            self._arr(f"{name}.x_seen.u8", ref["seen"], "u1")
        self.lines.append(f"select {name} {b} {stride} {penalty!r} {int(seen is not None)} {int(top)}")

    def decode(self, name: str, seqs: list[list[int]], program: int, ref) -> None:
        ids, lengths = pack(seqs)
        status, pos, coeffs, actions = ref
        self._arr(f"{name}.ids.i32", ids, "<i4")
        self._arr(f"{name}.lengths.i32", lengths, "<i4")
        for f, a, dt in (("status", status, "<i4"), ("pos", pos, "<i4"), ("coeffs", coeffs, "<i4")):
            self._arr(f"{name}.x_{f}.i32", a, dt)
        self._arr(f"{name}.x_actions.f64", actions, "<f8")
        self.lines.append(f"decode {name} {ids.shape[0]} {ids.shape[1]} {program}")

    def open_case(self, name: str, rc: int) -> Path:
        """Register a native dir the caller fills at ``dir/name``; returns that path."""
        self.lines.append(f"open {name} {rc}")
        return self.dir / name

    def finish(self) -> Path:
        (self.dir / "manifest.txt").write_text("\n".join(self.lines) + "\n")
        return self.dir


def quoted(key: str) -> str:
    """A program key as native.txt spells it."""
    return "=" + urllib.parse.quote(key, safe="")
