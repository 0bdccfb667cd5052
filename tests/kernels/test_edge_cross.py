"""The pure-C parts cross-built for aarch64 (Jetson Orin's ISA) and run under qemu-user (kernels/mk/cross.mk).

Data flow:
  ``make -C kernels cross-deps`` (only when the cross gcc / qemu is missing) --> ``make cross-aarch64 BUILD=<tmp>``
  --> static aarch64 pre_check + check_corpus, aarch64 libnora_fast.so + libnora_edge_pre.so (ELF machine and
  exported symbols checked with aarch64-linux-gnu-readelf).
  test_edge_preprocess.frames() written raw (exact-size buffers, row strides kept) + a case list
  --qemu-aarch64 pre_check (portable loops, -ffp-contract=off)--> float32 files == the numpy path BITWISE, counted.
  test_native_build.write_corpus (select, decode, broken dirs; numpy reference) --qemu-aarch64 check_corpus--> every
  case PASSes with its count (actions within check_corpus.c's 1e-6 of the float64 reference, the rest exact);
  its decode cases --qemu-aarch64 decode_dump--> float64 actions == the host libnora_fast's nora_fast_decode_f64
  BITWISE (what -ffp-contract=off buys: a fused iDCT stays within 1e-6 but not bit for bit).
Nothing here ran on a Jetson: qemu emulates the ISA (and its FMADD rounding), not the board.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import time

import numpy as np
import pytest

from nora_edge.preprocess import preprocess_image

from . import test_edge_preprocess as pre
from . import test_native_build as native
from .conftest import I32, KERNELS, make, ptr

CROSS_TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-readelf", "qemu-aarch64")
# until kernels/Makefile has `-include mk/cross.mk`, name both makefiles on the command line
MAKEFILES = (
    () if "mk/cross.mk" in (KERNELS / "Makefile").read_text() else ("-f", "Makefile", "-f", "mk/cross.mk")
)
ROWS_FAILED = 7  # NORA_FAST_E_ROWS (kernels/include/nora_fast.h): the call ran, some sequences failed
EXPORTS = {"libnora_edge_pre.so": "nora_edge_preprocess", "libnora_fast.so": "nora_fast_decode"}


def _qemu(exe, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-aarch64", str(exe), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def cross_build(tmp_path_factory):
    """The aarch64 build dir ($(BUILD)/aarch64); skips when the toolchain cannot be installed or qemu cannot run."""
    if not all(shutil.which(t) for t in CROSS_TOOLS):
        start = time.monotonic()
        r = subprocess.run(["make", "-C", str(KERNELS), *MAKEFILES, "cross-deps"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=900)  # fmt: skip
        missing = [t for t in CROSS_TOOLS if not shutil.which(t)]
        if r.returncode != 0 or missing:
            pytest.skip(f"aarch64 cross toolchain unavailable (make cross-deps rc {r.returncode}, missing "
                        f"{missing}): {(r.stdout + r.stderr)[-600:]}")  # fmt: skip
        print(f"make cross-deps: {time.monotonic() - start:.0f} s")
    build = tmp_path_factory.mktemp("cross")
    r = make("cross-aarch64", build, *MAKEFILES, "-j2")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = build / "aarch64"
    assert "-ffp-contract=off" in r.stdout and "-static" in r.stdout
    smoke = _qemu(out / "pre_check")  # misuse checks only
    if "total" not in smoke.stdout:  # the emulator itself did not run the binary (no PASS/FAIL output at all)
        pytest.skip(f"qemu-aarch64 cannot run a static aarch64 binary here (rc {smoke.returncode}): "
                    f"{smoke.stderr[-600:]}")  # fmt: skip
    return out


def test_outputs_are_aarch64_and_export_the_abi(cross_build):
    """Both executables are static AArch64 ELF; both libraries are AArch64 shared objects exporting the ABI."""
    checked = 0
    for name in ("pre_check", "check_corpus", "decode_dump", *EXPORTS):
        r = subprocess.run(["aarch64-linux-gnu-readelf", "-h", "-l", "--dyn-syms", str(cross_build / name)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0 and "Machine:                           AArch64" in r.stdout, name
        if name in EXPORTS:
            assert "DYN (Shared object file)" in r.stdout and f" {EXPORTS[name]}\n" in r.stdout, name
        else:
            assert "INTERP" not in r.stdout, f"{name} is dynamically linked"
        checked += 1
    assert checked == 5


def test_pre_check_under_qemu_bitwise_equals_numpy(cross_build, tmp_path):
    """Every frame of the x86 preprocessing test (1x1 .. 1080x1920, 5000x40, random targets, padded rows) through
    the aarch64 pre_check: PASS with the right float count and == numpy bitwise; the misuse checks pass too."""
    lines, expected = [], {}
    cases = pre.frames()
    for name, image, th, tw in cases:
        h, w = image.shape[:2]
        packed = image.strides[1:] == (3, 1) and image.strides[0] >= 3 * w
        stride = image.strides[0] if packed else 3 * w
        raw = np.zeros((h, stride), np.uint8)
        raw[:, : 3 * w] = image.reshape(h, 3 * w)
        (tmp_path / f"{name}.rgb").write_bytes(raw.reshape(-1)[: (h - 1) * stride + 3 * w].tobytes())
        spec = pre.spec_for(th, tw)
        oh, ow = spec.output_size()
        lines.append(
            f"{name} {tmp_path / f'{name}.rgb'} {h} {w} {stride} {oh} {ow} {tmp_path / f'{name}.f32'}"
        )
        expected[name] = preprocess_image(image, spec, backend="numpy")[0]
    (tmp_path / "cases.txt").write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    r = _qemu(cross_build / "pre_check", tmp_path / "cases.txt")
    seconds = time.monotonic() - start
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert not [ln for ln in rows if ln[0] == "FAIL"], r.stdout[-3000:]
    passed = {ln[2]: int(ln[3]) for ln in rows if ln[1] == "pre"}
    compared = values = 0
    for name, ref in expected.items():
        got = np.fromfile(tmp_path / f"{name}.f32", "<f4").reshape(ref.shape)
        assert passed[name] == ref.size and np.array_equal(pre.bits(got), pre.bits(ref)), name
        compared += 1
        values += ref.size
    api = int(next(ln[3] for ln in rows if ln[1] == "misuse"))
    assert compared == len(cases) == len(passed) >= pre.MIN_FRAMES and api >= 40
    assert [int(ln[2]) for ln in rows if ln[1] == "total"] == [len(cases) + api]
    print(f"aarch64 pre_check (qemu, {seconds:.1f} s): {compared} frames, {values} floats bitwise == numpy")


@pytest.fixture(scope="module")
def corpus(testdata_codec, tmp_path_factory):
    """test_native_build's corpus (same seed) for kernels/testdata/native: (dir, case -> count)."""
    directory = tmp_path_factory.mktemp("cross_corpus")
    return directory, native.write_corpus(testdata_codec, directory, np.random.default_rng(42))[1]


