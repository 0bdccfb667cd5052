"""Loading libnora_fast (``kernels/``) with ctypes: where the library is found, its ABI, call errors.

Data flow: $NORA_EDGE_KERNELS_LIB (explicit; an error when set but unloadable) | nora_edge/_native/libnora_fast.so
(shipped by ``pip install .``, see setup.py) | kernels/build/libnora_fast.so (``make -C kernels``, dev trees)
--ctypes.CDLL, ABI major and status names checked, signatures declared--> the library handle (:func:`_lib`),
resolved once per process. :mod:`nora_edge.kernels` builds contexts and calls on it.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from pathlib import Path

import numpy as np

from nora_edge.errors import BundleError, InputError, NoraEdgeError

ENV_LIB = "NORA_EDGE_KERNELS_LIB"
LIB_NAME = "libnora_fast.so"
PACKAGED_LIB = Path(__file__).resolve().parent / "_native" / LIB_NAME
REPO_LIB = Path(__file__).resolve().parent.parent / "kernels" / "build" / LIB_NAME
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


def _declare(lib: ctypes.CDLL) -> None:
    vp, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    sigs = {
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
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


_lock = threading.Lock()
_state: dict = {}  # "lib", "path", "reason", "explicit", "warned" once resolved


def _try_load(path: Path) -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError) as e:
        return None, f"{path}: cannot load ({e})"
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


def _resolve() -> dict:
    with _lock:
        if not _state:
            env = os.environ.get(ENV_LIB)
            if env:
                lib, reason = _try_load(Path(env))
                _state.update(lib=lib, path=Path(env) if lib else None, reason=reason, explicit=True)
            else:
                reasons = []
                for path in (PACKAGED_LIB, REPO_LIB):
                    lib, reason = _try_load(path) if path.is_file() else (None, f"{path}: not found")
                    if lib is not None:
                        _state.update(lib=lib, path=path, reason="", explicit=False)
                        break
                    reasons.append(reason)
                else:
                    _state.update(lib=None, path=None, reason="; ".join(reasons), explicit=False)
            _state["warned"] = False
        return _state


def available() -> bool:
    """True when libnora_fast loaded (and agrees with this binding's ABI and status names)."""
    return _resolve()["lib"] is not None


def unavailable_reason() -> str:
    """Why the library did not load ("" when it did)."""
    return _resolve()["reason"]


def library_path() -> Path | None:
    """The loaded library's path, or None."""
    return _resolve()["path"]


def explicitly_requested() -> bool:
    """True when $NORA_EDGE_KERNELS_LIB names the library (a failure to load it must not be papered over)."""
    return bool(_resolve()["explicit"])


def warn_unavailable() -> None:
    """Warn (once per process) that the numpy codec runs because the library is missing."""
    st = _resolve()
    with _lock:
        if st["warned"]:
            return
        st["warned"] = True
    warnings.warn(
        f"libnora_fast unavailable ({st['reason']}); using the numpy FAST codec (same results). "
        "Build it with `make -C kernels cpu` or reinstall nora-edge with a C compiler.",
        KernelsUnavailableWarning,
        stacklevel=3,
    )


def _lib() -> ctypes.CDLL:
    st = _resolve()
    if st["lib"] is None:
        raise KernelsError(f"libnora_fast unavailable: {st['reason']} (build it with `make -C kernels cpu`)")
    return st["lib"]


def _raise(lib: ctypes.CDLL, rc: int, what: str) -> None:
    msg = f"{what}: {(lib.nora_fast_last_error() or b'').decode(errors='replace')} (error {rc})"
    if rc in (1, 5):  # E_ARGUMENT, E_UNKNOWN_KEY
        raise InputError(msg)
    if rc in (2, 3):  # E_IO, E_FORMAT
        raise BundleError(msg)
    raise KernelsError(msg)


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data
