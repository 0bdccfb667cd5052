"""ctypes binding of libnora_fast (``kernels/``), the FAST+ codec in C: constrained selection and detokenization.

Data flow:
  library: $NORA_EDGE_KERNELS_LIB (explicit; an error when set but unloadable) | nora_edge/_native/libnora_fast.so
  (shipped by ``pip install .``, see setup.py) | kernels/build/libnora_fast.so (``make -C kernels``, dev trees)
  context: a bundle's codec/native/ --:meth:`FastKernels.open`--> C context, or
           :class:`~nora_edge.actions.native.NativeTables` --:meth:`FastKernels.from_tables`--> C context (copied)
  decode loop: logits (B, n_rows) float32 + automaton state (done, pending) (B,) + seen rows (B, n_rows)
    --:meth:`FastKernels.select` (repetition penalty, model's top row, masked argmax, automaton advance)-->
    :class:`Selection` (FAST ids, new state, top rows, per-row status :data:`SEL_STATUS`)
  after the loop: FAST id sequences (B, L) --:meth:`FastKernels.decode`--> :class:`Decoded` (integer DCT
    coefficients (B, T*D), float32 actions (B, T, D), per-sequence status :data:`SEQ_STATUS`)

Per-row problems are statuses; call problems raise InputError (bad argument, unknown key), BundleError (codec
files) or :class:`KernelsError` (library missing, out of memory), with the C library's message. numpy only.
Where the library is missing the runtime uses its numpy path and :func:`warn_unavailable` warns once.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nora_edge.errors import BundleError, InputError
from nora_edge.kernels_lib import (  # noqa: F401 (re-exported: the public names live here)
    _INFO_FIELDS,
    ABI_MAJOR,
    E_ROWS,
    ENV_LIB,
    I32P,
    LIB_NAME,
    OP_CODES,
    PACKAGED_LIB,
    REPO_LIB,
    SEL_STATUS,
    SEQ_STATUS,
    U8P,
    KernelsError,
    KernelsUnavailableWarning,
    _Info,
    _lib,
    _Op,
    _ptr,
    _raise,
    _Tables,
    available,
    explicitly_requested,
    library_path,
    unavailable_reason,
    warn_unavailable,
)


@dataclass(frozen=True)
class Selection:
    """One :meth:`FastKernels.select` step (all int32 (B,), new arrays).

    Attributes:
        ids: chosen FAST id, -1 where the status is not OK.
        done, pending: automaton state after the step (unchanged where the status is not OK).
        top: head row of the model's own choice (best penalised score over all rows), or None if not asked.
        status: index into :data:`SEL_STATUS`.
    """

    ids: np.ndarray
    done: np.ndarray
    pending: np.ndarray
    top: np.ndarray | None
    status: np.ndarray


@dataclass(frozen=True)
class Decoded:
    """:meth:`FastKernels.decode` output.

    Attributes:
        actions: float32 (B, T, D); NaN for a sequence whose status is not OK.
        coeffs: int32 (B, T*D) integer DCT coefficients (row-major (T, D)); 0 where the status is not OK.
        status: int32 (B,) index into :data:`SEQ_STATUS`.
        error_pos: int32 (B,) index of the id holding the first problem (-1 when OK or for a count error).
    """

    actions: np.ndarray
    coeffs: np.ndarray
    status: np.ndarray
    error_pos: np.ndarray


def _as_ints(name: str, value: object, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.shape != shape:
        raise InputError(f"{name} has shape {a.shape}, expected {shape}")
    if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise InputError(f"{name} holds values outside int32")
    return np.array(a, dtype=np.int32, order="C")  # always a copy: the caller's array is never written


class FastKernels:
    """A libnora_fast context (immutable; select/decode may be called from several threads).

    Build with :meth:`open` or :meth:`from_tables`; release with :meth:`close` or ``with``.

    Attributes:
        info: sizes of the context (vocab_size, time_horizon, action_dim, n_rows, n_programs, max_ids, ...).
    """

    def __init__(self, handle: ctypes.c_void_p, source: str) -> None:
        self._lib = _lib()
        self._handle: ctypes.c_void_p | None = handle
        self.source = source
        info = _Info()
        rc = self._lib.nora_fast_ctx_info(handle, ctypes.byref(info))
        if rc:
            self._lib.nora_fast_ctx_free(handle)
            self._handle = None
            _raise(self._lib, rc, f"nora_fast_ctx_info({source})")
        self.info = {f: getattr(info, f) for f, _ in _Info._fields_}
        self.total = self.info["time_horizon"] * self.info["action_dim"]
        self._local = threading.local()  # per-thread scratch of select_step

    @classmethod
    def open(cls, native_dir: str | os.PathLike[str]) -> FastKernels:
        """Context from a bundle's ``codec/native/`` directory.

        Raises:
            KernelsError: the library is unavailable.
            BundleError: a file is missing, malformed or inconsistent (the C message names it).
        """
        lib, handle = _lib(), ctypes.c_void_p()
        rc = lib.nora_fast_ctx_open(os.fsencode(Path(native_dir)), ctypes.byref(handle))
        if rc:
            _raise(lib, rc, f"nora_fast_ctx_open({native_dir})")
        return cls(handle, str(native_dir))

    @classmethod
    def from_tables(cls, t) -> FastKernels:
        """Context from in-memory :class:`~nora_edge.actions.native.NativeTables` (the C side copies them).

        Raises:
            KernelsError: the library is unavailable.
            BundleError: the tables are inconsistent (the C message names the field).
        """
        lib = _lib()
        arr = {
            "offsets": np.ascontiguousarray(t.offsets, np.int32), "bytes": np.ascontiguousarray(t.data, np.uint8),
            "adv": np.ascontiguousarray(t.adv, np.int32), "nxt": np.ascontiguousarray(t.nxt, np.int32),
            "reach": np.ascontiguousarray(t.reach, np.uint8), "head_ids": np.ascontiguousarray(t.head_ids, np.int32),
            "action_rows": np.ascontiguousarray(t.action_rows, np.int32),
            "idct_basis": np.ascontiguousarray(t.basis, np.float64),
        }  # fmt: skip
        keys = (ctypes.c_char_p * max(1, len(t.programs)))(*(k.encode("utf-8") for k, _ in t.programs))
        lengths = np.array([len(ops) for _, ops in t.programs] or [0], dtype=np.int32)
        flat = [op for _, ops in t.programs for op in ops]
        ops = (_Op * max(1, len(flat)))(*(_Op(OP_CODES[n], d, a, b) for n, d, a, b in flat))
        if t.adv.shape != (t.dfa_states, t.vocab_size) or t.reach.shape[1:] != (t.dfa_states,):
            raise BundleError(f"native tables: adv {t.adv.shape} / reach {t.reach.shape} disagree with V, Q")
        tables = _Tables(
            vocab_size=t.vocab_size, n_bytes=arr["bytes"].size, min_token=t.min_token, scale=t.scale,
            alphabet_max=t.alphabet_max, time_horizon=t.time_horizon, action_dim=t.action_dim,
            dfa_states=t.dfa_states, n_rows=arr["head_ids"].size, n_programs=len(t.programs),
            program_keys=keys, program_lengths=lengths.ctypes.data_as(I32P), ops=ops,
            **{k: v.ctypes.data_as(ctypes.POINTER(np.ctypeslib.as_ctypes_type(v.dtype))) for k, v in arr.items()},
        )  # fmt: skip
        handle = ctypes.c_void_p()
        rc = lib.nora_fast_ctx_create(ctypes.byref(tables), ctypes.byref(handle))  # arrays alive until here
        if rc:
            _raise(lib, rc, "nora_fast_ctx_create")
        return cls(handle, "<NativeTables>")

    def _h(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise InputError("this FastKernels context was closed")
        return self._handle

    def program(self, key: str | None) -> int:
        """Post-processing program index for an unnorm key (None: the only program; "" the fixed chain).

        Raises:
            InputError: unknown key, or None with several programs.
        """
        err = ctypes.c_int(0)
        p = self._lib.nora_fast_program(
            self._h(), None if key is None else key.encode("utf-8"), ctypes.byref(err)
        )
        if p < 0:
            _raise(self._lib, err.value, "nora_fast_program")
        return int(p)

    def select(
        self,
        logits: np.ndarray,
        done: np.ndarray,
        pending: np.ndarray,
        *,
        seen: np.ndarray | None = None,
        penalty: float | None = None,
        top: bool = True,
    ) -> Selection:
        """One constrained greedy step for B rows (``nora_edge.generate.greedy``'s selection).

        Args:
            logits: (B, n_rows) float32 decoder-head logits.
            done, pending: (B,) automaton state (:class:`~nora_edge.actions.automaton.AutomatonState`).
            seen: (B, n_rows) uint8 or bool, C-contiguous: rows already in the sequence (repetition penalty);
                the chosen row is marked in place. None: no penalty.
            penalty: transformers' repetition penalty (None or 1.0: off; needs ``seen`` otherwise).
            top: also return the model's own top row (the token classification needs it).

        Returns:
            :class:`Selection` (new arrays; ``done``/``pending`` are not modified).

        Raises:
            InputError: wrong dtype/shape, penalty <= 0 or without ``seen``.
        """
        rows = self.info["n_rows"]
        if not isinstance(logits, np.ndarray) or logits.dtype != np.float32 or logits.ndim != 2:
            got = (
                f"{logits.dtype} {logits.shape}" if isinstance(logits, np.ndarray) else type(logits).__name__
            )
            raise InputError(f"logits must be a float32 (B, {rows}) array, got {got}")
        b = logits.shape[0]
        if logits.shape[1] != rows:
            raise InputError(f"logits has {logits.shape[1]} rows per step, the context's head has {rows}")
        logits = np.ascontiguousarray(logits)
        d, p = _as_ints("done", done, (b,)), _as_ints("pending", pending, (b,))
        pen = 1.0 if penalty is None else float(penalty)
        if not pen > 0:
            raise InputError(f"repetition penalty {penalty!r} must be > 0")
        if seen is not None:
            if (
                not isinstance(seen, np.ndarray)
                or seen.dtype not in (np.uint8, np.bool_)
                or seen.shape != (b, rows)
            ):
                got = f"{seen.dtype} {seen.shape}" if isinstance(seen, np.ndarray) else type(seen).__name__
                raise InputError(f"seen must be a uint8/bool ({b}, {rows}) array, got {got}")
            if not (seen.flags.c_contiguous and seen.flags.writeable):
                raise InputError("seen must be C-contiguous and writeable (it is updated in place)")
        elif pen != 1.0:
            raise InputError(f"repetition penalty {penalty!r} needs the seen rows")
        ids, status = np.empty(b, np.int32), np.empty(b, np.int32)
        tops = np.empty(b, np.int32) if top else None
        rc = self._lib.nora_fast_select(
            self._h(),
            b,
            _ptr(logits),
            rows,
            _ptr(seen),
            pen,
            _ptr(d),
            _ptr(p),
            _ptr(ids),
            _ptr(tops),
            _ptr(status),
        )
        if rc not in (0, E_ROWS):
            _raise(self._lib, rc, "nora_fast_select")
        return Selection(ids, d, p, tops, status)

    def select_step(
        self,
        logits: np.ndarray,
        done: int,
        pending: int,
        seen: np.ndarray | None = None,
        penalty: float = 1.0,
    ) -> tuple[int, int, int, int, int]:
        """:meth:`select` for one row, for the decode loop: few checks, no per-call allocation.

        Args:
            logits: (n_rows,) float32, C-contiguous.
            done, pending: the automaton state.
            seen: (n_rows,) uint8/bool, C-contiguous, writeable (marked in place), or None (no penalty).
            penalty: transformers' repetition penalty (> 0; 1.0 = off).

        Returns:
            (FAST id, done, pending, top row, status): the id is -1 and the state unchanged unless status is 0.

        Raises:
            InputError: wrong dtype/shape/contiguity, or a penalty without ``seen``.
        """
        rows = self.info["n_rows"]
        if logits.dtype != np.float32 or logits.shape != (rows,) or not logits.flags.c_contiguous:
            raise InputError(
                f"logits must be C-contiguous float32 ({rows},), got {logits.dtype} {logits.shape}"
            )
        if seen is not None:
            ok = seen.dtype in (np.uint8, np.bool_) and seen.shape == (rows,)
            if not (ok and seen.flags.c_contiguous and seen.flags.writeable):
                raise InputError(f"seen must be a writeable C-contiguous uint8/bool ({rows},) array")
        elif penalty != 1.0:
            raise InputError(f"repetition penalty {penalty!r} needs the seen rows")
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:  # int32 [done, pending, id, top, status] and its address, once per thread
            buf = np.zeros(5, np.int32)
            scratch = self._local.scratch = (buf, buf.ctypes.data)
        buf, a = scratch
        buf[0], buf[1] = done, pending
        rc = self._lib.nora_fast_select(
            self._h(), 1, logits.ctypes.data, rows, None if seen is None else seen.ctypes.data, penalty,
            a, a + 4, a + 8, a + 12, a + 16,
        )  # fmt: skip
        if rc not in (0, E_ROWS):
            _raise(self._lib, rc, "nora_fast_select")
        return int(buf[2]), int(buf[0]), int(buf[1]), int(buf[3]), int(buf[4])

    def decode_one(self, ids: np.ndarray) -> tuple[int, np.ndarray, int]:
        """:meth:`decode` of one sequence to integer coefficients, for the runtime: few checks, no actions.

        Args:
            ids: (L,) FAST ids, any integer dtype (values outside int32 are out of range, not wrapped).

        Returns:
            (status, coefficients int32 (T*D,) — zeros unless status is 0, error_pos).
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if ids.dtype != np.int32:
            big = (ids < 0) | (ids > np.iinfo(np.int32).max)
            ids = np.where(big, -1, ids).astype(np.int32)  # -1: out of range for the library too
        ids = np.ascontiguousarray(ids)
        out = np.empty(self.total + 3, np.int32)  # coefficients, length, status, error_pos
        out[self.total] = ids.size
        a = out.ctypes.data
        t4 = 4 * self.total
        rc = self._lib.nora_fast_decode(
            self._h(), 1, ids.ctypes.data, max(ids.size, 1), a + t4, -1, None, a, a + t4 + 4, a + t4 + 8
        )
        if rc not in (0, E_ROWS):
            _raise(self._lib, rc, "nora_fast_decode")
        return int(out[self.total + 1]), out[: self.total], int(out[self.total + 2])

    def decode(self, ids, lengths=None, program: int = -1) -> Decoded:
        """Decode B FAST id sequences (strict, as ``ByteTable.decode_chunk``) and post-process them.

        Args:
            ids: a list of B 1-D integer sequences (ragged), or a (B, L) integer array.
            lengths: (B,) ids used per row of a (B, L) array (default: all L).
            program: :meth:`program` index, or -1 for normalized actions.

        Returns:
            :class:`Decoded`.

        Raises:
            InputError: non-integer ids, bad shapes or lengths, program out of range.
        """
        if isinstance(ids, np.ndarray) and ids.ndim == 2:
            seqs, width = ids, ids.shape[1]
            lens = _as_ints(
                "lengths", lengths if lengths is not None else [width] * ids.shape[0], (ids.shape[0],)
            )
        else:
            if lengths is not None:
                raise InputError("lengths apply to a (B, L) id array, not to a list of sequences")
            rows = [np.asarray(s) for s in ids]
            if any(r.ndim != 1 for r in rows):
                raise InputError(f"each id sequence must be 1-D, got shapes {[r.shape for r in rows]}")
            lens = np.array([r.size for r in rows], dtype=np.int32)
            width = int(lens.max()) if lens.size else 0
            seqs = np.zeros((len(rows), width), dtype=np.int64)
            for i, r in enumerate(rows):
                if r.size and (r.dtype == bool or not np.issubdtype(r.dtype, np.integer)):
                    raise InputError(f"FAST ids must be integers, sequence {i} has dtype {r.dtype}")
                seqs[i, : r.size] = r
        if seqs.dtype == bool or not np.issubdtype(seqs.dtype, np.integer):
            raise InputError(f"FAST ids must be integers, got dtype {seqs.dtype}")
        if (lens < 0).any() or (lens > width).any():
            raise InputError(f"lengths {lens.tolist()} outside [0, {width}]")
        if isinstance(program, bool) or not isinstance(program, (int, np.integer)):
            raise InputError(f"program must be an int, got {program!r}")
        if not -1 <= program < self.info["n_programs"]:
            raise InputError(f"program {program} outside [-1, {self.info['n_programs']})")
        vocab = self.info["vocab_size"]
        # every out-of-range id becomes -1: same status and position, no int32 wrap-around
        packed = np.where((seqs >= 0) & (seqs < vocab), seqs, -1).astype(np.int32, order="C")
        b, total = packed.shape[0], self.total
        actions = np.empty((b, self.info["time_horizon"], self.info["action_dim"]), np.float32)
        coeffs, status, pos = np.empty((b, total), np.int32), np.empty(b, np.int32), np.empty(b, np.int32)
        rc = self._lib.nora_fast_decode(
            self._h(), b, _ptr(packed), max(width, 1), _ptr(lens), int(program), _ptr(actions), _ptr(coeffs),
            _ptr(status), _ptr(pos),
        )  # fmt: skip
        if rc not in (0, E_ROWS):
            _raise(self._lib, rc, "nora_fast_decode")
        return Decoded(actions, coeffs, status, pos)

    def close(self) -> None:
        """Free the C context (idempotent); later calls raise InputError."""
        h, self._handle = getattr(self, "_handle", None), None
        if h is not None:
            self._lib.nora_fast_ctx_free(h)

    def __enter__(self) -> FastKernels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


def codec_kernels(mode: str, b, table, automaton) -> FastKernels | None:
    """The libnora_fast context for ``NoraPolicy.load(kernels=mode)`` (None = the numpy codec).

    Args:
        mode: "auto", "c" or "numpy".
        b: the :class:`~nora_edge.bundle.Bundle`; its ``codec.files.native`` tables are opened when listed,
            else the same tables are built in memory.
        table: its :class:`~nora_edge.actions.bytetable.ByteTable`; automaton: its FastAutomaton or None.

    Raises:
        InputError: "c" without the library.
        BundleError: the bundle's native tables are malformed or disagree with the manifest.
        KernelsError: "auto" with $NORA_EDGE_KERNELS_LIB set to a library that does not load.
    """
    from nora_edge.actions.automaton import FastAutomaton
    from nora_edge.actions.native import build_native

    if mode == "numpy":
        return None
    if not available():
        if mode == "c":
            raise InputError(f"kernels='c' but libnora_fast is unavailable: {unavailable_reason()}")
        if explicitly_requested():  # the user named a library: do not fall back silently
            raise KernelsError(f"${ENV_LIB}: {unavailable_reason()}")
        warn_unavailable()
        return None
    native = b.codec.native
    if native is not None:
        fast = FastKernels.open(b.file(f"{native}/native.txt").parent)
    else:
        auto = automaton or FastAutomaton(table, b.codec.time_horizon, b.codec.action_dim)
        tables = build_native(table, auto, b.actions.head_rows, b.actions.base, b.postprocess, b.norm_stats)
        fast = FastKernels.from_tables(tables)
    got = {k: fast.info[k] for k in ("vocab_size", "time_horizon", "action_dim", "n_rows", "min_token")}
    want = dict(
        vocab_size=table.vocab_size, time_horizon=b.codec.time_horizon, action_dim=b.codec.action_dim,
        n_rows=int(b.actions.head_rows.size), min_token=table.min_token,
    )  # fmt: skip
    if got != want or fast.info["scale"] != table.scale:
        fast.close()
        raise BundleError(f"{b.path}: codec/native tables {got} disagree with the manifest/byte table {want}")
    return fast
