"""codec/native/ as the C library reads it: sizes and programs, building from memory, broken directories.

Data flow: nora_edge.actions.native.build_native/write_native --> codec/native/ --nora_fast_ctx_open--> context
(nora_fast_ctx_info and nora_fast_program compared with the NativeTables the writer held); the same NativeTables
--nora_fast_ctx_create (ctypes structs of nora_fast.h)--> a context whose select/decode equal the opened one's;
BROKEN edits of a valid dir --nora_fast_ctx_open--> the typed error each one names (test_native_build replays
them under ASan).
"""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import numpy as np
import pytest

from nora_edge.actions.native import read_native
from nora_edge.errors import BundleError

from .conftest import TESTDATA
from .corpus import fuzz_sequences, random_walks

OPS = {"range": 1, "affine": 2, "scale": 3, "sign": 4}
E_ARGUMENT, E_IO, E_FORMAT, E_UNKNOWN_KEY = 1, 2, 3, 5


# ---- broken codec/native/ dirs (nora_fast_ctx_open must answer with a typed error) ----------------------------
def _txt(pattern: str, repl: str):
    def edit(d: Path) -> None:
        text = (d / "native.txt").read_text()
        assert pattern in text, pattern
        (d / "native.txt").write_text(text.replace(pattern, repl, 1))

    return edit


def _arr(name: str, dtype: str, fn):
    def edit(d: Path) -> None:
        a = np.fromfile(d / name, dtype=dtype)
        (d / name).write_bytes(np.ascontiguousarray(fn(a.copy()), dtype=dtype).tobytes())

    return edit


def _set(index, value):
    def fn(a):
        a[index] = value
        return a

    return fn


BROKEN = {  # name -> (expected nora_fast_error, edit of a valid dir); the first program must be "robot_a"
    "missing_txt": (E_IO, lambda d: (d / "native.txt").unlink()),
    "missing_nxt": (E_IO, lambda d: (d / "automaton_nxt.i32").unlink()),
    "truncated_adv": (E_FORMAT, _arr("automaton_adv.i32", "<i4", lambda a: a[:-1])),
    "extended_bytes": (E_FORMAT, _arr("fast_bytes.u8", "u1", lambda a: np.append(a, 65))),
    "empty_basis": (E_FORMAT, _arr("idct_basis.f64", "<f8", lambda a: a[:0])),
    "dir_as_array": (E_FORMAT, lambda d: ((d / "head_ids.i32").unlink(), (d / "head_ids.i32").mkdir())),
    "format_2": (E_FORMAT, _txt("nora_fast_native 1", "nora_fast_native 2")),
    "empty_txt": (E_FORMAT, lambda d: (d / "native.txt").write_text("")),
    "unknown_field": (E_FORMAT, _txt("vocab_size", "colour blue\nvocab_size")),
    "bad_number": (E_FORMAT, _txt("\ntime_horizon ", "\ntime_horizon 1x")),
    "missing_field": (E_FORMAT, _txt("\ndfa_states ", "\n# dfa_states ")),
    "negative_rows": (E_FORMAT, _txt("\nn_rows ", "\nn_rows -")),
    "nan_scale": (E_FORMAT, _txt("\nscale ", "\nscale nan #")),
    "programs_count": (E_FORMAT, _txt("\nprograms ", "\nprograms 9")),
    "op_missing": (E_FORMAT, _txt("\nop range 0 ", "\n# op range 0 ")),
    "op_unknown": (E_FORMAT, _txt("\nop range 0 ", "\nop warp 0 ")),
    "op_dim": (E_FORMAT, _txt("\nop range 0 ", "\nop range 99 ")),
    "key_unquoted": (E_FORMAT, _txt(" =robot_a", " robot_a")),
    "key_bad_percent": (E_FORMAT, _txt(" =robot_a", " =robot_a%4")),
    "long_line": (E_FORMAT, _txt("\nvocab_size", "\nscale 1." + "0" * 9000 + "\nvocab_size")),
    "offsets_flat": (E_FORMAT, _arr("fast_offsets.i32", "<i4", lambda a: _set(5, a[4])(a))),
    "nxt_range": (E_FORMAT, _arr("automaton_nxt.i32", "<i4", _set(3, 1 << 20))),
    "adv_negative": (E_FORMAT, _arr("automaton_adv.i32", "<i4", _set(0, -1))),
    "reach_not_01": (E_FORMAT, _arr("automaton_reach.u8", "u1", _set(0, 2))),
    "reach_none": (E_FORMAT, _arr("automaton_reach.u8", "u1", lambda a: a * 0)),
    "action_row_range": (E_FORMAT, _arr("action_rows.i32", "<i4", _set(0, 1 << 30))),
    "basis_nan": (E_FORMAT, _arr("idct_basis.f64", "<f8", _set(1, np.nan))),
}


