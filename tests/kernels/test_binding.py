"""nora_edge.kernels (the ctypes binding of libnora_fast) and its runtime use vs the numpy codec.

References: generate.apply_repetition_penalty / argmax_lowest_id + FastAutomaton (selection),
ByteTable.decode_coefficients / decode_chunk + Chain.apply (decode), and the numpy runtime itself
(NoraPolicy(kernels="numpy")) for greedy + detokenize on an exported tiny bundle.
Data flow: kernels/testdata/native --FastKernels.open--> C context; random logits / random automaton walks
--select / decode--> compared with the numpy references, each comparison counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nora_edge import kernels as K
from nora_edge.actions import ByteTable, FastAutomaton
from nora_edge.actions.native import build_native, read_native
from nora_edge.actions.normalize import NormStats
from nora_edge.actions.postprocess import Chain
from nora_edge.errors import BundleError, DetokenizationError, InputError
from nora_edge.generate import GenerationResult, apply_repetition_penalty, argmax_lowest_id

TESTDATA = Path(__file__).resolve().parents[2] / "kernels" / "testdata" / "native"
pytestmark = pytest.mark.skipif(
    not K.available(), reason=f"libnora_fast not built ({K.unavailable_reason()}); run `make -C kernels cpu`"
)


@pytest.fixture(scope="module")
def fk():
    with K.FastKernels.open(TESTDATA) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def codec():
    nt = read_native(TESTDATA)
    table = ByteTable(nt.offsets, nt.data, nt.min_token, nt.scale, nt.alphabet_max)
    return nt, table, FastAutomaton(table, nt.time_horizon, nt.action_dim)


def walks(auto: FastAutomaton, n: int, rng: np.random.Generator) -> list[list[int]]:
    """``n`` valid sequences: a uniformly random allowed id at each step."""
    out = []
    for _ in range(n):
        state, ids = auto.start(), []
        while not auto.is_complete(state):
            allowed = np.flatnonzero(auto.allowed(state))
            ids.append(int(allowed[rng.integers(allowed.size)]))
            state = auto.advance(state, ids[-1])
        out.append(ids)
    return out


def numpy_step(nt, auto, logits, seen, penalty, state):
    """greedy's constrained step in numpy: (fast id, top row, next state), or the failing check's status name."""
    scores = apply_repetition_penalty(logits, seen, penalty)
    try:
        top = argmax_lowest_id(scores, nt.head_ids)
    except DetokenizationError:
        return "top_not_finite"
    allowed = auto.allowed(state)
    if not allowed.any():
        return "no_allowed"
    masked = np.full(auto.vocab_size, -np.inf, np.float32)
    masked[allowed] = scores[nt.action_rows[allowed]]
    try:
        fid = argmax_lowest_id(masked, nt.action_rows)
    except DetokenizationError:
        return "not_finite"
    return fid, top, auto.advance(state, fid)


def test_status_names_agree_with_the_library():
    lib = K._lib()
    assert K.SEQ_STATUS == tuple(lib.nora_fast_seq_status_name(i).decode() for i in range(len(K.SEQ_STATUS)))
    assert K.SEL_STATUS == tuple(lib.nora_fast_sel_status_name(i).decode() for i in range(len(K.SEL_STATUS)))
    assert lib.nora_fast_seq_status_name(len(K.SEQ_STATUS)) is None
    assert K.library_path() is not None and K.unavailable_reason() == ""


def test_select_matches_numpy_on_random_walks(fk, codec):
    """B walks in parallel, rounded logits (ties), penalty + seen; ~4% of rows get a NaN, all action rows -inf
    or all rows -inf."""
    nt, _, auto = codec
    rng = np.random.default_rng(0)
    b, rows, penalty = 6, nt.head_ids.size, 1.3
    states = [auto.start() for _ in range(b)]
    seen = rng.random((b, rows)) < 0.05
    compared = failed = 0
    for _ in range(120):
        logits = np.round(rng.normal(size=(b, rows)), 1).astype(np.float32)
        for i in np.flatnonzero(rng.random(b) < 0.04):
            kind = rng.integers(3)
            if kind == 0:
                logits[i, rng.integers(rows)] = np.nan
            else:
                logits[i, nt.action_rows if kind == 1 else slice(None)] = -np.inf
        done = np.array([s.done for s in states])
        pending = np.array([s.pending for s in states])
        seen_c = seen.copy()
        sel = fk.select(logits, done, pending, seen=seen_c.view(np.uint8), penalty=penalty)
        assert (done == [s.done for s in states]).all()  # the caller's arrays are not modified
        for i in range(b):
            ref = numpy_step(nt, auto, logits[i], seen[i], penalty, states[i])
            compared += 1
            if isinstance(ref, str):
                failed += 1
                assert K.SEL_STATUS[sel.status[i]] == ref
                assert sel.ids[i] == -1 and (sel.done[i], sel.pending[i]) == (done[i], pending[i])
                states[i] = auto.start()
                continue
            fid, top, nxt = ref
            assert (sel.status[i], sel.ids[i], sel.top[i]) == (0, fid, top)
            assert (sel.done[i], sel.pending[i]) == (nxt.done, nxt.pending)
            seen[i, nt.action_rows[fid]] = True
            states[i] = auto.start() if auto.is_complete(nxt) else nxt
        np.testing.assert_array_equal(seen_c, seen)  # the chosen rows were marked in place
    assert compared == 720 and 0 < failed < 100


def test_select_without_top_or_penalty(fk, codec):
    nt, _, auto = codec
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, nt.head_ids.size)).astype(np.float32)
    sel = fk.select(logits, np.zeros(4, int), np.zeros(4, int), top=False)
    assert sel.top is None
    for i in range(4):
        fid, _, nxt = numpy_step(nt, auto, logits[i], np.zeros(nt.head_ids.size, bool), None, auto.start())
        assert (sel.ids[i], sel.done[i], sel.pending[i]) == (fid, nxt.done, nxt.pending)


def test_decode_matches_bytetable(fk, codec):
    nt, table, auto = codec
    rng = np.random.default_rng(2)
    seqs = walks(auto, 40, rng)
    out = fk.decode(seqs)
    t, d = nt.time_horizon, nt.action_dim
    assert out.actions.shape == (40, t, d) and out.coeffs.shape == (40, t * d)
    for i, s in enumerate(seqs):
        assert out.status[i] == 0 and out.error_pos[i] == -1
        np.testing.assert_array_equal(out.coeffs[i], table.decode_coefficients(s, t, d).reshape(-1))
        # float64 iDCT rounded once to float32: within one float32 ulp of numpy's float64 result
        np.testing.assert_array_max_ulp(out.actions[i], table.decode_chunk(s, t, d).astype(np.float32), 1)
    # (B, L) array + lengths gives the same answer as the ragged list
    width = max(map(len, seqs))
    arr = np.full((40, width), 99999, np.int64)
    for i, s in enumerate(seqs):
        arr[i, : len(s)] = s
    again = fk.decode(arr, lengths=[len(s) for s in seqs])
    np.testing.assert_array_equal(again.coeffs, out.coeffs)
    assert len(seqs) == 40


def test_decode_statuses_match_numpy_reasons(fk, codec):
    """Fuzzed sequences: the status names are ByteTable's DetokenizationError reasons."""
    nt, table, auto = codec
    rng = np.random.default_rng(3)
    good = walks(auto, 30, rng)
    seqs = [rng.integers(-2, table.vocab_size + 2, rng.integers(1, 40)).tolist() for _ in range(30)]
    seqs += [w[: rng.integers(0, len(w))] for w in good] + [w + w[:1] for w in good] + good
    seqs += [
        [2**40, 1],
        [],
        [5, -1, 7],
        [table.vocab_size],
        good[0][:3] + [table.vocab_size + 5] + good[0][3:],
    ]
    out = fk.decode(seqs)
    reasons = {}
    for i, s in enumerate(seqs):
        try:
            table.decode_coefficients(s, nt.time_horizon, nt.action_dim)
            want = "ok"
        except DetokenizationError as e:
            want = e.reason
        assert K.SEQ_STATUS[out.status[i]] == want, (s, want)
        if want == "id_out_of_range":
            assert out.error_pos[i] == next(k for k, v in enumerate(s) if not 0 <= v < table.vocab_size)
        if want != "ok":
            assert np.isnan(out.actions[i]).all() and (out.coeffs[i] == 0).all()
        reasons[want] = reasons.get(want, 0) + 1
    assert sum(reasons.values()) == len(seqs) == 125, reasons
    assert {"ok", "id_out_of_range", "invalid_utf8", "wrong_count"} <= set(reasons), reasons


