"""libnora_edge's onnxruntime layer (kernels/src/ort/): the C API loaded at run time runs a fused bundle's decoder
with its KV buffers written in place, with logits identical to the Python runtime's.

Reference: ``NoraPolicy``'s decoder (nora_edge/static_kv.py, onnxruntime's Python binding over the same
libonnxruntime) on the same chunks: a text prefix, an image-like chunk with distinct t/h/w mrope positions, a text
suffix and single-token decode steps, all continuing one cache.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
CHUNKS = (10, 16, 5, 1, 1, 1, 1, 1, 1)


def _ort_library() -> Path:
    capi = Path(onnxruntime.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*"))
    assert libs, f"no libonnxruntime.so in {capi}"
    return libs[-1]


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> dict[str, Path]:
    """ort_step built plain and under ASan/UBSan in a temp BUILD dir (the headers fetched by the Makefile)."""
    build = tmp_path_factory.mktemp("ort-build")
    run = subprocess.run(
        ["make", "-C", str(KERNELS), f"BUILD={build}", "ort-step", "asan-ort-step"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return {"plain": build / "ort" / "ort_step", "asan": build / "ort" / "ort_step_asan"}


@pytest.fixture(scope="module")
def fused(fused_trained_bundle: Path) -> Path:
    return fused_trained_bundle


def _chunks(hidden: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    out, pos = [], 0
    for k, s in enumerate(CHUNKS):
        emb = (rng.standard_normal((1, s, hidden)) * 0.5).astype(np.float32)
        if k == 1:  # an 4x4 "image": t fixed, h and w running over the grid
            t = np.full(s, pos)
            p = np.stack([t, pos + np.repeat(np.arange(4), 4), pos + np.tile(np.arange(4), 4)])
            pos += 4
        else:
            p = np.broadcast_to(np.arange(pos, pos + s), (3, s))
            pos += s
        out.append((emb, np.ascontiguousarray(p, dtype=np.int64).reshape(3, 1, s)))
    return out


def _write_case(path: Path, dec, chunks) -> None:
    head = [dec.num_layers, dec.num_kv_heads, dec.head_dim, dec.hidden_size, dec.max_len, dec.head_rows.size]
    with path.open("wb") as f:
        f.write(np.asarray([*head, len(chunks), 1], dtype="<i8").tobytes())
        for emb, pos in chunks:
            f.write(np.asarray([emb.shape[1]], dtype="<i8").tobytes())
            f.write(emb.astype("<f4").tobytes() + pos.astype("<i8").tobytes())


def _run(exe: Path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, check=False, env=env)


def test_decoder_logits_equal_the_python_runtime(driver, fused, tmp_path):
    from nora_edge.policy import NoraPolicy

    policy = NoraPolicy.load(fused, providers="cpu", threads=1)
    dec = policy.decoder
    chunks = _chunks(dec.hidden_size, np.random.default_rng(0))
    case, out = tmp_path / "case.bin", tmp_path / "out.bin"
    _write_case(case, dec, chunks)
    run = _run(driver["plain"], _ort_library(), fused / "decoder.onnx", case, out)
    assert run.returncode == 0, run.stderr
    got = np.fromfile(out, dtype="<f4").reshape(len(chunks), dec.head_rows.size)
    cache, compared = dec.empty_cache(), 0
    for k, (emb, pos) in enumerate(chunks):
        want, cache = dec.forward(emb, pos, cache)
        np.testing.assert_array_equal(got[k], want, err_msg=f"chunk {k} (S={emb.shape[1]})")
        compared += 1
    assert compared == len(CHUNKS) and cache.length == sum(CHUNKS)
    assert f"onnxruntime {onnxruntime.__version__}" in run.stderr


def test_errors_name_the_problem_and_asan_is_clean(driver, fused, tmp_path):
    from nora_edge.policy import NoraPolicy

    dec = NoraPolicy.load(fused, providers="cpu", threads=1).decoder
    case, out = tmp_path / "case.bin", tmp_path / "out.bin"
    _write_case(case, dec, _chunks(dec.hidden_size, np.random.default_rng(1))[:4])
    missing = _run(driver["plain"], tmp_path / "libonnxruntime.so.0", fused / "decoder.onnx", case, out)
    assert missing.returncode == 1 and "cannot load onnxruntime" in missing.stderr
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    graph = _run(driver["plain"], _ort_library(), bad, case, out)
    assert graph.returncode == 1 and "CreateSession" in graph.stderr
    short = tmp_path / "short.bin"
    short.write_bytes(case.read_bytes()[:100])
    assert _run(driver["plain"], _ort_library(), fused / "decoder.onnx", short, out).returncode == 2
    # onnxruntime itself is not instrumented; leaks inside it at exit are its own (LSan reports them as such)
    env = {
        **os.environ,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
        "UBSAN_OPTIONS": "halt_on_error=1",
    }
    asan = _run(driver["asan"], _ort_library(), fused / "decoder.onnx", case, out, env=env)
    assert asan.returncode == 0, asan.stderr[-3000:]
    assert np.fromfile(out, dtype="<f4").size == 4 * dec.head_rows.size
