"""Fixtures for the libnora_fast tests: the C library built once per session (in a temp BUILD dir), a raw ctypes
view of its ABI (kernels/include/nora_fast.h, no nora_edge binding in between) and the test codecs.

Data flow: ``make -C kernels cpu BUILD=<tmp>`` --> libnora_fast.so --ctypes--> :class:`CLib`;
corpus.fit_tokenizer / corpus.make_codec --> codec/native/ dirs (see corpus.py) the library opens.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nora_edge.actions import ByteTable, FastAutomaton
from nora_edge.actions.native import read_native

from .corpus import Codec, fit_tokenizer, make_codec, pack

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
TESTDATA = KERNELS / "testdata" / "native"
I32, F32, U8 = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint8)


def ptr(a: np.ndarray | None, kind):
    """Data pointer of a contiguous array (None -> NULL)."""
    return None if a is None else a.ctypes.data_as(kind)


class CLib:
    """The library's ABI through ctypes; every call returns numpy arrays plus the call's return code."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lib = lib = ctypes.CDLL(str(path))
        lib.nora_fast_last_error.restype = ctypes.c_char_p
        lib.nora_fast_ctx_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.nora_fast_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nora_fast_program.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
        for fn in ("nora_fast_select", "nora_fast_select_cuda"):
            if hasattr(lib, fn):
                getattr(lib, fn).argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_int,
                    F32,
                    ctypes.c_int64,
                    U8,
                    ctypes.c_float,
                ]
                getattr(lib, fn).argtypes += [I32] * 5 + ([ctypes.c_void_p] if fn.endswith("cuda") else [])
        for fn in ("nora_fast_decode", "nora_fast_decode_cuda"):
            if hasattr(lib, fn):
                getattr(lib, fn).argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_int,
                    I32,
                    ctypes.c_int64,
                    I32,
                    ctypes.c_int,
                ]
                getattr(lib, fn).argtypes += [F32, I32, I32, I32] + (
                    [ctypes.c_void_p] if fn.endswith("cuda") else []
                )

    def error(self) -> str:
        return self.lib.nora_fast_last_error().decode()

    def open(self, native_dir: Path) -> tuple[int, ctypes.c_void_p]:
        ctx = ctypes.c_void_p()
        rc = self.lib.nora_fast_ctx_open(str(native_dir).encode(), ctypes.byref(ctx))
        return rc, ctx

    def program(self, ctx, key: str | None) -> tuple[int, int]:
        err = ctypes.c_int(-99)
        p = self.lib.nora_fast_program(ctx, None if key is None else key.encode(), ctypes.byref(err))
        return p, err.value

    def select(self, ctx, logits, seen, penalty, done, pending, top=True, cuda=False):
        """One select call on (B, stride) float32 logits; returns dict of outputs (+ "rc")."""
        b = logits.shape[0]
        logits = np.ascontiguousarray(logits, np.float32)
        out = {
            "done": np.ascontiguousarray(done, np.int32).copy(),
            "pending": np.ascontiguousarray(pending, np.int32).copy(),
            "seen": None if seen is None else np.ascontiguousarray(seen, np.uint8).copy(),
            "id": np.full(b, -5, np.int32),
            "top": np.full(b, -5, np.int32) if top else None,
            "status": np.full(b, -5, np.int32),
        }
        args = [ctx, b, ptr(logits, F32), logits.shape[1], ptr(out["seen"], U8), penalty]
        args += [ptr(out[k], I32) for k in ("done", "pending", "id", "top", "status")]
        fn = self.lib.nora_fast_select_cuda if cuda else self.lib.nora_fast_select
        out["rc"] = fn(*args, *([None] if cuda else []))
        return out

    def decode(self, ctx, seqs: list[list[int]], program: int, cuda=False, total: int | None = None):
        """Decode sequences; returns dict status, pos, coeffs (B, T*D), actions (B, T*D), rc."""
        ids, lengths = pack(seqs)
        b = len(seqs)
        out = {
            "actions": np.full((b, total), -5.0, np.float32),
            "coeffs": np.full((b, total), -5, np.int32),
            "status": np.full(b, -5, np.int32),
            "pos": np.full(b, -5, np.int32),
        }
        fn = self.lib.nora_fast_decode_cuda if cuda else self.lib.nora_fast_decode
        args = [ctx, b, ptr(ids, I32), ids.shape[1], ptr(lengths, I32), program, ptr(out["actions"], F32)]
        args += [ptr(out[k], I32) for k in ("coeffs", "status", "pos")]
        out["rc"] = fn(*args, *([None] if cuda else []))
        return out


