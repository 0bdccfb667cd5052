"""Measure this machine's peaks at run time: the ``host`` device profile and the CI gate's yardstick.

Data flow: a few ORT graphs (``nora_edge.bench.ortgraph``) timed for ~1.5 s in all -> :class:`HostMeasurement`
(GEMM GFLOP/s per precision, GEMV weight-streaming GB/s, numpy memory-copy GB/s, ``unit_ms``) ->
:func:`host_profile` merges it with ``profiles/host.toml`` (efficiency factors) into a ``DeviceProfile``.

The roofline's host bandwidth is the ORT fp32 GEMV streaming rate (a 64 MB weight, bigger than the caches),
because decode steps are GEMVs run by that same kernel; the plain memory copy is reported next to it.
:class:`Yardstick` (a small fixed GEMM and a chain of small nodes, sampled between bench steps) is what the CI gate
divides stage latencies by, so a slower or busier machine does not read as a regression.
"""

from __future__ import annotations

import os
import statistics
import tomllib
from dataclasses import asdict, dataclass

import numpy as np

from nora_edge.bench.ortgraph import GraphBuilder, time_session
from nora_edge.errors import InputError
from nora_edge.profiles import PRECISIONS, PROFILE_DIR, DeviceProfile, parse_profile

GEMM_SHAPE = (128, 2048, 2048)  # (M, K, N): a prefill-sized matmul
GEMV_SHAPE = (1, 2048, 8192)  # 64 MB of fp32 weights: streams from DRAM
# int8 / int4 GEMV: 64 MB of weights each, bigger than the caches like the fp32 GEMV (a 16 MB int4 weight stays
# cache-resident and runs 2x faster than a decode step streaming 1.5 GB). ORT's CPU kernels for these dequantize
# in registers and are compute-limited at batch 1, so their rate, not the bandwidth, bounds a decode step.
QGEMV_SHAPES = {"int8": (1, 8192, 8192), "int4": (1, 8192, 16384)}
COPY_BYTES = 64 * 2**20


@dataclass(frozen=True)
class HostMeasurement:
    """What :func:`measure_host` measured (rates from the best run, ``unit_ms`` from medians).

    Attributes:
        gemm_gflops: per precision, GFLOP/s of an ORT (M, K, N) = GEMM_SHAPE matmul.
        gemv_gbs: fp32 GEMV weight bytes / s (GEMV_SHAPE).
        gemv_gflops: int8 / int4 GFLOP/s of a batch-1 ORT matmul (QGEMV_SHAPES).
        copy_gbs: numpy copy, (read + write) bytes / s.
        unit_ms: median fp32 GEMM ms + median fp32 GEMV ms (the CI gate's yardstick).
        threads: ORT intra-op threads (0 = ORT default).
        cpu_count: os.cpu_count().
        memory_gb: physical memory.
    """

    gemm_gflops: dict[str, float]
    gemv_gbs: float
    gemv_gflops: dict[str, float]
    copy_gbs: float
    unit_ms: float
    threads: int
    cpu_count: int
    memory_gb: float

    def to_json(self) -> dict:
        return asdict(self)


def linear_session(shape: tuple[int, int, int], precision: str, threads: int | None) -> tuple:
    """(ORT session, feeds) of one (M, K) @ (K, N) linear in ``precision``, fed ones."""
    m, k, n = shape
    dtype = np.float16 if precision == "fp16" else np.float32
    g = GraphBuilder(dtype)
    x = g.add_input("x", [m, k])
    g.add_output(g.linear(x, k, n, precision))
    return g.session(threads), {"x": np.ones((m, k), dtype)}


def gemm_gflops(precision: str, threads: int | None, reps: int) -> tuple[float, float]:
    """(GFLOP/s of the best run, median seconds) of one GEMM_SHAPE linear in ``precision``.

    Peaks come from the best run: on a shared machine the median mixes in other people's load.
    """
    m, k, n = GEMM_SHAPE
    times = time_session(*linear_session(GEMM_SHAPE, precision, threads), reps)
    return 2.0 * m * k * n / min(times) / 1e9, statistics.median(times)


