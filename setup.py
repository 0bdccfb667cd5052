"""setuptools hook: compile libnora_fast (the FAST+ codec) and libnora_edge (C part: image preprocessing) into the
package at build time.

Data flow: kernels/src/{context,fast_cpu,cuda_stub}.c --cc (flags of kernels/Makefile)--> <build_lib>/nora_edge/
_native/libnora_fast.so (loaded first by ``nora_edge.kernels``); kernels/src/edge/*.c --cc--> .../libnora_edge_pre.so
(loaded first by ``nora_edge.edge_lib``). Without a C compiler the build prints one message per library and goes
on: the runtime then uses its numpy paths (same results). Editable installs load kernels/build/ (``make -C kernels
cpu``) instead. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
KERNELS = ROOT / "kernels"
SOURCES = ["src/context.c", "src/fast_cpu.c", "src/cuda_stub.c"]
CFLAGS = ["-std=c11", "-O2", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-Wall"]
TARGET = Path("nora_edge") / "_native" / "libnora_fast.so"
EDGE_TARGET = Path("nora_edge") / "_native" / "libnora_edge_pre.so"


def edge_sources() -> list[str]:
    """libnora_edge's C sources (kernels/mk/edge.mk's EDGE_C_SRC: src/edge/*.c), relative to kernels/."""
    return sorted(str(p.relative_to(KERNELS)) for p in (KERNELS / "src" / "edge").glob("*.c"))


def compile_kernels(out: Path, sources: list[str] | None = None) -> str | None:
    """Build a shared library at ``out`` from ``sources`` (default libnora_fast's); None on success, else why
    it was skipped."""
    sources = SOURCES if sources is None else sources
    cc = shlex.split(os.environ.get("CC", "cc"))
    if shutil.which(cc[0]) is None:
        return f"no C compiler ('{cc[0]}' not found; set CC)"
    missing = [s for s in sources if not (KERNELS / s).is_file()]
    if missing or not sources:
        return f"kernel sources missing: {missing or 'none found'}"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*cc, *CFLAGS, "-I" + str(KERNELS / "include"), "-I" + str(KERNELS / "src"),
           *(str(KERNELS / s) for s in sources), "-shared", "-o", str(out), "-lm"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"compiler failed ({' '.join(cmd)}):\n{proc.stderr.strip()}"
    return None


class BuildPyWithKernels(build_py):
    """build_py, plus libnora_fast.so next to the package in the build directory (never in the source tree)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable: nora_edge.kernels finds kernels/build/libnora_fast.so
        why = compile_kernels(Path(self.build_lib) / TARGET)
        if why:
            print(
                f"nora-edge: libnora_fast not built: {why}. The runtime falls back to the numpy FAST codec "
                "(same results); build the C library later with `make -C kernels cpu`."
            )
        why = compile_kernels(Path(self.build_lib) / EDGE_TARGET, edge_sources())
        if why:
            print(
                f"nora-edge: libnora_edge not built: {why}. The runtime falls back to the numpy image "
                "preprocessing (same values); build the C library later with `make -C kernels cpu`."
            )


class BinaryDistribution(Distribution):
    """The wheel holds a compiled library: tag it for this platform."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithKernels}, distclass=BinaryDistribution)
