"""The pieces of libnora_edge's multi-token decoding, each against the Python code it ports: the draft table
(kernels/src/edge/drafts.cpp vs nora_edge/drafts.py DraftTable) and libnora_fast 1.2's automaton walk / top-2 gaps
(nora_fast_admissible / nora_fast_gap vs nora_edge/drafts.py admissible and nora_edge/multitoken.py check_margin).

Data flow: a C++ driver compiled here (g++, ASan + UBSan) from drafts.cpp reads observe / propose / record /
enabled operations on stdin and prints its answers, compared line by line with DraftTable on the same random
histories (a 6-id vocabulary: ties and overwrites everywhere; one chunk overflowing max_entries);
libnora_fast.so (``make -C kernels cpu``, tests/kernels/conftest.py) --ctypes--> the two 1.2 calls on random
reachable automaton states of kernels/testdata/native and random logits with ties, NaN and -inf. The end-to-end
loop is tests/kernels/test_edge_multitoken.py.
"""

from __future__ import annotations

import ctypes
import math
import subprocess
from types import SimpleNamespace

import numpy as np

from nora_edge.drafts import DraftTable, admissible
from nora_edge.multitoken import NearTie, check_margin

from .conftest import KERNELS, ptr

DRIVER = r"""
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>
#include "edge/drafts.h"
int main() {  /* O key n ids | P key k n ids | R key p a | E key rate  -> one output line per P / E */
    nora_edge::DraftTable t;
    std::string op, key;
    while (std::cin >> op >> key) {
        if (op == "R") { long long p, a; std::cin >> p >> a; t.record(key, p, a); continue; }
        if (op == "E") { double r; std::cin >> r; std::printf("%d\n", (int)t.enabled(key, r)); continue; }
        int k = 0, n = 0;
        if (op == "P") std::cin >> k;
        std::cin >> n;
        std::vector<int64_t> ids((size_t)n), out((size_t)(k > 0 ? k : 1));
        for (auto &x : ids) std::cin >> x;
        if (op == "O") { t.observe(key, ids.data(), n); continue; }
        int c = t.propose(t.own(key), ids.data(), n, k, out.data());
        for (int i = 0; i < c; i++) std::printf(i ? " %lld" : "%lld", (long long)out[(size_t)i]);
        std::printf("\n");
    }
}
"""