def test_check_corpus_under_qemu(cross_build, corpus, testdata_codec):
    """The corpus of test_native_build (4,500 selections, decodes under every program, every broken native dir)
    replayed by the aarch64 check_corpus: every case PASSes with its count, the API misuse checks pass."""
    directory, counts = corpus
    start = time.monotonic()
    r = _qemu(cross_build / "check_corpus", directory, testdata_codec.native_dir)
    seconds = time.monotonic() - start
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    total = native.check_driver_output(r.stdout, counts)
    assert len(counts) > 10 and total > sum(counts.values())
    print(f"aarch64 check_corpus (qemu, {seconds:.1f} s): PASS total {total} over {len(counts)} cases")


def test_decode_f64_under_qemu_bitwise_equals_host(cross_build, corpus, testdata_codec, clib, tmp_path):
    """Every decode case of the corpus (5,200 sequences x each program): the aarch64 nora_fast_decode_f64 (qemu,
    decode_dump) == the host build's, bit for bit, NaN rows included; the ok rows are counted."""
    directory, _ = corpus
    fn = clib.lib.nora_fast_decode_f64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, I32, ctypes.c_int64, I32, ctypes.c_int,
                   ctypes.POINTER(ctypes.c_double), I32, I32, I32]  # fmt: skip
    rc, ctx = clib.open(testdata_codec.native_dir)
    assert rc == 0, clib.error()
    total = testdata_codec.total
    cases = [
        ln.split() for ln in (directory / "manifest.txt").read_text().splitlines() if ln.startswith("decode")
    ]
    values = finite = 0
    try:
        for _, name, b, stride, program in cases:
            b, stride = int(b), int(stride)
            out = tmp_path / f"{name}.f64"
            r = _qemu(cross_build / "decode_dump", testdata_codec.native_dir, directory / f"{name}.ids.i32",
                      directory / f"{name}.lengths.i32", b, stride, program, out)  # fmt: skip
            assert r.returncode == 0, r.stderr[-2000:]
            got = np.fromfile(out, "<f8").reshape(b, total)
            ids = np.fromfile(directory / f"{name}.ids.i32", "<i4").reshape(b, stride)
            lengths = np.fromfile(directory / f"{name}.lengths.i32", "<i4")
            want = np.full((b, total), -5.0)
            coeffs, status, pos = (
                np.zeros(b * total, np.int32),
                np.zeros(b, np.int32),
                np.zeros(b, np.int32),
            )
            assert fn(ctx, b, ptr(ids, I32), stride, ptr(lengths, I32), int(program),
                      want.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), ptr(coeffs, I32), ptr(status, I32),
                      ptr(pos, I32)) in (0, ROWS_FAILED), clib.error()  # fmt: skip
            assert np.array_equal(got.view(np.uint64), want.view(np.uint64)), name
            assert r.stdout.split() == ["decoded", str(b), str(b * total), str(int((status == 0).sum()))]
            values += got.size
            finite += int(np.isfinite(got).sum())
    finally:
        clib.lib.nora_fast_ctx_free(ctx)
    assert len(cases) == len(testdata_codec.tables.programs) + 1 >= 2 and finite > 10_000
    print(
        f"aarch64 decode_f64 (qemu): {len(cases)} cases, {values} float64 actions ({finite} finite) == host"
    )
