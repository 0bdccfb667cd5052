"""Host CPU features that change what onnxruntime's kernels compute (read from /proc/cpuinfo)."""

from __future__ import annotations


def has_vnni() -> bool:
    """True when the CPU has AVX-VNNI / AVX512-VNNI (onnxruntime's int8 GEMM then does not saturate); True
    where /proc/cpuinfo cannot be read (the strict bounds apply)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "vnni" in f.read()
    except OSError:
        return True
