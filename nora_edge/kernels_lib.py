"""Loading libnora_fast (``kernels/``) with ctypes: where the library is found, its ABI, call errors.

Data flow: $NORA_EDGE_KERNELS_LIB (explicit; an error when set but unloadable) | nora_edge/_native/libnora_fast.so
(shipped by ``pip install .``, see setup.py) | kernels/build/libnora_fast.so (``make -C kernels``, dev trees)
--ctypes.CDLL, ABI major and status names checked, signatures declared--> the library handle (:func:`_lib`),
resolved once per process. :mod:`nora_edge.kernels` builds contexts and calls on it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from nora_edge.errors import BundleError, InputError, NoraEdgeError
from nora_edge.native_loader import NativeLibrary, open_library

ENV_LIB = "NORA_EDGE_KERNELS_LIB"
LIB_NAME = "libnora_fast.so"
ABI_MAJOR = 1  # NORA_FAST_VERSION_MAJOR this binding is written against
# nora_fast_seq_status / nora_fast_sel_status in nora_fast.h (checked against the library at load)
SEQ_STATUS = (
    "ok",
    "id_out_of_range",
    "invalid_utf8",
    "coefficient_out_of_range",
    "wrong_count",
    "not_finite",
)
SEL_STATUS = ("ok", "bad_state", "top_not_finite", "no_allowed", "not_finite")
E_ROWS = 7  # NORA_FAST_E_ROWS: the call ran, some row has a non-OK status
OP_CODES = {"range": 1, "affine": 2, "scale": 3, "sign": 4}


class KernelsError(NoraEdgeError):
    """libnora_fast is unavailable, or a call failed for a reason other than its input (memory, CUDA)."""


class KernelsUnavailableWarning(RuntimeWarning):
    """libnora_fast could not be loaded; the numpy codec runs instead (same results, slower)."""


I32P, U8P = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_uint8)


class _Op(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_int32),
        ("dim", ctypes.c_int32),
        ("a", ctypes.c_double),
        ("b", ctypes.c_double),
    ]


class _Tables(ctypes.Structure):  # nora_fast_tables
    _fields_ = [
        ("vocab_size", ctypes.c_int32), ("n_bytes", ctypes.c_int32), ("offsets", I32P), ("bytes", U8P),
        ("min_token", ctypes.c_int32), ("scale", ctypes.c_double), ("alphabet_max", ctypes.c_int32),
        ("time_horizon", ctypes.c_int32), ("action_dim", ctypes.c_int32), ("dfa_states", ctypes.c_int32),
        ("adv", I32P), ("nxt", I32P), ("reach", U8P), ("n_rows", ctypes.c_int32), ("head_ids", I32P),
        ("action_rows", I32P), ("idct_basis", ctypes.POINTER(ctypes.c_double)), ("n_programs", ctypes.c_int32),
        ("program_keys", ctypes.POINTER(ctypes.c_char_p)), ("program_lengths", I32P),
        ("ops", ctypes.POINTER(_Op)),
    ]  # fmt: skip


_INFO_FIELDS = ("version", "vocab_size", "n_bytes", "min_token", "alphabet_max", "time_horizon", "action_dim",
                "dfa_states", "n_rows", "n_programs")  # fmt: skip


class _Info(ctypes.Structure):  # nora_fast_info
    _fields_ = [*((f, ctypes.c_int32) for f in _INFO_FIELDS), ("scale", ctypes.c_double),
                ("max_ids", ctypes.c_int32), ("cuda_ready", ctypes.c_int32)]  # fmt: skip


def _signatures() -> dict:
    vp, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    return {
        "nora_fast_version": (i, []),
        "nora_fast_last_error": (ctypes.c_char_p, []),
        "nora_fast_seq_status_name": (ctypes.c_char_p, [i]),
        "nora_fast_sel_status_name": (ctypes.c_char_p, [i]),
        "nora_fast_ctx_open": (i, [ctypes.c_char_p, ctypes.POINTER(vp)]),
        "nora_fast_ctx_create": (i, [ctypes.POINTER(_Tables), ctypes.POINTER(vp)]),
        "nora_fast_ctx_free": (None, [vp]),
        "nora_fast_ctx_info": (i, [vp, ctypes.POINTER(_Info)]),
        "nora_fast_program": (i, [vp, ctypes.c_char_p, ctypes.POINTER(i)]),
        "nora_fast_select": (i, [vp, i, vp, i64, vp, f, vp, vp, vp, vp, vp]),
        "nora_fast_decode": (i, [vp, i, vp, i64, vp, i, vp, vp, vp, vp]),
    }


def _try_load(path: Path) -> tuple[ctypes.CDLL | None, str]:
    lib, reason = open_library(path, _signatures())
    if lib is None:
        return None, reason
    major = lib.nora_fast_version() // 1000
    if major != ABI_MAJOR:
        return (
            None,
            f"{path}: library ABI version {lib.nora_fast_version()}, this binding needs {ABI_MAJOR}.x",
        )
    for names, fn in (
        (SEQ_STATUS, lib.nora_fast_seq_status_name),
        (SEL_STATUS, lib.nora_fast_sel_status_name),
    ):
        got = tuple((fn(k) or b"?").decode() for k in range(len(names)))
        if got != names or fn(len(names)) is not None:
            return None, f"{path}: status names {got} disagree with this binding's {names}"
    return lib, ""


_LIB = NativeLibrary(
    LIB_NAME,
    ENV_LIB,
    _try_load,
    "the numpy FAST codec (same results)",
    KernelsUnavailableWarning,
    KernelsError,
)
PACKAGED_LIB, REPO_LIB = _LIB.packaged, _LIB.repo
available = (
    _LIB.available
)  # True when libnora_fast loaded (and agrees with this binding's ABI and status names)
unavailable_reason = _LIB.unavailable_reason
library_path = _LIB.library_path
explicitly_requested = (
    _LIB.explicitly_requested
)  # $NORA_EDGE_KERNELS_LIB names it: a load failure is an error
warn_unavailable = _LIB.warn_unavailable
_lib = _LIB.handle


def _raise(lib: ctypes.CDLL, rc: int, what: str) -> None:
    msg = f"{what}: {(lib.nora_fast_last_error() or b'').decode(errors='replace')} (error {rc})"
    if rc in (1, 5):  # E_ARGUMENT, E_UNKNOWN_KEY
        raise InputError(msg)
    if rc in (2, 3):  # E_IO, E_FORMAT
        raise BundleError(msg)
    raise KernelsError(msg)


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data
