"""Every resize path of libnora_edge (kernels/src/edge/resample.c, resample_avx2.c) against numpy and Pillow + HF.

Data flow:
  ``make -C kernels edge BUILD=<tmp>/<variant> EDGE_DEFS=...`` (default, -DNORA_EDGE_NO_AVX2, -DNORA_EDGE_NO_SIMD)
  --> libnora_edge_pre.so, loaded in a fresh interpreter per (build, NORA_EDGE_SIMD) pair (the variable is read
  once per process) --> preprocess_image(backend="c") on test_edge_preprocess.frames() (the 55-frame list) -->
  per frame the SHA-256 of the float32 bit patterns + the path the library reports
  (nora_edge_priv_resample_path). The parent computes the same digests for the numpy path and for Pillow + HF's
  Qwen2VLImageProcessorPil (the independent reference) and asserts all equal, frames counted per path.
  The ASan/UBSan driver of test_edge_preprocess runs once more with NORA_EDGE_SIMD=sse2 (the default build now
  picks AVX2 where the CPU has it, so the SSE2 loops keep their sanitizer coverage).
  The default build under ``qemu-x86_64 -cpu Nehalem`` (an SSE2-only CPU): the path probe says "sse2" and
  tools/pre_check.c's float32 output == the numpy path bitwise (run-time dispatch, no AVX2 instruction executed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nora_edge import edge_lib
from nora_edge.preprocess import preprocess_image

from .conftest import make
from .test_edge_preprocess import MIN_FRAMES, bits, frames, hf_reference, spec_for
from .test_edge_preprocess import test_driver_under_asan_ubsan as asan_driver

REPO = Path(__file__).resolve().parents[2]
HAS_AVX2 = "avx2" in Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else False
IS_X86 = os.uname().machine in ("x86_64", "i686", "i386")

# runs in a child interpreter (cwd = repo root): C digests of every frame + the path the library ran
CHILD = """
import ctypes, hashlib, json
import numpy as np
from nora_edge import edge_lib
from nora_edge.preprocess import preprocess_image
from tests.kernels.test_edge_preprocess import bits, frames, spec_for
out = {}
for name, image, th, tw in frames():
    got = preprocess_image(image, spec_for(th, tw), backend="c")[0]
    out[name] = hashlib.sha256(bits(got).tobytes()).hexdigest()
lib = ctypes.CDLL(str(edge_lib.library_path()))
lib.nora_edge_priv_resample_path.restype = ctypes.c_char_p
print(json.dumps({"path": lib.nora_edge_priv_resample_path().decode(), "lib": str(edge_lib.library_path()),
                  "digests": out}))
"""


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(bits(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def references() -> dict[str, str]:
    """name -> SHA-256 of the reference float32 bits; numpy == Pillow + HF checked bitwise on every frame."""
    refs = {}
    for name, image, th, tw in frames():
        spec = spec_for(th, tw)
        ref_np = preprocess_image(image, spec, backend="numpy")[0]
        oh, ow = spec.output_size()
        ref_hf = hf_reference(np.ascontiguousarray(image), oh, ow)
        assert np.array_equal(bits(ref_np), bits(ref_hf)), name
        refs[name] = digest(ref_np)
    assert len(refs) >= MIN_FRAMES
    return refs


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """variant -> libnora_edge_pre.so: default flags, -DNORA_EDGE_NO_AVX2, -DNORA_EDGE_NO_SIMD."""
    root = tmp_path_factory.mktemp("resample_paths")
    out = {}
    for variant, defs in (
        ("default", ""),
        ("no-avx2", "-DNORA_EDGE_NO_AVX2"),
        ("no-simd", "-DNORA_EDGE_NO_SIMD"),
    ):
        r = make("edge", root / variant, f"EDGE_DEFS={defs}")
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        out[variant] = root / variant / "libnora_edge_pre.so"
    return out


def run_child(lib: Path, simd: str | None) -> dict:
    """The CHILD script with NORA_EDGE_EDGE_LIB=lib and NORA_EDGE_SIMD=simd (unset when None)."""
    env = {k: v for k, v in os.environ.items() if k != "NORA_EDGE_SIMD"}
    env[edge_lib.ENV_LIB] = str(lib)
    if simd is not None:
        env["NORA_EDGE_SIMD"] = simd
    r = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["lib"] == str(lib)
    return result


def best_path() -> str:
    return "avx2" if IS_X86 and HAS_AVX2 else "sse2" if IS_X86 else "none"


# (build variant, NORA_EDGE_SIMD, the path that must run on this CPU)
CASES = [
    ("default", None, best_path()),
    ("default", "avx2", best_path()),
    ("default", "sse2", "sse2" if IS_X86 else "none"),
    ("default", "none", "none"),
    ("default", "bogus", best_path()),  # an unknown value is ignored
    ("no-avx2", None, "sse2" if IS_X86 else "none"),
    ("no-avx2", "avx2", "sse2" if IS_X86 else "none"),  # asked for but not built: the next best
    ("no-simd", None, "none"),
]


@pytest.mark.parametrize(("variant", "simd", "expect"), CASES, ids=[f"{v}-{s}" for v, s, _ in CASES])
def test_path_bitwise(builds, references, variant, simd, expect):
    """Each path (as selected by the build flags and NORA_EDGE_SIMD) == numpy == Pillow + HF, bit for bit, on
    every frame of test_edge_preprocess's list; the library reports the path that was expected to run."""
    result = run_child(builds[variant], simd)
    assert result["path"] == expect, result["path"]
    compared = 0
    for name, ref in references.items():
        assert result["digests"][name] == ref, (variant, simd, name)
        compared += 1
    assert compared == len(result["digests"]) == len(references) >= MIN_FRAMES
    print(f"resample path {expect} ({variant}, NORA_EDGE_SIMD={simd}): {compared} frames bitwise equal")


