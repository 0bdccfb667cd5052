"""The timed paths of the kernels benchmark: codecs, valid id sequences, decode and select on C / numpy / published.

Data flow: a codec (a FAST+-like tokenizer fitted here, or a bundle's own) --build_native / write_native (or the
bundle's codec/native/)--> ``nora_fast_ctx_open`` via ctypes; smooth chunks --FastTokenizer.encode--> valid id
sequences (automaton random walks where too few encode) --:func:`corpus_arrays`--> padded ids (N, L) + one greedy
selection row per token (state, logits (n_rows,) with the sequence's next id on top, seen rows)
--:func:`bench_decode` / :func:`bench_select`--> outputs checked against each other, then µs samples per path,
timed interleaved with the order rotated. Used by ``kernels_bench`` (report, CLI).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nora_edge.actions import FastAutomaton, FastTokenizer
from nora_edge.actions.automaton import AutomatonState
from nora_edge.actions.native import NativeTables, build_native, write_native
from nora_edge.actions.normalize import NormStats
from nora_edge.actions.postprocess import Chain, default_chain
from nora_edge.bench.codec_bench import encode_encodable, published_decode
from nora_edge.errors import DetokenizationError, InputError
from nora_edge.generate import apply_repetition_penalty, select_step_numpy

REPO = Path(__file__).resolve().parent.parent
LIB = REPO / "kernels" / "build" / "libnora_fast.so"
T, D, VOCAB, OTHER_ROWS, PENALTY = 5, 7, 2048, 64, 1.05
VP = ctypes.c_void_p
BINDING_DECODE = "runtime: FastKernels.decode_one + numpy iDCT + chain"
BINDING_SELECT = "FastKernels.select_step (the runtime's call)"


@dataclass
class Codec:
    """One codec under test: Python objects, its native tables on disk, and the valid id sequences."""

    name: str
    fast: FastTokenizer
    automaton: FastAutomaton
    native: NativeTables
    native_dir: Path
    chain: Chain
    stats: NormStats | None
    penalty: float
    sequences: list[list[int]]


def load_library(path: Path) -> ctypes.CDLL:
    """libnora_fast with the argument types of the calls used here (pointers passed as ints)."""
    if not path.is_file():
        raise InputError(f"{path} is missing: run `make -C kernels cpu` first")
    lib = ctypes.CDLL(str(path))
    lib.nora_fast_last_error.restype = ctypes.c_char_p
    lib.nora_fast_ctx_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(VP)]
    lib.nora_fast_ctx_free.argtypes = [VP]
    lib.nora_fast_program.argtypes = [VP, ctypes.c_char_p, VP]
    i, i64, f = ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.nora_fast_select.argtypes = [VP, i, VP, i64, VP, f, VP, VP, VP, VP, VP]
    lib.nora_fast_decode.argtypes = [VP, i, VP, i64, VP, i, VP, VP, VP, VP]
    return lib


def open_ctx(lib: ctypes.CDLL, native_dir: Path, key: str) -> tuple[VP, int]:
    """(context, program index for ``key``)."""
    ctx = VP()
    if lib.nora_fast_ctx_open(str(native_dir).encode(), ctypes.byref(ctx)) != 0:
        raise InputError(f"nora_fast_ctx_open({native_dir}): {lib.nora_fast_last_error().decode()}")
    program = lib.nora_fast_program(ctx, key.encode(), None)
    if program < 0:
        raise InputError(f"{native_dir}: no program for unnorm key {key!r}")
    return ctx, program


def wide_chunks(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """(T, D) chunks whose dims differ in amplitude (x1, x4, x12): a coefficient range near FAST+'s."""
    time_axis = np.linspace(0.0, 1.0, T)[:, None]  # (T, 1)
    out = []
    for _ in range(n):
        amp = rng.normal(0.0, 0.6, (3, 1, D)) * rng.choice([1.0, 4.0, 12.0], (1, 1, D))
        freq, phase = rng.uniform(0.2, 2.0, (3, 1, D)), rng.uniform(0.0, 2 * np.pi, (3, 1, D))
        out.append((amp * np.sin(2 * np.pi * freq * time_axis + phase)).sum(0) + rng.normal(0, 0.01, (T, D)))
    return out


def random_walks(auto: FastAutomaton, rng: np.random.Generator, n: int) -> list[list[int]]:
    """``n`` id sequences drawn uniformly among the allowed ids at every step (each decodes)."""
    out = []
    for _ in range(n):
        state, ids = auto.start(), []
        while not auto.is_complete(state):
            ids.append(int(rng.choice(np.flatnonzero(auto.allowed(state)))))
            state = auto.advance(state, ids[-1])
        out.append(ids)
    return out


