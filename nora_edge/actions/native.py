"""The codec tables the C library reads: ``codec/native/`` of a bundle (written at export, hashed by the manifest).

Data flow (export): ByteTable + FastAutomaton (T, D) + the decoder head's rows + the post-processing chain and
norm stats --:func:`build_native`--> :class:`NativeTables` --:func:`write_native`--> ``codec/native/``:

  native.txt            format line, sizes, FAST parameters, post-processing programs (text, floats as repr)
  fast_offsets.i32      (V+1,) byte offsets of each FAST id        fast_bytes.u8       (N,) token bytes
  automaton_adv.i32     (Q, V) coefficients completed              automaton_nxt.i32   (Q, V) next DFA state
  automaton_reach.u8    (T*D+1, Q) exact completion reachable      idct_basis.f64      (T, T) DCT-III basis
  head_ids.i32          (n_rows,) model id of each logits row      action_rows.i32     (V,) row of each FAST id

All arrays little-endian, row-major. native.txt is written last, so a directory without it is incomplete.
Data flow (runtime): ``kernels/`` ``nora_fast_ctx_open`` reads the directory; :func:`read_native` is the Python
reader (tests, tools).

A post-processing program is the manifest chain (``nora_edge.actions.postprocess``) compiled for one unnorm key
into per-dimension float64 ops that round exactly as :meth:`Chain.apply` does:
``range a b``: ``0.5 * (x + 1) * (b - a) + a`` (q01/q99 and min/max); ``affine a b``: ``x * a + b`` (mean/std,
gripper rescale ``2x - 1``); ``scale a``: ``x * a`` (gripper invert); ``sign`` (gripper binarize).
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nora_edge.actions.automaton import FastAutomaton
from nora_edge.actions.bytetable import RAW_DATA, RAW_OFFSETS, ByteTable
from nora_edge.actions.dct import idct_basis
from nora_edge.actions.normalize import NormStats
from nora_edge.actions.postprocess import MIN_MAX, Q01_Q99, UNNORMALIZE, Chain
from nora_edge.atomic import write_bytes_atomic
from nora_edge.errors import BundleError

NATIVE_FORMAT = 1
NATIVE_DIR = "codec/native"
NATIVE_TXT = "native.txt"
ARRAY_FILES = {  # field -> (file, dtype)
    "offsets": (RAW_OFFSETS, "<i4"),
    "data": (RAW_DATA, "u1"),
    "adv": ("automaton_adv.i32", "<i4"),
    "nxt": ("automaton_nxt.i32", "<i4"),
    "reach": ("automaton_reach.u8", "u1"),
    "head_ids": ("head_ids.i32", "<i4"),
    "action_rows": ("action_rows.i32", "<i4"),
    "basis": ("idct_basis.f64", "<f8"),
}
OP_NAMES = ("range", "affine", "scale", "sign")

Op = tuple[str, int, float, float]  # (name, dim, a, b)


@dataclass(frozen=True)
class NativeTables:
    """Everything ``codec/native/`` holds (arrays as in the module docstring)."""

    offsets: np.ndarray
    data: np.ndarray
    min_token: int
    scale: float
    alphabet_max: int
    time_horizon: int
    action_dim: int
    adv: np.ndarray
    nxt: np.ndarray
    reach: np.ndarray
    head_ids: np.ndarray
    action_rows: np.ndarray
    basis: np.ndarray
    programs: tuple[tuple[str, tuple[Op, ...]], ...]

    @property
    def vocab_size(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def dfa_states(self) -> int:
        return int(self.adv.shape[0])


def compile_program(chain: Chain, stats: NormStats | None, action_dim: int) -> tuple[Op, ...]:
    """The chain as per-dimension ops for one set of q01/q99 stats (None for min_max / mean_std chains)."""
    ops: list[Op] = []
    for s in chain.steps:
        if s.op == UNNORMALIZE:
            if s.mode == Q01_Q99:
                name, a, b = "range", stats.q01, stats.q99  # type: ignore[union-attr]
            elif s.mode == MIN_MAX:
                name, a, b = "range", s.params["min"], s.params["max"]
            else:
                name, a, b = "affine", s.params["std"], s.params["mean"]
            for d in range(action_dim):
                if s.mask is None or bool(s.mask[d]):
                    ops.append((name, d, float(a[d]), float(b[d])))
        elif s.op == "gripper_rescale":
            ops.append(("affine", int(s.dim) % action_dim, 2.0, -1.0))
        elif s.op == "gripper_binarize":
            ops.append(("sign", int(s.dim) % action_dim, 0.0, 0.0))
        else:  # gripper_invert
            ops.append(("scale", int(s.dim) % action_dim, -1.0, 0.0))
    return tuple(ops)


def compile_programs(
    chain: Chain, norm_stats: Mapping[str, NormStats], action_dim: int
) -> tuple[tuple[str, tuple[Op, ...]], ...]:
    """One program per unnorm key a caller may pass: every norm_stats key for a q01/q99 chain by the caller's
    key; the chain's fixed key (q01/q99) or "" (min_max / mean_std) otherwise."""
    s = chain.unnormalize
    if s.mode == Q01_Q99 and s.key is None:
        return tuple((key, compile_program(chain, st, action_dim)) for key, st in sorted(norm_stats.items()))
    if s.mode == Q01_Q99:
        return ((s.key, compile_program(chain, norm_stats[s.key], action_dim)),)
    return (("", compile_program(chain, None, action_dim)),)