def test_from_tables_programs_match_the_numpy_chain(codec):
    """A context built in memory with a q01/q99-by-key chain + NORA's gripper steps vs Chain.apply (float64)."""
    nt, table, auto = codec
    rng = np.random.default_rng(4)
    d = nt.action_dim
    stats = {k: NormStats(k, rng.uniform(-2, -0.1, d), rng.uniform(0.1, 2, d)) for k in ("a", "b/c")}
    chain = Chain.from_json(
        [{"op": "unnormalize", "mode": "q01_q99", "key": None, "source": "test"},
         {"op": "gripper_rescale", "dim": -1}, {"op": "gripper_binarize", "dim": -1},
         {"op": "gripper_invert", "dim": -1}],
        InputError, "chain",
    )  # fmt: skip
    base = int(nt.head_ids[nt.action_rows[0]])
    seqs = walks(auto, 25, rng)
    compared = 0
    with K.FastKernels.from_tables(build_native(table, auto, nt.head_ids, base, chain, stats)) as fk:
        assert fk.info["n_programs"] == 2
        for key, st in stats.items():
            out = fk.decode(seqs, program=fk.program(key))
            for i, s in enumerate(seqs):
                want = chain.apply(table.decode_chunk(s, nt.time_horizon, d), st)
                np.testing.assert_array_max_ulp(out.actions[i], want.astype(np.float32), 1)
                compared += 1
    assert compared == 50