def synthetic_codec(out: Path, n: int, seed: int, quick: bool) -> Codec:
    """FAST+-like codec fitted here (as kernels/testdata/make_testdata.py) with a shuffled head and q01/q99."""
    rng = np.random.default_rng(seed)
    fast = FastTokenizer.fit(wide_chunks(rng, 600 if quick else 3000), scale=10.0, vocab_size=VOCAB)
    auto = FastAutomaton(fast.table, T, D)
    base = 5000
    head = np.concatenate([np.arange(OTHER_ROWS), base + np.arange(fast.vocab_size)])
    head = head[rng.permutation(head.size)]  # rows not in id order, as a real head's
    stats = NormStats("synthetic", rng.uniform(-1.0, -0.01, D), rng.uniform(0.01, 1.0, D))
    chain = default_chain()
    native = build_native(fast.table, auto, head, base, chain, {"synthetic": stats})
    seqs = encode_encodable(fast, wide_chunks(rng, 2 * n), n)
    seqs += random_walks(auto, rng, n - len(seqs))
    write_native(out / "synthetic-native", native)
    return Codec(
        "synthetic FAST+-like", fast, auto, native, out / "synthetic-native", chain, stats, PENALTY, seqs
    )


def bundle_codec(bundle_dir: Path, out: Path, n: int, seed: int):
    """The bundle's own codec (its codec/native/ if exported, else built here) and the loaded Bundle."""
    from nora_edge import bundle as B

    b = B.Bundle.load(bundle_dir, verify=False)
    fast = FastTokenizer.from_pretrained(b.file(b.codec.tokenizer).parent)  # codec/: tokenizer + config
    t, d = b.codec.time_horizon, b.codec.action_dim
    auto = FastAutomaton(fast.table, t, d)
    stats = b.postprocess.stats_for(b.norm_stats, None if len(b.norm_stats) == 1 else sorted(b.norm_stats)[0])
    native = build_native(fast.table, auto, b.actions.head_rows, b.actions.base, b.postprocess, b.norm_stats)
    native_dir = b.path / (b.codec.native or "codec/native")
    if b.codec.native is None or not (native_dir / "native.txt").is_file():
        native_dir = write_native(out / "bundle-native", native)
    rng = np.random.default_rng(seed)
    seqs: list[list[int]] = []
    try:
        from nora_edge.export.fixtures import smooth_trajectories  # the fixtures' FAST fit data

        seqs = encode_encodable(fast, list(smooth_trajectories(t, seed + 1, 2 * n)), n)
    except ImportError:
        pass
    seqs += random_walks(auto, rng, n - len(seqs))
    penalty = b.generation.repetition_penalty or 1.0
    return Codec(
        f"bundle {b.path.name}", fast, auto, native, native_dir, b.postprocess, stats, penalty, seqs
    ), b