def qgemv_gflops(precision: str, threads: int | None, reps: int) -> float:
    """GFLOP/s of the best run of one QGEMV_SHAPES batch-1 linear in ``precision`` (int8 or int4)."""
    m, k, n = QGEMV_SHAPES[precision]
    times = time_session(*linear_session(QGEMV_SHAPES[precision], precision, threads), reps)
    return 2.0 * m * k * n / min(times) / 1e9


def gemv_gbs(threads: int | None, reps: int) -> tuple[float, float]:
    """(weight GB/s of the best run, median seconds) of an fp32 GEMV over a 64 MB weight."""
    _, k, n = GEMV_SHAPE
    times = time_session(*linear_session(GEMV_SHAPE, "fp32", threads), reps)
    return k * n * 4 / min(times) / 1e9, statistics.median(times)


def copy_gbs(reps: int) -> float:
    """numpy copy of COPY_BYTES: (read + write) bytes / best seconds."""
    import time

    src = np.ones(COPY_BYTES // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / min(times[1:]) / 1e9


def physical_memory_gb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 1e9
    except ImportError:  # psutil is in the bench extra; sysconf works on Linux
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def measure_host(threads: int | None = None, reps: int = 7) -> HostMeasurement:
    """Run the microbenchmarks (~1.5 s). ``threads`` = ORT intra-op threads (None: ORT default, as NoraPolicy)."""
    rates, unit = {}, 0.0
    for precision in PRECISIONS:
        rates[precision], t = gemm_gflops(precision, threads, reps)
        if precision == "fp32":
            unit += t
    bw, t = gemv_gbs(threads, reps)
    unit += t
    return HostMeasurement(
        gemm_gflops=rates,
        gemv_gbs=bw,
        gemv_gflops={p: qgemv_gflops(p, threads, reps) for p in QGEMV_SHAPES},
        copy_gbs=copy_gbs(reps),
        unit_ms=1e3 * unit,
        threads=threads or 0,
        cpu_count=os.cpu_count() or 1,
        memory_gb=physical_memory_gb(),
    )


def host_profile(m: HostMeasurement) -> DeviceProfile:
    """The ``host`` DeviceProfile: measured peaks + the efficiency factors of ``profiles/host.toml``."""
    path = PROFILE_DIR / "host.toml"
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    m_, k, n = GEMM_SHAPE
    src = f"measured by nora_edge.bench.microbench: ORT CPU ({m.threads or 'default'} threads)"
    data["memory"] = {
        "capacity_gb": {"value": m.memory_gb, "source": "psutil.virtual_memory().total"},
        "bandwidth_gbs": {
            "value": m.gemv_gbs,
            "source": f"{src} fp32 GEMV {GEMV_SHAPE[1]}x{GEMV_SHAPE[2]} weight streaming "
            f"(numpy copy: {m.copy_gbs:.1f} GB/s)",
        },
    }
    kernels = {
        "fp32": "MatMul fp32",
        "fp16": "MatMul fp16",
        "int8": "DynamicQuantizeLinear+MatMulInteger",
        "int4": "MatMulNBits 4-bit block 128 accuracy_level 4",
    }
    data["peak_tflops"] = {
        p: {"value": m.gemm_gflops[p] / 1e3, "source": f"{src} {kernels[p]} GEMM {m_}x{k}x{n}"}
        for p in PRECISIONS
    }
    data["gemv_tflops"] = {
        p: {"value": m.gemv_gflops[p] / 1e3, "source": f"{src} {kernels[p]} GEMV {'x'.join(map(str, shape))}"}
        for p, shape in QGEMV_SHAPES.items()
    }
    return parse_profile(data, str(path), measured=True)


def dispatch_session(threads: int | None, blocks: int = 20, width: int = 128, heads: int = 4) -> tuple:
    """(ORT session, feeds) of a chain of ``blocks`` x 9 small nodes on a (1, width) row: per block a biased
    (width, width) linear, mean-centering, a head split, softmax and a residual add.

    About as many nodes as the tiny bundle's decoder (~180 after ORT's fusions) on tensors just as small, so its
    time is per-node dispatch, not arithmetic: what a decode step of a small decoder is bound by.
    """
    g = GraphBuilder(np.float32)
    h = g.add_input("x", [1, width])
    split, flat = g.const([1, heads, width // heads]), g.const([1, width])
    for _ in range(blocks):
        y = g.linear(h, width, width, "fp32", bias=True)  # (1, width)
        (m,) = g.op("ReduceMean", [y], axes=[-1], keepdims=1)
        (c,) = g.op("Sub", [y, m])
        (r,) = g.op("Reshape", [c, split])  # (1, heads, width / heads)
        (t,) = g.op("Transpose", [r], perm=[1, 0, 2])
        (sm,) = g.op("Softmax", [t], axis=-1)
        (t2,) = g.op("Transpose", [sm], perm=[1, 0, 2])
        (f,) = g.op("Reshape", [t2, flat])
        (h,) = g.op("Add", [f, h])
    g.add_output(h)
    return g.session(threads), {"x": np.ones((1, width), np.float32)}


DISPATCH_REPS = 3


class Yardstick:
    """The CI gate's machine-speed units, two workloads timed once per bench step.

    ``gemm``: a fixed fp32 GEMM (64x1024x1024), ~1.6 ms on one core here; the unit of the compute-bound stages.
    It had a 32 MB GEMV too, dropped: that weight streams from DRAM, whose bandwidth other processes share, and
    its fastest run moved 1.03-1.25 ms between processes and 6% between windows of one process (the GEMM: under
    1.1%) while the gated stages of the tiny bundle, cache-resident, did not move with it (measured on a loaded
    2-vCPU VM).

    ``dispatch``: :func:`dispatch_session` warm (the fastest of ``DISPATCH_REPS`` back-to-back runs), ~0.11 ms
    here; with the GEMM (geometric mean) the unit of the tiny decoder's dispatch-bound prefill and step
    (``gate_baseline.STAGE_UNITS``). The GEMM
    alone did not carry those across hosts: between two runs of the same code on two instances of this CI's VM
    type, the GEMM got 10% faster while the decode step got 14% slower (0.311 -> 0.355 ms).

    Sampled between bench steps, so both see the machine in the same state as the stages they normalize.
    """

    GEMM = (64, 1024, 1024)
    SHAPES = (GEMM,)
    WORKLOADS = ("gemm", "dispatch")

    def __init__(self, threads: int | None = None) -> None:
        self._runs = {
            "gemm": linear_session(self.GEMM, "fp32", threads),
            "dispatch": dispatch_session(threads),
        }
        self.samples: dict[str, list[float]] = {w: [] for w in self.WORKLOADS}
        for sess, feeds in self._runs.values():  # warm up
            sess.run(None, feeds)

    @property
    def samples_ms(self) -> list[float]:
        """The GEMM's samples (ms)."""
        return self.samples["gemm"]

    def sample(self) -> float:
        """Time each workload once; records milliseconds and returns the GEMM's."""
        sess, feeds = self._runs["gemm"]
        self.samples["gemm"].append(1e3 * time_session(sess, feeds, reps=1, warmup=0)[0])
        # the chain warm, as a decode step runs right after the previous one: a cold first run (caches taken by
        # the policy's step) took twice as long and moved 6% between bench processes
        sess, feeds = self._runs["dispatch"]
        self.samples["dispatch"].append(1e3 * min(time_session(sess, feeds, reps=DISPATCH_REPS, warmup=1)))
        return self.samples["gemm"][-1]

    def unit(self, name: str = "gemm") -> float:
        """The fastest sample of one workload: the machine's speed when nothing else preempts the bench."""
        if not self.samples[name]:
            raise InputError(f"Yardstick.unit({name!r}) before any sample")
        return float(min(self.samples[name]))

    @property
    def unit_ms(self) -> float:
        """The GEMM's fastest sample."""
        return self.unit("gemm")