def test_errors_are_typed_and_named(fk, codec):
    nt = codec[0]
    rows = nt.head_ids.size
    z = np.zeros(1, np.int32)
    sel = fk.select(np.zeros((1, rows), np.float32), np.array([-1]), z)
    assert K.SEL_STATUS[sel.status[0]] == "bad_state" and sel.ids[0] == -1
    sel = fk.select(np.zeros((1, rows), np.float32), np.array([nt.time_horizon * nt.action_dim]), z)
    assert K.SEL_STATUS[sel.status[0]] == "no_allowed"
    with pytest.raises(InputError, match="unknown unnorm key 'nope'"):
        fk.program("nope")
    with pytest.raises(InputError, match="unnorm key is required"):
        fk.program(None)
    with pytest.raises(InputError, match="float32"):
        fk.select(np.zeros((1, rows)), z, z)
    with pytest.raises(InputError, match=f"the context's head has {rows}"):
        fk.select(np.zeros((1, rows + 1), np.float32), z, z)
    with pytest.raises(InputError, match="done has shape"):
        fk.select(np.zeros((2, rows), np.float32), z, np.zeros(2))
    with pytest.raises(InputError, match="needs the seen rows"):
        fk.select(np.zeros((1, rows), np.float32), z, z, penalty=1.2)
    with pytest.raises(InputError, match="must be > 0"):
        fk.select(np.zeros((1, rows), np.float32), z, z, seen=np.zeros((1, rows), np.uint8), penalty=0.0)
    with pytest.raises(InputError, match="program 5 outside"):
        fk.decode([[1]], program=5)
    with pytest.raises(InputError, match="integers"):
        fk.decode([[1.5]])
    with pytest.raises(BundleError, match="cannot open"):
        K.FastKernels.open(TESTDATA.parent / "missing")
    ctx = K.FastKernels.open(TESTDATA)
    ctx.close()
    ctx.close()
    with pytest.raises(InputError, match="closed"):
        ctx.decode([[1]])


def test_unloadable_explicit_library_is_reported_and_warns_once(tmp_path):
    code = (
        "import warnings; import nora_edge.kernels as k\n"
        "assert not k.available() and k.explicitly_requested() and k.library_path() is None\n"
        "print(k.unavailable_reason())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); k.warn_unavailable(); k.warn_unavailable()\n"
        "assert len(w) == 1 and issubclass(w[0].category, k.KernelsUnavailableWarning), w\n"
        "try:\n    k.FastKernels.open('x')\nexcept k.KernelsError as e:\n    print('raised', e)\n"
    )
    env = {**os.environ, K.ENV_LIB: str(tmp_path / "nope.so")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "nope.so" in r.stdout and "raised libnora_fast unavailable" in r.stdout


# ---- runtime: greedy + detokenize on an exported tiny bundle ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    from nora_edge.export.pipeline import export_bundle

    return export_bundle(
        tiny_ckpt, tmp_path_factory.mktemp("kbind") / "action", validate=False, progress=False
    )


def _load(bundle, kernels):
    from nora_edge.policy import NoraPolicy

    return NoraPolicy.load(bundle, providers="cpu", threads=1, forced_tokens="flag", kernels=kernels)


def _without_native(bundle: Path, dst: Path) -> Path:
    """A copy of ``bundle`` whose manifest does not list codec/native (older exports)."""
    shutil.copytree(bundle, dst)
    shutil.rmtree(dst / "codec" / "native")
    m = json.loads((dst / "manifest.json").read_text())
    del m["codec"]["files"]["native"]
    m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("codec/native/")}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_policy_c_equals_numpy(tiny_bundle, tmp_path):
    from nora_edge.export.images import random_rgb_image

    pn = _load(tiny_bundle, "numpy")
    pcs = {
        "native dir": _load(tiny_bundle, "c"),
        "in memory": _load(_without_native(tiny_bundle, tmp_path / "b"), "c"),
    }
    assert pn.codec_backend == "numpy" and pn.kernels is None
    assert (
        pcs["native dir"].kernels.source.endswith("native")
        and pcs["in memory"].kernels.source == "<NativeTables>"
    )
    compared = 0
    for penalty in (None, 1.3):  # the bundle's own (1.05 for the tiny checkpoint) and a stronger one
        for p in (pn, *pcs.values()):
            if penalty is not None:
                p._greedy = dataclasses.replace(p._greedy, repetition_penalty=penalty)
        for i in range(3):
            image = random_rgb_image(100 + i, 180 + 20 * i, 240)
            a = pn.run_chunk(image, "pick up the red cup")
            for pc in pcs.values():
                b = pc.run_chunk(image, "pick up the red cup")
                assert pc.last_timings["codec_backend"] == "c"
                np.testing.assert_array_equal(b.ids, a.ids)
                np.testing.assert_array_equal(b.top_ids, a.top_ids)
                assert b.token_classes == a.token_classes
                np.testing.assert_array_equal(b.actions, a.actions)  # bit-identical
                np.testing.assert_array_equal(b.normalized, a.normalized)
                compared += 1
    assert compared == 12
    # undecodable ids: the same DetokenizationError message on both backends
    base = pn.bundle.actions.base
    bad = [[base + pn.table.vocab_size], [base + 1], [base + int(np.argmax(pn.table.lengths))] * 2]
    for ids in bad:
        res = GenerationResult(np.asarray(ids, np.int64), "complete")
        with pytest.raises(DetokenizationError) as want:
            pn.detokenize(res)
        for pc in pcs.values():
            with pytest.raises(DetokenizationError) as got:
                pc.detokenize(res)
            assert str(got.value) == str(want.value)
    for p in (pn, *pcs.values()):
        p.close()