def make(target: str, build: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``make -C kernels TARGET BUILD=build ...`` (output captured)."""
    return subprocess.run(
        ["make", "-C", str(KERNELS), target, f"BUILD={build}", *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def kernel_build(tmp_path_factory) -> Path:
    """The CPU library and the example, built once into a temp dir."""
    build = tmp_path_factory.mktemp("kbuild")
    r = make("cpu", build)
    assert r.returncode == 0, r.stdout + r.stderr
    return build


@pytest.fixture(scope="session")
def clib(kernel_build) -> CLib:
    return CLib(kernel_build / "libnora_fast.so")


@pytest.fixture(scope="session")
def tokenizers() -> dict:
    return {k: fit_tokenizer(k) for k in ("main", "h5", "wide")}


@pytest.fixture(scope="session")
def codecs(tokenizers, tmp_path_factory) -> dict[str, Codec]:
    """Named codecs: tokenizer kind x (T, D) x chain kind."""
    root = tmp_path_factory.mktemp("codecs")
    specs = {
        "main_1x7": ("main", 1, 7, "q01_q99"),
        "main_5x7": ("main", 5, 7, "min_max"),
        "main_10x14": ("main", 10, 14, "mean_std"),
        "h5_5x7": ("h5", 5, 7, "q01_q99"),
        "wide_5x3": ("wide", 5, 3, "q01_q99"),
        "wide_10x3": ("wide", 10, 3, "min_max"),
    }
    return {
        name: make_codec(tokenizers[k], t, d, chain, root / name, seed=i)
        for i, (name, (k, t, d, chain)) in enumerate(specs.items())
    }


@pytest.fixture(scope="session")
def testdata_codec() -> Codec:
    """kernels/testdata/native (V=2048, T=5, D=7, Q=18) with the numpy automaton rebuilt from its byte table."""
    nt = read_native(TESTDATA)
    table = ByteTable(nt.offsets, nt.data, nt.min_token, nt.scale, nt.alphabet_max)
    return Codec(table, FastAutomaton(table, nt.time_horizon, nt.action_dim), nt, None, {}, TESTDATA)


@pytest.fixture
def open_ctx(clib):
    """Open a native dir (asserting success); contexts are freed at teardown."""
    opened = []

    def _open(native_dir: Path):
        rc, ctx = clib.open(native_dir)
        assert rc == 0, clib.error()
        opened.append(ctx)
        return ctx

    yield _open
    for ctx in opened:
        clib.lib.nora_fast_ctx_free(ctx)


EDGE_DRIVERS = (
    "tok-check",
    "prompt-check",
    "bundle-check",
)  # libnora_edge's C++ test drivers (kernels/tools/*.cpp)


@pytest.fixture(scope="session")
def edge_cxx_build(tmp_path_factory) -> Path:
    """libnora_edge's C++ drivers built once (optimised, make -j2) into one temp BUILD dir, so the tokenizer's
    objects (the slow nlohmann-json compile) are built once for every driver."""
    build = tmp_path_factory.mktemp("edgecxx")
    r = make(EDGE_DRIVERS[0], build, *EDGE_DRIVERS[1:], "-j2", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return build


@pytest.fixture(scope="session")
def edge_runtime(edge_cxx_build: Path) -> Path:
    """libnora_edge.so built in the session's C++ build dir (the tokenizer / bundle / prompt objects reused)."""
    r = subprocess.run(
        ["make", "-C", str(KERNELS), "runtime", f"BUILD={edge_cxx_build}", "-j2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return edge_cxx_build / "libnora_edge.so"