def test_every_path_covered():
    """On an AVX2 x86-64 CPU the cases above run all three paths (elsewhere the missing ones are skipped)."""
    covered = {expect for _, _, expect in CASES}
    if not (IS_X86 and HAS_AVX2):
        pytest.skip(f"CPU without AVX2 (machine {os.uname().machine}): paths covered {sorted(covered)}")
    assert covered == {"avx2", "sse2", "none"}


def test_sse2_under_asan_ubsan(tmp_path, monkeypatch):
    """test_edge_preprocess's ASan + UBSan driver on exact-size frames with the SSE2 loops forced (its own run
    covers the default path: AVX2 on an AVX2 CPU)."""
    if not IS_X86:
        pytest.skip("SSE2 exists on x86 only")
    monkeypatch.setenv("NORA_EDGE_SIMD", "sse2")
    asan_driver(tmp_path, "")


PROBE_C = (
    "#include <stdio.h>\n"
    "const char *nora_edge_priv_resample_path(void);\n"
    "int main(void) { puts(nora_edge_priv_resample_path()); return 0; }\n"
)


@pytest.mark.skipif(not IS_X86 or shutil.which("qemu-x86_64") is None, reason="needs x86-64 and qemu-x86_64")
def test_sse2_only_cpu_under_qemu(builds, tmp_path):
    """The default build on an emulated SSE2-only CPU (qemu-x86_64 -cpu Nehalem: no AVX/AVX2): the library picks
    "sse2" even when NORA_EDGE_SIMD=avx2 asks for more, and tools/pre_check.c's frames equal the numpy path
    bitwise (an AVX2 instruction there would be SIGILL)."""
    build = builds["default"].parent
    r = make(str(build / "edge" / "pre_check"), build)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    (tmp_path / "probe.c").write_text(PROBE_C)
    probe = tmp_path / "probe"
    cc = subprocess.run(["cc", "-O2", str(tmp_path / "probe.c"), str(build / "libnora_edge_pre.a"), "-lm", "-o",
                         str(probe)], capture_output=True, text=True)  # fmt: skip
    assert cc.returncode == 0, cc.stderr
    qemu = ["qemu-x86_64", "-cpu", "Nehalem"]
    for simd, expect in ((None, "sse2"), ("avx2", "sse2"), ("none", "none")):
        env = {k: v for k, v in os.environ.items() if k != "NORA_EDGE_SIMD"} | (
            {"NORA_EDGE_SIMD": simd} if simd else {}
        )
        p = subprocess.run([*qemu, str(probe)], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.strip() == expect, (simd, p.stdout, p.stderr)
    rng = np.random.default_rng(11)
    lines, expected = [], {}
    for i, (h, w, th, tw) in enumerate(
        [(480, 640, 224, 224), (300, 17, 224, 224), (40, 900, 84, 252), (7, 5, 56, 28)]
    ):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image.tofile(tmp_path / f"q{i}.rgb")
        spec = spec_for(th, tw)
        oh, ow = spec.output_size()
        lines.append(f"q{i} {tmp_path / f'q{i}.rgb'} {h} {w} {3 * w} {oh} {ow} {tmp_path / f'q{i}.f32'}")
        expected[f"q{i}"] = preprocess_image(image, spec, backend="numpy")[0]
    (tmp_path / "cases.txt").write_text("\n".join(lines) + "\n")
    p = subprocess.run([*qemu, str(build / "edge" / "pre_check"), str(tmp_path / "cases.txt"), "--frames-only"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0 and "FAIL" not in p.stdout, (p.stdout + p.stderr)[-3000:]
    compared = 0
    for name, ref in expected.items():
        got = np.fromfile(tmp_path / f"{name}.f32", "<f4").reshape(ref.shape)
        assert np.array_equal(bits(got), bits(ref)), name
        compared += 1
    assert compared == len(lines) == 4