def program_key(stats: NormStats | None) -> str:
    """The program name serving a call whose :meth:`Chain.stats_for` returned ``stats``."""
    return stats.key if stats is not None else ""


def build_native(
    table: ByteTable,
    automaton: FastAutomaton,
    head_ids: np.ndarray,
    action_base: int,
    chain: Chain,
    norm_stats: Mapping[str, NormStats],
) -> NativeTables:
    """Collect the tables.

    Args:
        table: the FAST byte table.
        automaton: the constraint automaton for the bundle's (T, D).
        head_ids: (n_rows,) model id of each decoder logits row.
        action_base: model id of FAST id 0.
        chain: the manifest's post-processing chain; norm_stats: the bundle's stats.

    Raises:
        BundleError: the head lacks a row for some FAST id.
    """
    head_ids = np.asarray(head_ids, dtype=np.int64)
    row_of = {int(q): r for r, q in enumerate(head_ids.tolist())}
    rows = np.array([row_of.get(action_base + i, -1) for i in range(table.vocab_size)], dtype=np.int64)
    if (rows < 0).any():
        raise BundleError(
            f"decoder head lacks rows for {(rows < 0).sum()} of the {table.vocab_size} FAST ids"
        )
    adv, nxt, reach = automaton.tables()
    return NativeTables(
        offsets=table.offsets.astype(np.int32),
        data=table.data.astype(np.uint8),
        min_token=int(table.min_token),
        scale=float(table.scale),
        alphabet_max=int(table.alphabet_max),
        time_horizon=automaton.time_horizon,
        action_dim=automaton.action_dim,
        adv=np.asarray(adv, dtype=np.int32),
        nxt=np.asarray(nxt, dtype=np.int32),
        reach=np.asarray(reach, dtype=np.uint8),
        head_ids=head_ids.astype(np.int32),
        action_rows=rows.astype(np.int32),
        basis=np.asarray(idct_basis(automaton.time_horizon), dtype=np.float64),
        programs=compile_programs(chain, norm_stats, automaton.action_dim),
    )


def native_text(t: NativeTables) -> str:
    """native.txt for ``t`` (floats as Python repr, which C's strtod reads back exactly)."""
    lines = [
        f"nora_fast_native {NATIVE_FORMAT}",
        f"vocab_size {t.vocab_size}",
        f"n_bytes {t.data.size}",
        f"min_token {t.min_token}",
        f"scale {t.scale!r}",
        f"alphabet_max {t.alphabet_max}",
        f"time_horizon {t.time_horizon}",
        f"action_dim {t.action_dim}",
        f"dfa_states {t.dfa_states}",
        f"n_rows {t.head_ids.size}",
        f"programs {len(t.programs)}",
    ]
    for key, ops in t.programs:
        lines.append(f"program {len(ops)} ={urllib.parse.quote(key, safe='')}")
        for name, dim, a, b in ops:
            args = {"range": f"{a!r} {b!r}", "affine": f"{a!r} {b!r}", "scale": f"{a!r}", "sign": ""}[name]
            lines.append(f"op {name} {dim} {args}".rstrip())
    return "\n".join(lines) + "\n"


