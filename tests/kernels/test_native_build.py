"""The library's builds: the firmware-style example, the corpus driver under ASan + UBSan, the CUDA kernels on the
CPU shim, and the nvcc build.

Data flow:
  random logits --reference_select step by step--> ids --reference decode + Chain.apply--> expected (T, D);
  the same logits as a .f32 file --build/decode_example--> printed ids, status, actions == expected.
  corpus.py cases (select, decode, broken dirs) --CorpusWriter--> corpus dir --make asan / make check
  (kernels/tools/check_corpus.c)--> "PASS <check> <name> <n>" lines, counted.
  corpus inputs --libnora_fast_shim.so (fast_cuda.cu compiled for the CPU) *_cuda--> == libnora_fast.so.
  make cuda (nvcc) --> cuda_archs.txt lists sm_87, sm_90 and PTX.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest

from .conftest import KERNELS, CLib, make
from .corpus import (
    SEL_OK,
    CorpusWriter,
    apply_ops,
    fuzz_sequences,
    random_walks,
    reference_decode,
    reference_select,
)
from .test_native_tables import BROKEN, broken_native

CUDA_BUILD_SECONDS = 60  # above this the nvcc test would be marked slow (measured: see test_nvcc_build)


def greedy_chunk(codec, rng, temperature_rows: int = 0):
    """Logit rows (steps, n_rows) and the ids the reference selects from them, step by step from the start."""
    n_rows = codec.tables.head_ids.size
    done, pending = np.zeros(1, np.int32), np.zeros(1, np.int32)
    rows, ids = [], []
    while not (done[0] == codec.total and pending[0] == 0):
        logits = np.round(rng.standard_normal((1, n_rows), dtype=np.float32), 2)
        r = reference_select(codec, logits, None, 1.0, done, pending, top=False)
        assert r["status"][0] == SEL_OK
        rows.append(logits[0])
        ids.append(int(r["id"][0]))
        done, pending = r["done"].astype(np.int32), r["pending"].astype(np.int32)
    return np.stack(rows), ids


def run_example(build, native, path, *key):
    return subprocess.run([str(build / "decode_example"), str(native), str(path), *key], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_decode_example_matches_reference(kernel_build, codecs, tmp_path):
    """decode_example on logits files for a q01/q99 codec (both keys, one percent-encoded) and a min_max codec
    (no key): printed ids, status and actions equal the numpy reference; a short file and a missing key fail."""
    rng = np.random.default_rng(41)
    compared = 0
    for name, keys in (("h5_5x7", ["robot_a", "b%20 é/x"]), ("main_5x7", [None])):
        codec = codecs[name]
        t, d = codec.auto.time_horizon, codec.auto.action_dim
        for key in keys:
            logits, ids = greedy_chunk(codec, rng)
            (tmp_path / "l.f32").write_bytes(logits.astype("<f4").tobytes())
            r = run_example(kernel_build, codec.native_dir, tmp_path / "l.f32", *([key] if key else []))
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            assert lines[0] == f"ids {len(ids)}: " + " ".join(map(str, ids))
            assert lines[1] == "status ok"
            got = np.array([[float(x) for x in ln.split()[1:]] for ln in lines[2:]])
            _, _, _, want = reference_decode(codec, [ids], key if key else "")
            assert got.shape == (t, d) and [int(ln.split()[0]) for ln in lines[2:]] == list(range(t))
            np.testing.assert_allclose(got.reshape(-1), want[0], rtol=1e-6, atol=1e-6)
            compared += got.size
            short = tmp_path / "short.f32"
            short.write_bytes(logits[:-1].astype("<f4").tobytes())
            r = run_example(kernel_build, codec.native_dir, short, *([key] if key else []))
            assert r.returncode != 0 and "ran out after" in r.stderr and not r.stdout
    r = run_example(kernel_build, codecs["h5_5x7"].native_dir, tmp_path / "l.f32")
    assert r.returncode != 0 and "nora_fast_program failed (error 5)" in r.stderr and "unnorm key" in r.stderr
    assert compared == 2 * 5 * 7 + 5 * 7


def write_corpus(codec, directory, rng) -> tuple[CorpusWriter, dict[str, int]]:
    """Select, decode and broken-dir cases for ``codec`` (testdata: programs applied op by op); case -> count."""
    w, counts = CorpusWriter(directory), {}
    n_rows, q, total = codec.tables.head_ids.size, codec.auto.dfa_states, codec.total
    for i, (penalty, with_seen, top) in enumerate(
        ((1.3, True, True), (1.0, False, True), (0.7, True, False))
    ):
        b = 1500
        logits = np.round(rng.standard_normal((b, n_rows), dtype=np.float32) * 2, i)
        logits[::7, rng.integers(0, n_rows)] = np.nan
        logits[3::11] = -np.inf
        seen = rng.random((b, n_rows)) < 0.1 if with_seen else None
        done = rng.integers(-1, total + 2, b).astype(np.int32)
        pending = rng.integers(-1, q + 1, b).astype(np.int32)
        ref = reference_select(codec, logits, seen, penalty, done, pending, top=top)
        w.select(f"select{i}", logits, seen, penalty, done, pending, ref, top)
        counts[f"select{i}"] = b
    walks = random_walks(codec, 200, rng)
    seqs = walks + fuzz_sequences(codec, walks, 5000, rng)
    status, pos, coeffs, norm = reference_decode(codec, seqs, None)
    t, d = codec.auto.time_horizon, codec.auto.action_dim
    for p in range(-1, len(codec.tables.programs)):
        acts = (
            norm
            if p < 0
            else apply_ops(codec.tables.programs[p][1], norm.reshape(-1, t, d)).reshape(norm.shape)
        )
        w.decode(f"decode{p + 1}", seqs, p, (status, pos, coeffs, acts))
        counts[f"decode{p + 1}"] = len(seqs)
    for name in BROKEN:
        broken_native(codec.native_dir, w.open_case(name, BROKEN[name][0]), name)
        counts[name] = 1
    w.finish()
    return w, counts


def check_driver_output(stdout: str, counts: dict[str, int]) -> int:
    """Every case PASSed with its count, the API checks passed, and the total adds up; returns the total."""
    lines = [ln.split() for ln in stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    fails = [ln for ln in lines if ln[0] == "FAIL"]
    assert not fails, stdout[-3000:]
    got = {ln[2]: int(ln[3]) for ln in lines if ln[1] != "total"}
    api = got.pop("misuse")
    assert got == counts and api > 20
    total = [int(ln[2]) for ln in lines if ln[1] == "total"]
    assert total == [sum(counts.values()) + api]
    return total[0]


@pytest.fixture(scope="module")
def corpus_dir(testdata_codec, tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    _, counts = write_corpus(testdata_codec, directory, np.random.default_rng(42))
    return directory, counts


@pytest.fixture(scope="module")
def asan_build(tmp_path_factory):
    """BUILD dir of the sanitizer builds (shared, so the library is compiled once)."""
    return tmp_path_factory.mktemp("asan_build")


def test_corpus_clean_under_asan_ubsan(corpus_dir, testdata_codec, asan_build):
    """make asan: the library + check_corpus.c with -fsanitize=address,undefined (no recovery, leak check) replay
    4,500 selections, 3 x 5,200 decodes, every broken native dir and the API misuse calls: all PASS, no report."""
    directory, counts = corpus_dir
    r = make("asan", asan_build, f"CORPUS={directory}", f"NATIVE={testdata_codec.native_dir}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "-fsanitize=address,undefined -fno-sanitize-recover=all" in r.stdout  # the build really sanitizes
    assert "ERROR: AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr
    total = check_driver_output(r.stdout, counts)
    print(f"asan: PASS total {total}")


def test_huge_min_token_is_refused_or_clean_under_ubsan(testdata_codec, asan_build, tmp_path):
    """A native.txt whose min_token makes coefficients overflow int32: the library must refuse it at open or
    decode without undefined behaviour (UBSan aborts on a signed overflow)."""
    broken_native(testdata_codec.native_dir, tmp_path / "native", "min_token_huge")
    w = CorpusWriter(tmp_path / "corpus")
    seqs = random_walks(testdata_codec, 20, np.random.default_rng(44))
    w.decode("walks", seqs, -1, reference_decode(testdata_codec, seqs, None))
    w.finish()
    r = make("asan", asan_build, f"CORPUS={tmp_path / 'corpus'}", f"NATIVE={tmp_path / 'native'}")
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 0 or "FAIL open" in r.stdout


def test_corpus_check_without_sanitizers(corpus_dir, testdata_codec, kernel_build):
    """make check: the same driver, optimised build, same results; a corrupted expectation is caught."""
    directory, counts = corpus_dir
    r = make("check", kernel_build, f"CORPUS={directory}", f"NATIVE={testdata_codec.native_dir}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    check_driver_output(r.stdout, counts)
    bad = directory.parent / "corpus_bad"
    shutil.copytree(directory, bad)
    x = np.fromfile(bad / "decode0.x_status.i32", "<i4")
    x[0] = (x[0] + 1) % 5
    x.tofile(bad / "decode0.x_status.i32")
    r = make("check", kernel_build, f"CORPUS={bad}", f"NATIVE={testdata_codec.native_dir}")
    assert r.returncode != 0 and "FAIL decode decode0" in r.stdout and "FAIL total 1" in r.stdout


@pytest.fixture(scope="module")
def shim_lib(tmp_path_factory) -> CLib:
    if not (KERNELS / "src" / "fast_cuda.cu").is_file() or not (KERNELS / "mk" / "cuda.mk").is_file():
        pytest.skip("kernels/src/fast_cuda.cu or kernels/mk/cuda.mk not present yet")
    build = tmp_path_factory.mktemp("shim_build")
    r = make("shim", build)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return CLib(build / "libnora_fast_shim.so")


def test_cuda_kernels_on_cpu_shim_equal_cpu(shim_lib, clib, open_ctx, testdata_codec, codecs):
    """nora_fast_select_cuda / nora_fast_decode_cuda of the shim build (host pointers) == the CPU library's
    nora_fast_select / nora_fast_decode, on two codecs (2-byte Q 18, 3-byte Q 45)."""
    compared = 0
    for codec in (testdata_codec, codecs["wide_5x3"]):
        rc, sctx = shim_lib.open(codec.native_dir)
        assert rc == 0 and shim_lib.lib.nora_fast_ctx_cuda_upload(sctx) == 0, shim_lib.error()
        cctx = open_ctx(codec.native_dir)
        rng = np.random.default_rng(43)
        n_rows, q, total = codec.tables.head_ids.size, codec.auto.dfa_states, codec.total
        for penalty, top in ((1.3, True), (1.0, False)):
            logits = np.round(rng.standard_normal((2000, n_rows), dtype=np.float32), 1)
            logits[::9, rng.integers(0, n_rows)] = np.nan
            seen = rng.random((2000, n_rows)) < 0.1
            done = rng.integers(-1, total + 2, 2000).astype(np.int32)
            pending = rng.integers(-1, q + 1, 2000).astype(np.int32)
            g = shim_lib.select(sctx, logits, seen, penalty, done, pending, top=top, cuda=True)
            c = clib.select(cctx, logits, seen, penalty, done, pending, top=top)
            for k in ("status", "id", "done", "pending", "seen") + (("top",) if top else ()):
                np.testing.assert_array_equal(g[k], c[k])
            assert g["rc"] == 0  # the CUDA calls report launch errors only
            compared += 2000
        walks = random_walks(codec, 100, rng)
        seqs = walks + fuzz_sequences(codec, walks, 3000, rng)
        for program in range(-1, len(codec.tables.programs)):
            g = shim_lib.decode(sctx, seqs, program, cuda=True, total=total)
            c = clib.decode(cctx, seqs, program, total=total)
            for k in ("status", "pos", "coeffs", "actions"):
                np.testing.assert_array_equal(g[k], c[k])
            compared += len(seqs)
        shim_lib.lib.nora_fast_ctx_free(sctx)
    assert compared == 2 * 4000 + 3100 * (3 + 3)


def test_nvcc_build(tmp_path):
    """make cuda: nvcc builds libnora_fast_cuda.so with sm_87 and sm_90 cubins and PTX (skipped without nvcc)."""
    if shutil.which("nvcc") is None and not os.path.exists(
        "/usr/local/cuda/bin/nvcc"
    ):  # the Makefile's search
        pytest.skip("nvcc not found (PATH or /usr/local/cuda/bin): the CUDA build cannot be checked here")
    if not (KERNELS / "src" / "fast_cuda.cu").is_file():
        pytest.skip("kernels/src/fast_cuda.cu not present yet")
    start = time.monotonic()
    r = make("cuda", tmp_path, "-j2")
    seconds = time.monotonic() - start
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    archs = (tmp_path / "cuda_archs.txt").read_text()
    assert re.search(r"ELF file.*sm_87", archs) and re.search(r"ELF file.*sm_90", archs), archs
    assert re.search(r"PTX file.*(sm|compute)_90", archs), archs
    assert (tmp_path / "libnora_fast_cuda.so").is_file()
    print(f"nvcc build: {seconds:.1f} s (slow marker threshold {CUDA_BUILD_SECONDS} s)")