def test_draft_table_proposals_equal_the_python_draft_table(tmp_path):
    """Random histories over a 6-id vocabulary (ties and overwrites everywhere), three instructions, the rate
    gate, and one 17000-id chunk that overflows max_entries (the next observe clears both tables)."""
    src = tmp_path / "drafts_check.cpp"
    src.write_text(DRIVER)
    exe = tmp_path / "drafts_check"
    flags = [
        "-std=c++17",
        "-O1",
        "-Wall",
        "-Werror",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
    ]
    r = subprocess.run(["g++", *flags, f"-I{KERNELS / 'src'}", str(src), str(KERNELS / "src/edge/drafts.cpp"),
                        "-o", str(exe)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rng = np.random.default_rng(5)
    py, ops, want = DraftTable(), [], []
    keys = ("a", "b", "c")
    for step in range(600):
        key, kind = keys[rng.integers(3)], rng.random()
        if step == 300:  # a chunk of 17000 ids: > 65536 n-grams, cleared by the next observe of each table
            seq = rng.integers(0, 10**6, 17000).tolist()
            ops.append(f"O {key} {len(seq)} {' '.join(map(str, seq))}")
            py.observe(key, np.asarray(seq))
        elif kind < 0.3:
            seq = (151000 + rng.integers(0, 6, rng.integers(1, 30))).tolist()
            ops.append(f"O {key} {len(seq)} {' '.join(map(str, seq))}")
            py.observe(key, np.asarray(seq))
        elif kind < 0.8:
            out, k = (151000 + rng.integers(0, 6, rng.integers(1, 9))).tolist(), int(rng.integers(1, 20))
            ops.append(f"P {key} {k} {len(out)} {' '.join(map(str, out))}")
            want.append(" ".join(map(str, py.propose(key, out, k))))
        elif kind < 0.9:
            p = int(rng.integers(0, 8))
            a = int(rng.integers(0, p + 1)) if rng.random() < 0.3 else 0
            ops.append(f"R {key} {p} {a}")
            py.record(key, p, a)
        else:
            rate = float(rng.choice([0.2, 0.5]))
            ops.append(f"E {key} {rate}")
            want.append(str(int(py.enabled(key, rate))))
    run = subprocess.run([str(exe)], input="\n".join(ops) + "\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = run.stdout.splitlines()
    assert got == want
    assert len(want) >= 300 and sum(1 for w in want if len(w.split()) > 1) >= 100
    assert {"0", "1"} <= set(want)  # the gate was both open and closed


def test_automaton_walk_and_gaps_equal_the_python_checks(clib, open_ctx, testdata_codec):
    """nora_fast_admissible == drafts.admissible and nora_fast_gap == check_margin's two top-2 gaps on random
    reachable states, logits with ties / NaN / -inf, with and without the repetition penalty."""
    lib = clib.lib
    i32p = ctypes.POINTER(ctypes.c_int32)
    lib.nora_fast_admissible.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, i32p, ctypes.c_int,
                                         i32p, i32p, i32p]  # fmt: skip
    f32p = ctypes.POINTER(ctypes.c_float)
    lib.nora_fast_gap.argtypes = [ctypes.c_void_p, f32p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_float,
                                  ctypes.c_int32, ctypes.c_int32, f32p, f32p]  # fmt: skip
    codec = testdata_codec
    ctx = open_ctx(codec.native_dir)
    auto, nt = codec.auto, codec.tables
    rows, action_rows = nt.head_ids.size, nt.action_rows.astype(np.int64)
    rng = np.random.default_rng(3)
    walks = gaps = 0
    for trial in range(60):
        state, seq = auto.start(), []
        for _ in range(int(rng.integers(0, 12))):  # a random reachable state
            allowed = np.flatnonzero(auto.allowed(state))
            if allowed.size == 0:
                break
            f = int(rng.choice(allowed))
            state, seq = auto.advance(state, f), seq + [f]
        # drafts: mostly allowed continuations, then noise (out of range, disallowed)
        drafts, s2 = [], state
        for _ in range(int(rng.integers(0, 8))):
            allowed = np.flatnonzero(auto.allowed(s2))
            if allowed.size == 0 or rng.random() < 0.15:
                drafts.append(int(rng.choice([-1, auto.vocab_size, int(rng.integers(0, auto.vocab_size))])))
                break
            drafts.append(int(rng.choice(allowed)))
            s2 = auto.advance(s2, drafts[-1])
        sel = SimpleNamespace(automaton=auto, state=state)
        want = admissible(sel, drafts, 0)
        arr = np.asarray(drafts or [0], np.int32)
        keep, done, pend = ctypes.c_int32(-1), ctypes.c_int32(-1), ctypes.c_int32(-1)
        assert (
            lib.nora_fast_admissible(
                ctx,
                state.done,
                state.pending,
                ptr(arr, i32p),
                len(drafts),
                ctypes.byref(keep),
                ctypes.byref(done),
                ctypes.byref(pend),
            )
            == 0
        )
        assert drafts[: keep.value] == want, (state, drafts)
        s3 = state
        for f in want:
            s3 = auto.advance(s3, f)
        assert (done.value, pend.value) == (s3.done, s3.pending)
        walks += 1
        for variant in range(4):
            logits = rng.integers(-4, 5, rows).astype(np.float32) * np.float32(0.25)  # many exact ties
            if variant == 1:
                logits[rng.integers(0, rows, 3)] = -np.inf
            if variant == 2 and trial % 3 == 0:
                logits[rng.integers(0, rows)] = np.nan
            if variant == 3:
                logits = rng.standard_normal(rows).astype(np.float32)
            seen = rng.random(rows) < 0.3
            penalty = 1.3 if trial % 2 else 1.0
            sel = SimpleNamespace(seen=seen, config=SimpleNamespace(repetition_penalty=penalty), automaton=auto,
                                  state=state, action_rows=action_rows)  # fmt: skip
            try:
                py_gap = check_margin(sel, logits, -math.inf)
            except NearTie as e:
                py_gap = e.args[0]
            ga, gb = ctypes.c_float(-1), ctypes.c_float(-1)
            assert (
                lib.nora_fast_gap(
                    ctx,
                    ptr(logits, f32p),
                    ptr(seen.astype(np.uint8), ctypes.POINTER(ctypes.c_uint8)),
                    penalty,
                    state.done,
                    state.pending,
                    ctypes.byref(ga),
                    ctypes.byref(gb),
                )
                == 0
            )
            c_gap = ga.value if not gb.value < ga.value else gb.value  # Python's min()
            assert (math.isnan(c_gap) and math.isnan(py_gap)) or c_gap == py_gap, (
                trial,
                variant,
                c_gap,
                py_gap,
            )
            gaps += 1
    assert walks == 60 and gaps == 240
    bad = ctypes.c_int32()
    assert lib.nora_fast_admissible(ctx, -1, 0, None, 0, ctypes.byref(bad), None, None) == 1
    assert "outside the automaton" in clib.error()
