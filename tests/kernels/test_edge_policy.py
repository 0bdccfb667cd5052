"""libnora_edge's policy object (kernels/src/edge/policy*.cpp) against the Python runtime it ports.

Data flow: ``make -C kernels runtime`` (in the session's C++ build dir) --> libnora_edge.so --ctypes
(nora_edge.edge_policy)--> nora_policy_create / step / select_action on a fused bundle, next to
``NoraPolicy.load(bundle, threads=1)`` on the same frames and instructions: generated ids exact, token classes
equal, actions (float64) within 1e-9, the queue equal; bad input gives the Python runtime's error class and leaves
the policy usable. Medium bundles (fp32, int8, int4) are the slow variant.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nora_edge.edge_policy import EdgePolicy, load_library
from nora_edge.errors import BundleError, ForcedTokenError, InputError
from nora_edge.policy import NoraPolicy
from tests.synthetic_pairs import held_out_pairs

from .conftest import KERNELS

N_PAIRS = 50
N_QUANT_PAIRS = 16
ACTION_TOL = 1e-9


@pytest.fixture(scope="module")
def quantized(fused_trained_bundle: Path, tmp_path_factory) -> dict[str, Path]:
    """int8 and int4 copies of the trained fused bundle (quantize_bundle, gated by the recipes' fidelity)."""
    from nora_edge.export.quantize.bundle_quant import quantize_bundle

    root = tmp_path_factory.mktemp("edgeq")
    return {r: quantize_bundle(fused_trained_bundle, root / r, r) for r in ("int8", "int4")}


def compare(edge: EdgePolicy, py: NoraPolicy, pairs) -> dict[str, int]:
    """Run both on every pair; assert ids / classes / actions; count what was compared."""
    n = {"pairs": 0, "ids": 0, "actions": 0, "flagged": 0}
    for image, text in pairs:
        c = edge.step(image, text)
        o = py.run_chunk(image, text)
        assert c.ids.tolist() == o.ids.tolist(), text
        assert c.token_classes == tuple(o.token_classes), text
        assert c.actions.dtype == np.float64 and c.actions.shape == o.actions.shape
        np.testing.assert_allclose(c.actions, o.actions, rtol=0, atol=ACTION_TOL)
        n["pairs"] += 1
        n["ids"] += c.ids.size
        n["actions"] += c.actions.size
        n["flagged"] += int(c.flagged)
    return n


def test_fp32_chunks_equal_the_python_runtime_on_50_held_out_pairs(edge_runtime, fused_trained_bundle):
    edge = EdgePolicy.load(fused_trained_bundle, library=edge_runtime, threads=1, forced_tokens="flag")
    py = NoraPolicy.load(fused_trained_bundle, threads=1, forced_tokens="flag")
    assert edge.prefix_tokens == py.prompt.prefix_ids.size
    n = compare(edge, py, held_out_pairs(N_PAIRS, seed=31))
    assert n["pairs"] == N_PAIRS and n["actions"] == N_PAIRS * py.time_horizon * py.action_dim
    assert n["ids"] >= N_PAIRS


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_quantized_chunks_equal_the_python_runtime(edge_runtime, quantized, recipe):
    b = quantized[recipe]
    edge = EdgePolicy.load(b, library=edge_runtime, threads=1, forced_tokens="flag")
    py = NoraPolicy.load(b, threads=1, forced_tokens="flag")
    n = compare(edge, py, held_out_pairs(N_QUANT_PAIRS, seed=37))
    assert n["pairs"] == N_QUANT_PAIRS


def test_select_action_queue_equals_the_python_runtime(edge_runtime, fused_trained_bundle):
    edge = EdgePolicy.load(fused_trained_bundle, library=edge_runtime, threads=1, forced_tokens="flag")
    py = NoraPolicy.load(fused_trained_bundle, threads=1, forced_tokens="flag")
    pairs = held_out_pairs(4, seed=41)
    T = py.time_horizon
    compared = 0
    # two chunks on one instruction, an instruction change mid-chunk (drops the queue), then a reset
    schedule = [(pairs[0][0], pairs[0][1])] * (T + 2) + [(pairs[1][0], pairs[2][1])] * 2
    for i, (image, text) in enumerate(schedule):
        if i == len(schedule) - 1:
            edge.reset(), py.reset()
        np.testing.assert_allclose(
            edge.select_action(image, text), py.select_action(image, text), atol=ACTION_TOL
        )
        compared += 1
    assert compared == T + 4


@pytest.fixture(scope="module")
def fused_untrained(tiny_ckpt_h5: Path, tmp_path_factory) -> Path:
    """The untrained tiny checkpoint exported fused: its chunks need repaired tokens (the trained one's do not)."""
    from nora_edge.export.pipeline import export_bundle

    out = tmp_path_factory.mktemp("edgeu") / "fused"
    return export_bundle(tiny_ckpt_h5, out, decoder_graph="fused", progress=False, validate=False)


def test_forced_tokens_refused_like_the_python_runtime(edge_runtime, fused_untrained):
    """Under "raise" a chunk with a repaired token is refused by both runtimes, on the same frames; under "flag"
    both hand it out with the same classes."""
    edge = EdgePolicy.load(fused_untrained, library=edge_runtime, threads=1)
    py = NoraPolicy.load(fused_untrained, threads=1)
    flag_edge = EdgePolicy.load(fused_untrained, library=edge_runtime, threads=1, forced_tokens="flag")
    flag_py = NoraPolicy.load(fused_untrained, threads=1, forced_tokens="flag")
    assert compare(flag_edge, flag_py, held_out_pairs(12, seed=43))["flagged"] >= 1
    refused = 0
    for image, text in held_out_pairs(12, seed=43):
        try:
            py.run_chunk(image, text)
            py_refused = False
        except ForcedTokenError:
            py_refused = True
        if py_refused:
            with pytest.raises(ForcedTokenError, match="chunk refused at step"):
                edge.step(image, text)
            refused += 1
        else:
            edge.step(image, text)
    assert refused >= 1, "no held-out pair needed a repaired token: the check compared nothing"


def test_bad_input_is_a_typed_error_and_the_policy_stays_usable(edge_runtime, fused_trained_bundle):
    edge = EdgePolicy.load(fused_trained_bundle, library=edge_runtime, threads=1, forced_tokens="flag")
    image, text = held_out_pairs(1, seed=47)[0]
    good = edge.step(image, text)
    lib, h = edge.lib, edge._h
    acts = np.zeros(64, np.float64)
    frame = np.ascontiguousarray(image)
    cases = {
        "empty instruction": lambda: edge.step(image, "   "),
        "unknown unnorm key": lambda: edge.step(image, text, "no_such_robot"),
        "zero-size frame": lambda: edge.step(np.zeros((0, 4, 3), np.uint8), text),
    }
    for name, call in cases.items():
        with pytest.raises(InputError):
            call()
        np.testing.assert_array_equal(edge.step(image, text).actions, good.actions, err_msg=name)
    raw = {  # the C ABI directly: NULL pointers and short buffers
        "NULL frame": (None, *frame.shape[:2], frame.strides[0], text.encode(), None, acts.ctypes.data, acts.size),
        "NULL instruction": (frame.ctypes.data, *frame.shape[:2], frame.strides[0], None, None, acts.ctypes.data, 35),
        "NULL actions": (frame.ctypes.data, *frame.shape[:2], frame.strides[0], text.encode(), None, None, 35),
        "short actions": (frame.ctypes.data, *frame.shape[:2], frame.strides[0], text.encode(), None,
                          acts.ctypes.data, 3),
        "short stride": (frame.ctypes.data, *frame.shape[:2], 5, text.encode(), None, acts.ctypes.data, 35),
    }  # fmt: skip
    for name, args in raw.items():
        rc = lib.nora_policy_step(h, *args, None, None, 0, None)
        assert rc == 1, (name, rc)  # NORA_EDGE_ERR_INPUT
        assert lib.nora_edge_last_error().decode(), name
        assert not acts.any(), f"{name}: actions written on failure"
    assert lib.nora_policy_step(None, *raw["NULL frame"], None, None, 0, None) == 1
    np.testing.assert_array_equal(edge.step(image, text).actions, good.actions)
    assert len(raw) + len(cases) == 8


def test_missing_or_corrupt_bundle_files_are_bundle_errors(edge_runtime, fused_trained_bundle, tmp_path):
    with pytest.raises(BundleError):
        EdgePolicy.load(tmp_path / "nothing", library=edge_runtime)
    bad = tmp_path / "b"
    shutil.copytree(fused_trained_bundle, bad)
    (bad / "tokenizer.json").write_bytes(b"{}")  # size changes: caught without hashing
    with pytest.raises(BundleError, match="tokenizer.json"):
        EdgePolicy.load(bad, library=edge_runtime)
    shutil.rmtree(bad)
    shutil.copytree(fused_trained_bundle, bad)
    data = bytearray((bad / "embeddings.npy").read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 check sees it
    (bad / "embeddings.npy").write_bytes(bytes(data))
    EdgePolicy.load(bad, library=edge_runtime).close()
    with pytest.raises(BundleError, match="embeddings.npy"):
        EdgePolicy.load(bad, library=edge_runtime, verify=True)


def test_a_growing_kv_bundle_is_refused_as_unsupported(edge_runtime, tiny_bundle_h5):
    from nora_edge.edge_policy import EdgeRuntimeError

    with pytest.raises(EdgeRuntimeError, match="--decoder-graph fused") as e:
        EdgePolicy.load(tiny_bundle_h5, library=edge_runtime)
    assert e.value.status == "unsupported"


def _has(provider: str) -> bool:
    import onnxruntime as ort

    return provider in ort.get_available_providers()


@pytest.mark.skipif(
    _has("CUDAExecutionProvider"), reason="this onnxruntime has CUDA: the GPU test below applies"
)
@pytest.mark.parametrize(("provider", "missing"), [("cuda", "CUDAExecutionProvider"),
                                                   ("tensorrt", "CUDAExecutionProvider")])  # fmt: skip
def test_gpu_provider_on_a_cpu_onnxruntime_is_unsupported_naming_what_it_has(
    edge_runtime, fused_trained_bundle, provider, missing
):
    import onnxruntime as ort

    from nora_edge.edge_policy import EdgeRuntimeError

    with pytest.raises(EdgeRuntimeError, match=missing) as e:
        EdgePolicy.load(fused_trained_bundle, library=edge_runtime, provider=provider)
    assert e.value.status == "unsupported"
    have = ort.get_available_providers()  # the wheel's own list, read independently
    assert have and all(name in str(e.value) for name in have)


def test_provider_options_are_checked_and_an_abi_0_2_caller_gets_the_defaults(
    edge_runtime, fused_trained_bundle
):
    from nora_edge.edge_policy import _Options, wheel_onnxruntime

    with pytest.raises(InputError, match="provider must be one of"):
        EdgePolicy.load(fused_trained_bundle, library=edge_runtime, provider="gpu")
    lib = load_library(edge_runtime)
    h = ctypes.c_void_p()
    for field, value, text in (("provider", 7, "provider must be"), ("device_id", -1, "device_id must be")):
        opts = _Options()
        lib.nora_policy_options_init(ctypes.byref(opts))
        setattr(opts, field, value)
        assert (
            lib.nora_policy_create(str(fused_trained_bundle).encode(), ctypes.byref(opts), ctypes.byref(h))
            == 1
        )
        assert text in lib.nora_edge_last_error().decode() and not h.value
    # a caller compiled against ABI 0.2 passes the 0.2 struct size; the 0.3 fields behind it hold garbage here
    opts = _Options()
    lib.nora_policy_options_init(ctypes.byref(opts))
    opts.struct_size, opts.onnxruntime_path, opts.threads = (
        _Options.provider.offset,
        str(wheel_onnxruntime()).encode(),
        1,
    )
    opts.provider, opts.device_id = 99, -5
    assert (
        lib.nora_policy_create(str(fused_trained_bundle).encode(), ctypes.byref(opts), ctypes.byref(h)) == 0
    )
    edge = EdgePolicy(lib, h)
    py = NoraPolicy.load(fused_trained_bundle, threads=1, forced_tokens="flag")
    image, text = held_out_pairs(1, seed=53)[0]
    assert edge.step(image, text).ids.tolist() == py.run_chunk(image, text).ids.tolist()
    edge.close()


@pytest.mark.skipif(
    not _has("CUDAExecutionProvider"), reason="needs onnxruntime-gpu and a CUDA device: none here"
)
def test_cuda_provider_chunks_equal_the_python_runtime_on_cuda(edge_runtime, fused_trained_bundle):
    edge = EdgePolicy.load(fused_trained_bundle, library=edge_runtime, provider="cuda", forced_tokens="flag")
    py = NoraPolicy.load(fused_trained_bundle, providers="CUDAExecutionProvider", forced_tokens="flag")
    n = compare(edge, py, held_out_pairs(8, seed=59))
    assert n["pairs"] == 8


def test_library_exports_only_the_header(edge_runtime):
    out = subprocess.run(["nm", "-D", "--defined-only", str(edge_runtime)], capture_output=True, text=True)
    names = sorted(line.split()[-1] for line in out.stdout.splitlines() if line.strip())
    header = (KERNELS / "include" / "nora_edge.h").read_text()
    assert names and all(n.startswith(("nora_edge_", "nora_policy_")) and n in header for n in names), names
    lib = load_library(edge_runtime)
    assert isinstance(lib, ctypes.CDLL)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp32", "int8", "int4"])
def test_medium_bundles_equal_the_python_runtime(edge_runtime, medium_ckpt, tmp_path_factory, recipe):
    """The medium preset (91.9 M parameters) exported fused, quantized, on 50 pairs (untrained: flags counted)."""
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.quantize.bundle_quant import quantize_bundle

    root = tmp_path_factory.mktemp("edgemed")
    b = export_bundle(medium_ckpt, root / "fp32", decoder_graph="fused", progress=False, validate=False)
    if recipe != "fp32":
        b = quantize_bundle(b, root / recipe, recipe, accept_degraded=True)
    edge = EdgePolicy.load(b, library=edge_runtime, threads=1, forced_tokens="flag")
    py = NoraPolicy.load(b, threads=1, forced_tokens="flag")
    n = compare(edge, py, held_out_pairs(N_PAIRS, seed=53))
    assert n["pairs"] == N_PAIRS


@pytest.mark.slow
def test_run_bundle_is_clean_under_asan_and_ubsan(fused_trained_bundle, tmp_path):
    """The whole runtime (every libnora_edge and libnora_fast source) under AddressSanitizer + UBSan with leak
    checks, linked into examples/run_bundle.c: one chunk with sha256 verification, and three refusals."""
    from PIL import Image

    from nora_edge.edge_policy import wheel_onnxruntime

    build = tmp_path / "b"
    r = subprocess.run(
        ["make", "-C", str(KERNELS), "run-bundle-asan", f"BUILD={build}", "-j2"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    image, text = held_out_pairs(1, seed=59)[0]
    Image.fromarray(image).save(tmp_path / "f.ppm")
    env = {
        "ASAN_OPTIONS": "detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1",
        "PATH": "/usr/bin",
    }
    base = [str(build / "runtime-asan" / "run_bundle"), str(fused_trained_bundle), str(tmp_path / "f.ppm")]
    base += ["--ort", str(wheel_onnxruntime())]
    runs = {
        "chunk": (base + ["--instruction", text, "--verify"], 0, ""),
        "unknown key": (base + ["--instruction", text, "--unnorm-key", "nope"], 1, "unknown unnorm_key"),
        "empty instruction": (base + ["--instruction", "  "], 1, "instruction is empty"),
        "missing bundle": (
            [base[0], str(tmp_path / "none"), *base[2:], "--instruction", text],
            1,
            "not found",
        ),
    }
    for name, (cmd, rc, msg) in runs.items():
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == rc, (name, p.stderr[-3000:])
        assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, (name, p.stderr[-3000:])
        assert msg in p.stderr, (name, p.stderr[-500:])
    assert len(runs) == 4
