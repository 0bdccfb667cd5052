"""Instruction counts of libnora_fast under callgrind: per chunk decode and per token select, C only.

Data flow: the benchmark's id sequences (N, L) and selection rows (states, logits, seen) --:func:`write_corpus`-->
``corpus.bin`` (the format in ``kernels/tools/bench_decode.c``) --:func:`build_driver` (cc + the static
library)--> ``bench_decode`` --``valgrind --tool=callgrind --toggle-collect=<library call>`` once per mode--> the
``summary:`` line of each callgrind.out (Ir inside the library call only: context load and corpus read are not
counted) --/ N--> instructions per chunk / per token.

Instruction counts do not move with machine load, so they are the stable number to compare builds by. The
Python paths are not counted: under callgrind the interpreter's own work would dwarf and blur them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from nora_edge.errors import InputError

REPO = Path(__file__).resolve().parent.parent
DRIVER_SRC = REPO / "kernels" / "tools" / "bench_decode.c"
MODES = {  # mode -> (library call counted, what one unit is)
    "decode-batch": ("nora_fast_decode", "chunk"),
    "decode-each": ("nora_fast_decode", "chunk"),
    "select-each": ("nora_fast_select", "token"),
    "select-batch": ("nora_fast_select", "token"),
}


def write_corpus(
    path: Path,
    ids: np.ndarray,
    lengths: np.ndarray,
    states: np.ndarray,
    logits: np.ndarray,
    seen: np.ndarray,
    penalty: float,
    program: int,
) -> Path:
    """Write the driver's corpus file.

    Args:
        path: file to write.
        ids: int32 (N, L) FAST id sequences, padded.
        lengths: int32 (N,) ids used per sequence.
        states: int32 (M, 2) automaton state (done, pending) of each selection row.
        logits: float32 (M, n_rows) head logits of each row.
        seen: bool or uint8 (M, n_rows) rows already in the sequence.
        penalty: repetition penalty.
        program: post-processing program index (-1 = normalized actions).
    """
    n, stride = ids.shape
    m, rows = logits.shape
    head = np.array([1, n, stride, m, rows], dtype="<i4").tobytes()
    parts = [
        b"NFBC",
        head,
        np.float32(penalty).astype("<f4").tobytes(),
        np.int32(program).astype("<i4").tobytes(),
        np.ascontiguousarray(lengths, dtype="<i4").tobytes(),
        np.ascontiguousarray(ids, dtype="<i4").tobytes(),
        np.ascontiguousarray(states, dtype="<i4").tobytes(),
        np.ascontiguousarray(logits, dtype="<f4").tobytes(),
        np.ascontiguousarray(seen, dtype=np.uint8).tobytes(),
    ]
    path.write_bytes(b"".join(parts))
    return path


def build_driver(out_dir: Path, static_lib: Path) -> Path:
    """Compile ``kernels/tools/bench_decode.c`` against the static library into ``out_dir``.

    Raises:
        InputError: no C compiler, or the static library is missing (``make -C kernels cpu``).
    """
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise InputError("no C compiler (cc) to build kernels/tools/bench_decode.c")
    if not static_lib.is_file():
        raise InputError(f"{static_lib} is missing: run `make -C kernels cpu` first")
    exe = out_dir / "bench_decode"
    cmd = [
        cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wstrict-prototypes",
        f"-I{REPO / 'kernels' / 'include'}", str(DRIVER_SRC), str(static_lib), "-lm", "-o", str(exe),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def summary_ir(callgrind_out: Path) -> int:
    """The ``summary:`` (or ``totals:``) Ir of a callgrind output file.

    Raises:
        InputError: the file holds neither line.
    """
    for line in callgrind_out.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise InputError(f"{callgrind_out}: no summary/totals line")


def count_instructions(exe: Path, native_dir: Path, corpus: Path, units: dict[str, int], work: Path) -> dict:
    """Run every mode once under callgrind.

    Args:
        exe: the driver.
        native_dir: codec/native directory of the codec.
        corpus: the corpus file.
        units: {"chunk": N sequences, "token": M selection rows}.
        work: folder for the callgrind.out files.

    Returns:
        {mode: {"calls_to": fn, "ir": total Ir, "per": unit, "n": count, "ir_per_unit": Ir / count}}, or
        {"skipped": reason} where valgrind is not installed.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return {"skipped": "valgrind not installed"}
    out: dict = {}
    for mode, (fn, unit) in MODES.items():
        if units[unit] == 0:
            continue
        dump = work / f"callgrind.{mode}.out"
        cmd = [
            valgrind, "--tool=callgrind", f"--toggle-collect={fn}", f"--callgrind-out-file={dump}",
            str(exe), str(native_dir), str(corpus), mode,
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise InputError(f"callgrind {mode} failed (rc {run.returncode}): {run.stderr[-800:]}")
        ir = summary_ir(dump)
        out[mode] = {"calls_to": fn, "ir": ir, "per": unit, "n": units[unit], "ir_per_unit": ir / units[unit]}
    return out


def callgrind_rows(result: dict) -> list[list]:
    """Markdown rows: mode, library call, units, Ir total, Ir per unit."""
    if "skipped" in result:
        return [["(skipped)", result["skipped"], "", "", ""]]
    return [
        [mode, r["calls_to"], f"{r['n']} {r['per']}s", r["ir"], round(r["ir_per_unit"])]
        for mode, r in result.items()
    ]