def test_policy_kernels_option(tiny_bundle):
    with pytest.raises(InputError, match="kernels must be"):
        _load(tiny_bundle, "gpu")
    p = _load(tiny_bundle, "auto")
    assert p.codec_backend == "c"
    p.close()
    with pytest.raises(InputError, match="closed"):
        p.kernels.decode([[1]])


def test_greedy_checks_the_context_matches(fk, tiny_bundle):
    from nora_edge.generate import _check_kernels

    p = _load(tiny_bundle, "numpy")
    with pytest.raises(BundleError, match=r"\(n_rows, V, T, D\)"):
        _check_kernels(fk, p.decoder.head_rows, p.automaton)
    p.close()


def test_fast_paths_equal_the_batch_calls(fk, codec):
    """select_step / decode_one (the runtime's per-token and per-chunk calls) vs select / decode: same ids,
    states, tops, statuses (incl. failures), coefficients and error positions; seen marked the same way."""
    nt, _, auto = codec
    rng = np.random.default_rng(7)
    rows, compared = nt.head_ids.size, 0
    for i in range(300):
        logits = np.round(rng.normal(size=rows), 1).astype(np.float32)
        if i % 25 == 0:
            logits[rng.integers(rows)] = np.nan
        done = int(rng.integers(-1, auto.total + 2))
        pending = int(rng.integers(0, nt.dfa_states + 1))
        seen_a = rng.random(rows) < 0.1
        seen_b = seen_a.copy()
        step = fk.select_step(logits, done, pending, seen_a.view(np.uint8), 1.3)
        sel = fk.select(logits[None], [done], [pending], seen=seen_b[None], penalty=1.3)
        assert step == (sel.ids[0], sel.done[0], sel.pending[0], sel.top[0], sel.status[0])
        np.testing.assert_array_equal(seen_a, seen_b)
        compared += 1
    seqs = walks(auto, 40, rng) + [
        list(rng.integers(-3, nt.vocab_size + 3, rng.integers(0, 30))) for _ in range(60)
    ]
    for seq in seqs:
        status, coeffs, pos = fk.decode_one(np.asarray(seq, dtype=np.int64))
        dec = fk.decode([seq])
        assert (status, pos) == (dec.status[0], dec.error_pos[0])
        np.testing.assert_array_equal(coeffs, dec.coeffs[0])
        compared += 1
    assert compared == 300 + len(seqs) == 400
    assert fk.decode_one(np.array([2**40]))[0] == K.SEQ_STATUS.index("id_out_of_range")
    with pytest.raises(InputError, match="float32"):
        fk.select_step(logits.astype(np.float64), 0, 0)
    with pytest.raises(InputError, match="needs the seen rows"):
        fk.select_step(logits, 0, 0, None, 1.3)
    with pytest.raises(InputError, match="1-D integer"):
        fk.decode_one(np.zeros((2, 2), np.int32))