# Broken dirs the library once accepted (found by these tests, fixed in context.c / fast_elem.h): values outside
# int32 (wrapped by a cast), a min_token whose coefficients overflow int32 (signed overflow in nf_decode_seq), and
# op lines that disagree with their program's declared count (ops silently moved to the next program).
def _wrap_rows(d: Path) -> None:
    text = (d / "native.txt").read_text()
    rows = int(text.split("\nn_rows ")[1].split()[0])
    (d / "native.txt").write_text(text.replace(f"\nn_rows {rows}\n", f"\nn_rows {rows + 2**32}\n"))


def _shift_ops(d: Path) -> None:
    text = (d / "native.txt").read_text().splitlines(keepends=True)
    heads = [i for i, ln in enumerate(text) if ln.startswith("program ")]
    for i, delta in zip(heads[:2], (1, -1), strict=True):
        word = text[i].split()
        text[i] = f"program {int(word[1]) + delta} {word[2]}\n"
    (d / "native.txt").write_text("".join(text))


BROKEN.update(
    {
        "rows_wrap": (E_FORMAT, _wrap_rows),
        "min_token_huge": (E_FORMAT, _txt("\nmin_token ", "\nmin_token 2147483000 #")),
        "ops_shifted": (E_FORMAT, _shift_ops),
    }
)


def broken_native(src: Path, dst: Path, name: str) -> int:
    """Copy the native dir ``src`` to ``dst``, break it as BROKEN[name] says; returns the expected error."""
    shutil.copytree(src, dst)
    rc, edit = BROKEN[name]
    edit(dst)
    return rc


class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("version", "vocab_size", "n_bytes", "min_token", "alphabet_max",
                "time_horizon", "action_dim", "dfa_states", "n_rows", "n_programs")]  # fmt: skip
    _fields_ += [("scale", ctypes.c_double), ("max_ids", ctypes.c_int32), ("cuda_ready", ctypes.c_int32)]


class Op(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_int32),
        ("dim", ctypes.c_int32),
        ("a", ctypes.c_double),
        ("b", ctypes.c_double),
    ]


class Tables(ctypes.Structure):
    P32, PU8 = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_uint8)
    _fields_ = [("vocab_size", ctypes.c_int32), ("n_bytes", ctypes.c_int32), ("offsets", P32), ("bytes", PU8),
                ("min_token", ctypes.c_int32), ("scale", ctypes.c_double), ("alphabet_max", ctypes.c_int32),
                ("time_horizon", ctypes.c_int32), ("action_dim", ctypes.c_int32), ("dfa_states", ctypes.c_int32),
                ("adv", P32), ("nxt", P32), ("reach", PU8), ("n_rows", ctypes.c_int32), ("head_ids", P32),
                ("action_rows", P32), ("idct_basis", ctypes.POINTER(ctypes.c_double)), ("n_programs", ctypes.c_int32),
                ("program_keys", ctypes.POINTER(ctypes.c_char_p)), ("program_lengths", P32),
                ("ops", ctypes.POINTER(Op))]  # fmt: skip


def info_of(clib, ctx) -> Info:
    info = Info()
    assert clib.lib.nora_fast_ctx_info(ctx, ctypes.byref(info)) == 0
    return info


def test_info_and_programs_match_the_writer(clib, open_ctx, codecs):
    """Every size in nora_fast_info equals the NativeTables written; every program key (percent-encoded in
    native.txt) is found at its index; a key is required exactly when there are several programs."""
    checked = 0
    for codec in codecs.values():
        t, ctx = codec.tables, open_ctx(codec.native_dir)
        info = info_of(clib, ctx)
        want = {"vocab_size": t.vocab_size, "n_bytes": t.data.size, "min_token": t.min_token,
                "alphabet_max": t.alphabet_max, "time_horizon": t.time_horizon, "action_dim": t.action_dim,
                "dfa_states": t.dfa_states, "n_rows": t.head_ids.size, "n_programs": len(t.programs),
                "scale": t.scale, "max_ids": 4 * codec.total + 1, "version": clib.lib.nora_fast_version()}  # fmt: skip
        assert {k: getattr(info, k) for k in want} == want
        for i, (key, _) in enumerate(t.programs):
            assert clib.program(ctx, key) == (i, 0)
        assert clib.program(ctx, "not a key") == (-1, E_UNKNOWN_KEY)
        assert clib.program(ctx, None) == ((0, 0) if len(t.programs) == 1 else (-1, E_UNKNOWN_KEY))
        rt = read_native(codec.native_dir)  # the Python reader sees what the writer wrote
        assert rt.programs == t.programs and np.array_equal(rt.reach, t.reach)
        checked += 1
    assert checked == len(codecs) == 6