def corpus_arrays(codec: Codec, rng: np.random.Generator, max_rows: int) -> dict:
    """Padded id sequences and one greedy selection row per token (logits with the sequence's id on top)."""
    seqs = codec.sequences
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    ids = np.zeros((len(seqs), int(lengths.max())), dtype=np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    rows = codec.native.action_rows
    n_rows = codec.native.head_ids.size
    states, logits, seen, targets = [], [], [], []
    for s in seqs:
        state, mark = codec.automaton.start(), np.zeros(n_rows, dtype=bool)
        for tok in s:
            if len(targets) == max_rows:
                break
            row = rng.normal(0.0, 1.0, n_rows).astype(np.float32)
            row[rows[tok]] = 10.0  # the sequence's next id is the best allowed (and the model's top) choice
            states.append((state.done, state.pending))
            logits.append(row)
            seen.append(mark.copy())
            targets.append(tok)
            mark[rows[tok]] = True
            state = codec.automaton.advance(state, tok)
    return {
        "ids": ids, "lengths": lengths, "states": np.array(states, dtype=np.int32), "logits": np.stack(logits),
        "seen": np.stack(seen), "targets": np.array(targets, dtype=np.int64),
    }  # fmt: skip


def open_binding(native_dir: Path):
    """``nora_edge.kernels.FastKernels`` on ``native_dir``, or None where the binding or its library is absent."""
    try:
        from nora_edge import kernels
    except ImportError:
        return None
    return kernels.FastKernels.open(native_dir) if kernels.available() else None


def addr(a: np.ndarray) -> int:
    return a.ctypes.data


def rotate_time(
    paths: list[tuple[str, object]], args: object, n: int, samples: dict[str, list[float]], prep=None
) -> None:
    """Time each path once on ``args`` (µs), order rotated by ``n``; ``prep(args)`` runs untimed before each."""
    k = n % len(paths)
    for name, fn in paths[k:] + paths[:k]:
        if prep is not None:
            prep(args)
        start = time.perf_counter_ns()
        fn(args)  # type: ignore[operator]
        samples[name].append((time.perf_counter_ns() - start) / 1e3)


def bench_decode(
    lib: ctypes.CDLL, ctx: VP, program: int, codec: Codec, c: dict, repeats: int, fk=None
) -> dict:
    """Per chunk decode samples (µs) of every path, after checking the outputs agree.

    ``fk``: an open ``nora_edge.kernels.FastKernels`` on the same tables (adds the binding's per chunk row).
    """
    from scipy.fft import idct  # the published algorithm only

    ids, lengths = c["ids"], c["lengths"]
    n, stride = ids.shape
    t, d = codec.automaton.time_horizon, codec.automaton.action_dim
    actions = np.zeros((n, t, d), dtype=np.float32)
    coeffs = np.zeros((n, t * d), dtype=np.int32)
    status = np.zeros(n, dtype=np.int32)
    lib.nora_fast_decode(ctx, n, addr(ids), stride, addr(lengths), program, addr(actions), addr(coeffs),
                         addr(status), None)  # fmt: skip
    fast, chain, stats, seqs = codec.fast, codec.chain, codec.stats, codec.sequences
    q01, q99 = (stats.q01, stats.q99) if stats is not None else (None, None)

    def published(i: int) -> np.ndarray:
        x = published_decode(fast, seqs[i], t, d, idct)
        return x if q01 is None else 0.5 * (x + 1.0) * (q99 - q01) + q01  # NORA's unnormalize

    def numpy_path(i: int) -> np.ndarray:
        a = chain.apply(fast.table.decode_chunk(seqs[i], t, d), stats)
        if not np.isfinite(a).all():
            raise DetokenizationError("not finite")
        return a

    ref = [numpy_path(i) for i in range(n)]
    pub_coeffs = [np.array(list(map(ord, fast.tokenizer.decode(s)))) + fast.min_token for s in seqs]
    check = {
        "chunks": n,
        "status_ok": int((status == 0).sum()),
        "coefficients_equal_published": sum(int(np.array_equal(coeffs[i], pub_coeffs[i])) for i in range(n)),
        "max_abs_c_vs_numpy": float(max(np.abs(actions[i] - ref[i]).max() for i in range(n))),
        "max_abs_numpy_vs_published": float(max(np.abs(published(i) - ref[i]).max() for i in range(n))),
    }
    each_act, each_st = np.zeros_like(actions), np.zeros_like(status)
    a_ids, a_len, a_act, a_st = addr(ids), addr(lengths), addr(each_act), addr(each_st)
    row_bytes, act_bytes = 4 * stride, 4 * t * d

    def c_each(i: int) -> None:
        lib.nora_fast_decode(ctx, 1, a_ids + i * row_bytes, stride, a_len + 4 * i, program,
                             a_act + i * act_bytes, None, a_st + 4 * i, None)  # fmt: skip

    paths = [
        ("C per chunk (ctypes)", c_each),
        ("numpy (ByteTable + Chain)", numpy_path),
        ("published", published),
    ]
    if fk is not None:  # NoraPolicy.detokenize + its chain: C to integers, numpy's float64 iDCT and chain
        arrays = [np.asarray(s, dtype=np.int64) for s in seqs]

        def runtime_path(i: int) -> np.ndarray:
            status_i, ints, _ = fk.decode_one(arrays[i])
            if status_i != 0:
                raise DetokenizationError(f"status {status_i}")
            return chain.apply(fast.table.actions_from_coefficients(ints.reshape(t, d)), stats)

        paths.append((BINDING_DECODE, runtime_path))
        check["runtime_path_equals_numpy_bitwise"] = sum(
            int(np.array_equal(runtime_path(i), ref[i])) for i in range(n)
        )
    samples: dict[str, list[float]] = {name: [] for name, _ in paths}
    for i in range(min(n, 50)):  # warm-up
        for _, fn in paths:
            fn(i)
    for k in range(repeats):
        for i in range(n):
            rotate_time(paths, i, i + k, samples)
    batch = f"C batch {n} (ctypes)"
    samples[batch] = []
    for _ in range(repeats * 10):
        start = time.perf_counter_ns()
        lib.nora_fast_decode(ctx, n, a_ids, stride, a_len, program, a_act, None, a_st, None)
        samples[batch].append((time.perf_counter_ns() - start) / 1e3 / n)
    check["status_ok_timed"] = int((each_st == 0).sum())
    return {"check": check, "samples": samples}


def bench_select(lib: ctypes.CDLL, ctx: VP, codec: Codec, c: dict, repeats: int, batch: int, fk=None) -> dict:
    """Per token select samples (µs): C batch 1, C batch ``batch``, numpy as generate.greedy does it.

    Before each timed single-row call the row's logits and seen flags are read (untimed): in the decode loop they
    were just written by the decoder graph, so every path starts from a warm row. ``fk``: as in bench_decode.
    """
    states, logits, seen0, targets = c["states"], c["logits"], c["seen"], c["targets"]
    m, n_rows = logits.shape
    auto, pen = codec.automaton, codec.penalty
    head = codec.native.head_ids.astype(np.int64)
    action_rows = codec.native.action_rows.astype(np.int64)
    st_objs = [AutomatonState(int(a), int(b)) for a, b in states]
    seen = seen0.copy()
    done, pend = states[:, 0].copy(), states[:, 1].copy()  # advanced in place by the C calls
    done0, pend0 = states[:, 0].copy(), states[:, 1].copy()  # never written: the binding's input (it copies)
    out_id, out_top, status = (np.zeros(m, dtype=np.int32) for _ in range(3))
    a_lg, a_seen, a_done, a_pend = addr(logits), addr(seen), addr(done), addr(pend)
    a_id, a_top, a_st = addr(out_id), addr(out_top), addr(status)
    np_ids, np_next = np.zeros(m, dtype=np.int64), [None] * m

    def reset() -> None:
        np.copyto(seen, seen0), np.copyto(done, states[:, 0]), np.copyto(pend, states[:, 1])

    def c_one(i: int) -> None:
        lib.nora_fast_select(ctx, 1, a_lg + 4 * n_rows * i, n_rows, a_seen + n_rows * i, pen, a_done + 4 * i,
                             a_pend + 4 * i, a_id + 4 * i, a_top + 4 * i, a_st + 4 * i)  # fmt: skip

    fast_of_row = np.full(n_rows, -1, dtype=np.int64)
    fast_of_row[action_rows] = np.arange(action_rows.size)

    def numpy_one(i: int) -> None:  # nora_edge.generate.greedy's constrained step (its own function)
        scores = apply_repetition_penalty(logits[i], seen[i], pen)
        row, _, np_next[i] = select_step_numpy(scores, head, auto, st_objs[i], action_rows, 0)
        np_ids[i] = fast_of_row[row]
        seen[i, row] = True

    def warm(i: int) -> None:
        logits[i, ::16].sum(), seen[i, ::64].any()  # one read per cache line

    # every path of a row sees the row's own state (C: done/pend restored by reset() each pass, its in-place
    # advance read by no other path); a chosen row marked seen by one path does not change the others' choice
    # (the chosen id's logit is 10, 10 / penalty stays on top) and adds one penalised row to their work
    paths = [("C batch 1 (ctypes)", c_one), ("numpy (generate.greedy step)", numpy_one)]
    if fk is not None:
        paths.append(
            (BINDING_SELECT, lambda i: fk.select_step(logits[i], int(done0[i]), int(pend0[i]), seen[i], pen))
        )
    samples: dict[str, list[float]] = {name: [] for name, _ in paths}
    for i in range(m):  # check pass (also the warm-up: fills the automaton's mask cache)
        c_one(i)
    c_ids, c_done, c_pend, c_st = out_id.copy(), done.copy(), pend.copy(), status.copy()
    reset()
    for i in range(m):
        numpy_one(i)
    check = {
        "tokens": m,
        "status_ok": int((c_st == 0).sum()),
        "c_equals_sequence": int((c_ids == targets).sum()),
        "c_equals_numpy": int((c_ids == np_ids).sum()),
        "state_equal": sum(
            int(c_done[i] == s.done and c_pend[i] == s.pending) for i, s in enumerate(np_next)
        ),
    }
    if fk is not None:
        reset()
        got = [fk.select(logits[i : i + 1], done0[i : i + 1], pend0[i : i + 1], seen=seen[i : i + 1], penalty=pen)
               for i in range(m)]  # fmt: skip
        check["binding_equals_c"] = sum(
            int(
                g.ids[0] == c_ids[i]
                and g.status[0] == 0
                and (g.done[0], g.pending[0]) == (c_done[i], c_pend[i])
            )
            for i, g in enumerate(got)
        )
    for k in range(repeats):
        reset()
        for i in range(m):
            rotate_time(paths, i, i + k, samples, warm)
    name = f"C batch {batch} (ctypes)"
    samples[name] = []
    for _ in range(repeats * 10):
        reset()
        for off in range(0, m - batch + 1, batch):
            start = time.perf_counter_ns()
            lib.nora_fast_select(ctx, batch, a_lg + 4 * n_rows * off, n_rows, a_seen + n_rows * off, pen,
                                 a_done + 4 * off, a_pend + 4 * off, a_id + 4 * off, a_top + 4 * off,
                                 a_st + 4 * off)  # fmt: skip
            samples[name].append((time.perf_counter_ns() - start) / 1e3 / batch)
    return {"check": check, "samples": samples}