def write_native(directory: str | os.PathLike[str], t: NativeTables) -> Path:
    """Write every array, then native.txt (each file atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for field, (name, dtype) in ARRAY_FILES.items():
        write_bytes_atomic(directory / name, np.ascontiguousarray(getattr(t, field), dtype=dtype).tobytes())
    write_bytes_atomic(directory / NATIVE_TXT, native_text(t).encode("utf-8"))
    return directory


def read_native(directory: str | os.PathLike[str]) -> NativeTables:
    """Python reader of :func:`write_native`'s files.

    Raises:
        BundleError: a missing file, a malformed line or sizes that disagree with native.txt.
    """
    directory = Path(directory)
    path = directory / NATIVE_TXT
    if not path.is_file():
        raise BundleError(f"native codec tables missing: {path}")
    fields: dict[str, str] = {}
    programs: list[tuple[str, list[Op]]] = []
    declared: list[int] = []  # ops each program line announces
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        words = line.split()
        try:
            if not words or words[0].startswith("#"):
                continue
            if words[0] == "program":
                if not words[2].startswith("="):
                    raise ValueError(f"program key {words[2]!r} lacks its '=' prefix")
                programs.append((urllib.parse.unquote(words[2][1:]), []))
                declared.append(int(words[1]))
            elif words[0] == "op":
                a = float(words[3]) if len(words) > 3 else 0.0
                b = float(words[4]) if len(words) > 4 else 0.0
                if words[1] not in OP_NAMES:
                    raise ValueError(words[1])
                programs[-1][1].append((words[1], int(words[2]), a, b))
            else:
                fields[words[0]] = words[1]
        except (IndexError, ValueError) as exc:
            raise BundleError(f"{path} line {lineno}: cannot parse {line!r} ({exc})") from exc
    counts = [len(ops) for _, ops in programs]
    if counts != declared or len(programs) != int(fields.get("programs", len(programs))):
        raise BundleError(
            f"{path}: programs declare {declared} ops (programs {fields.get('programs')}), found {counts}"
        )
    try:
        if int(fields["nora_fast_native"]) != NATIVE_FORMAT:
            raise BundleError(
                f"{path}: format {fields['nora_fast_native']}, this build reads {NATIVE_FORMAT}"
            )
        v, q, n = int(fields["vocab_size"]), int(fields["dfa_states"]), int(fields["n_bytes"])
        tt, d, rows = int(fields["time_horizon"]), int(fields["action_dim"]), int(fields["n_rows"])
        shapes = {
            "offsets": (v + 1,), "data": (n,), "adv": (q, v), "nxt": (q, v), "reach": (tt * d + 1, q),
            "head_ids": (rows,), "action_rows": (v,), "basis": (tt, tt),
        }  # fmt: skip
        arrays = {}
        for field, (name, dtype) in ARRAY_FILES.items():
            arr = np.fromfile(directory / name, dtype=dtype)
            if arr.size != int(np.prod(shapes[field])):
                raise BundleError(
                    f"{directory / name}: {arr.size} values, native.txt implies {shapes[field]}"
                )
            arrays[field] = arr.reshape(shapes[field]).astype(np.dtype(dtype).newbyteorder("="))
        return NativeTables(
            min_token=int(fields["min_token"]), scale=float(fields["scale"]),
            alphabet_max=int(fields["alphabet_max"]), time_horizon=tt, action_dim=d,
            programs=tuple((k, tuple(ops)) for k, ops in programs), **arrays,
        )  # fmt: skip
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise BundleError(f"{directory}: incomplete native codec tables ({exc!r})") from exc