def tables_struct(t, keep: list) -> Tables:
    """nora_fast_tables over the NativeTables' arrays (``keep`` holds the buffers alive)."""

    def p(a, dtype, ctype):
        a = np.array(a, dtype=dtype, order="C")  # a private, writable copy
        keep.append(a)
        return a.ctypes.data_as(ctypes.POINTER(ctype))

    ops = [Op(OPS[n], d, a, b) for _, prog in t.programs for n, d, a, b in prog]
    keys = (ctypes.c_char_p * max(len(t.programs), 1))(*[k.encode() for k, _ in t.programs])
    op_arr = (Op * max(len(ops), 1))(*ops)
    keep += [keys, op_arr]
    i32, u8 = ctypes.c_int32, ctypes.c_uint8
    return Tables(
        t.vocab_size, t.data.size, p(t.offsets, np.int32, i32), p(t.data, np.uint8, u8), t.min_token, t.scale,
        t.alphabet_max, t.time_horizon, t.action_dim, t.dfa_states, p(t.adv, np.int32, i32),
        p(t.nxt, np.int32, i32), p(t.reach, np.uint8, u8), t.head_ids.size, p(t.head_ids, np.int32, i32),
        p(t.action_rows, np.int32, i32), p(t.basis, np.float64, ctypes.c_double), len(t.programs), keys,
        p([len(prog) for _, prog in t.programs] or [0], np.int32, i32), op_arr,
    )  # fmt: skip


def test_create_from_memory_equals_open(clib, open_ctx, codecs):
    """nora_fast_ctx_create on the writer's arrays gives the same selections and decodes as the opened dir, and
    the arrays are copied (clobbering them afterwards changes nothing)."""
    codec = codecs["wide_5x3"]
    keep: list = []
    ctx = ctypes.c_void_p()
    tables = tables_struct(codec.tables, keep)
    assert clib.lib.nora_fast_ctx_create(ctypes.byref(tables), ctypes.byref(ctx)) == 0, clib.error()
    for a in keep:
        if isinstance(a, np.ndarray):
            a[...] = 0  # the context must own copies
    opened = open_ctx(codec.native_dir)
    rng = np.random.default_rng(31)
    walks = random_walks(codec, 100, rng)
    seqs = walks + fuzz_sequences(codec, walks, 2000, rng)
    n_rows = codec.tables.head_ids.size
    logits = np.round(rng.standard_normal((3000, n_rows), dtype=np.float32), 1)
    done = rng.integers(0, codec.total + 1, 3000).astype(np.int32)
    pending = rng.integers(0, codec.auto.dfa_states, 3000).astype(np.int32)
    try:
        for program in (-1, 0, 1):
            a, b = (clib.decode(c, seqs, program, total=codec.total) for c in (ctx, opened))
            for k in ("status", "pos", "coeffs", "rc"):
                np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(a["actions"], b["actions"])  # NaN == NaN here
        a, b = (clib.select(c, logits, None, 1.0, done, pending) for c in (ctx, opened))
        for k in ("status", "id", "done", "pending", "top"):
            np.testing.assert_array_equal(a[k], b[k])
    finally:
        clib.lib.nora_fast_ctx_free(ctx)


def test_create_rejects_null_tables(clib):
    ctx = ctypes.c_void_p()
    assert clib.lib.nora_fast_ctx_create(None, ctypes.byref(ctx)) == E_ARGUMENT
    keep: list = []
    tables = tables_struct(read_native(TESTDATA), keep)
    tables.adv = None
    assert clib.lib.nora_fast_ctx_create(ctypes.byref(tables), ctypes.byref(ctx)) == E_ARGUMENT
    assert "NULL" in clib.error() and not ctx.value


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_native_dir_gives_typed_error(clib, tmp_path, name):
    """Each broken dir is refused with its typed error and a message naming the problem; no context escapes."""
    expected = broken_native(TESTDATA, tmp_path / name, name)
    rc, ctx = clib.open(tmp_path / name)
    if ctx.value:
        clib.lib.nora_fast_ctx_free(ctx)
    assert (rc, ctx.value) == (expected, None), clib.error()
    assert str(tmp_path / name) in clib.error()


@pytest.mark.parametrize("name", ["ops_shifted", "programs_count", "key_unquoted", "format_2"])
def test_python_reader_refuses_what_the_library_refuses(tmp_path, name):
    """read_native (the Python reader) rejects the same malformed program/format lines as context.c."""
    broken_native(TESTDATA, tmp_path / name, name)
    with pytest.raises(BundleError):
        read_native(tmp_path / name)
