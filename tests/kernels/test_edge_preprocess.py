"""libnora_edge's nora_edge_preprocess (kernels/src/edge/preprocess.c) against the numpy path and Pillow + HF.

Data flow:
  ``make -C kernels edge BUILD=<tmp>`` --> libnora_edge_pre.so --nora_edge.edge_lib.reload--> preprocess_image(backend=
  "c") ; the same frame --preprocess_image(backend="numpy")--> and --PIL resize (qwen-vl-utils' Pillow default
  filter) + transformers' Qwen2VLImageProcessorPil--> the independent reference; all three compared BITWISE
  (float32 bit patterns), frames counted.
  frames written raw (exact-size buffers) + a case list --``make asan-edge`` (tools/pre_check.c under ASan +
  UBSan)--> float32 files == the numpy path, plus the driver's API misuse checks.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from nora_edge import edge_lib
from nora_edge.errors import InputError
from nora_edge.preprocess import ImageSpec, preprocess_image, vertical_first

from .conftest import make

SHAPES = [(1, 1), (1, 2), (2, 1), (3, 3), (5, 7), (13, 1), (1, 13), (27, 29), (28, 28), (56, 56), (97, 31),
          (31, 97), (224, 224), (223, 225), (225, 223), (300, 17), (113, 449), (448, 448), (480, 640),
          (640, 480), (720, 1280), (5000, 40), (40, 5000), (2000, 3), (3, 2000), (1080, 1920)]  # fmt: skip
N_RANDOM = 24  # random frame shapes with random 28-multiple targets
MIN_FRAMES = 50
MIN_PIXELS = 28 * 28  # the processor keeps every 28-multiple target (NORA's 3136 would upsize a 28x28 one)


@pytest.fixture(scope="module")
def edge_build(tmp_path_factory):
    """libnora_edge built into a temp dir and made the runtime's library for this module."""
    build = tmp_path_factory.mktemp("edge_build")
    r = make("edge", build)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert edge_lib.reload(build / "libnora_edge_pre.so"), edge_lib.unavailable_reason()
    yield build
    edge_lib.reload()


def hf_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """NORA's HF path at a (height, width) target: Pillow's default-filter resize, then the PIL processor."""
    pil = Image.fromarray(image).convert("RGB").resize((width, height))
    proc = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=12845056)
    return proc(images=[pil], return_tensors="np")["pixel_values"]


def frames() -> list[tuple[str, np.ndarray, int, int]]:
    """(name, frame, target height, target width): fixed shapes at 224x224, random shapes at random targets,
    and memory layouts (padded rows, a flipped/strided view, a column crop)."""
    rng = np.random.default_rng(16)
    out = []
    for h, w in SHAPES:
        out.append((f"{h}x{w}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 224, 224))
    for i in range(N_RANDOM):
        h, w = (int(v) for v in rng.integers(1, 700, 2))
        th, tw = (28 * int(v) for v in rng.integers(1, 17, 2))
        out.append((f"rand{i}-{h}x{w}-to-{th}x{tw}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), th, tw))
    y, x = np.mgrid[0:300, 0:400]
    smooth = np.stack([x * 255 // 399, y * 255 // 299, ((x // 40 + y // 40) % 2) * 255], -1).astype(np.uint8)
    out.append(("smooth-edges", smooth, 224, 224))
    out.append(("saturated", np.where(rng.random((333, 222, 1)) < 0.5, 0, 255).repeat(3, 2).astype(np.uint8),
                224, 224))  # fmt: skip
    big = rng.integers(0, 256, (480, 700, 3), dtype=np.uint8)
    out.append(("padded-rows", big[:, :640], 224, 224))  # row stride 2100 > 1920 bytes, passed as is
    out.append(("crop-offset", big[17:400, 33:530], 112, 336))
    out.append(("flipped-strided", big[::-1, ::2], 224, 224))  # negative / non-packed strides: copied first
    return out


def spec_for(height: int, width: int) -> ImageSpec:
    """A spec asking fetch_image for (height, width); its output_size() is what both pipelines produce."""
    return ImageSpec(resized_height=height, resized_width=width, min_pixels=MIN_PIXELS)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def test_c_numpy_hf_bitwise(edge_build):
    """>= 50 frames (1x1 .. 1080x1920, 5000x40, padded rows, views): C == numpy == Pillow + HF, bit for bit."""
    compared = vfirst = 0
    cases = frames()
    for name, image, th, tw in cases:
        spec = spec_for(th, tw)
        th, tw = spec.output_size()  # fetch_image's smart_resize (min 3136 pixels) may round the request
        got, grid = preprocess_image(image, spec, backend="c")
        ref_np, grid_np = preprocess_image(image, spec, backend="numpy")
        ref_hf = hf_reference(np.ascontiguousarray(image), th, tw)
        assert got.shape == ref_hf.shape == (th * tw // 196, 1176), name
        assert np.array_equal(grid, grid_np) and grid.tolist() == [[1, th // 14, tw // 14]], name
        assert np.array_equal(bits(got), bits(ref_np)), name
        assert np.array_equal(bits(got), bits(ref_hf)), name
        compared += 1
        vfirst += vertical_first(image.shape[0], image.shape[1], th, tw)
    assert compared == len(cases) >= MIN_FRAMES
    assert vfirst >= 3  # both of Pillow 13's pass orders are exercised
    print(f"edge preprocess: {compared} frames bitwise equal (C, numpy, Pillow+HF), {vfirst} vertical-first")


def test_auto_backend_and_fallbacks(edge_build):
    """auto == c == numpy for NORA's spec; a spec C cannot run (second resize) falls back under auto and is refused
    under "c"; an unknown backend is refused."""
    image = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    auto, _ = preprocess_image(image)
    assert np.array_equal(bits(auto), bits(preprocess_image(image, backend="c")[0]))
    twice = ImageSpec(min_pixels=448 * 448)  # the processor resizes 224x224 again to 448x448
    with pytest.raises(InputError, match="again to 448x448"):
        preprocess_image(image, twice, backend="c")
    fallback, grid = preprocess_image(image, twice)
    assert np.array_equal(bits(fallback), bits(preprocess_image(image, twice, backend="numpy")[0]))
    assert grid.tolist() == [[1, 32, 32]]
    with pytest.raises(InputError, match="backend 'gpu'"):
        preprocess_image(image, backend="gpu")
    with pytest.raises(InputError, match="temporal_patch_size = 65"):
        preprocess_image(image, ImageSpec(temporal_patch_size=65), backend="c")


def test_bad_calls_return_input_error_and_write_nothing(edge_build):
    """Raw ABI calls with bad values: status 1 (NORA_EDGE_ERR_INPUT), a message naming the value, out untouched."""
    lib = ctypes.CDLL(str(edge_build / "libnora_edge_pre.so"))
    lib.nora_edge_last_error.restype = ctypes.c_char_p
    lib.nora_edge_preprocess.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_size_t,
                                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]  # fmt: skip
    lib.nora_edge_pixel_values_size.restype = ctypes.c_size_t
    lib.nora_edge_pixel_values_size.argtypes = [ctypes.c_void_p]
    good = edge_lib.make_spec(224, 224, 14, 2, 2, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    n = lib.nora_edge_pixel_values_size(ctypes.addressof(good))
    assert n == 256 * 1176
    rgb = np.zeros((10, 12, 3), np.uint8)
    out = np.full(n + 8, 7.0, np.float32)
    bad_spec = edge_lib.make_spec(224, 220, 14, 2, 2, (0.5,) * 3, (0.25,) * 3)
    cases = [
        ((None, 10, 12, 36, good, out, n), "rgb is NULL"),
        ((rgb, 0, 12, 36, good, out, n), "frame 0 x 12"),
        ((rgb, 10, -3, 36, good, out, n), "frame 10 x -3"),
        ((rgb, 10, 12, 35, good, out, n), "stride 35 < width * 3 = 36"),
        ((rgb, 10, 12, 36, good, out, n - 1), f"out_len {n - 1} < {n}"),
        ((rgb, 10, 12, 36, None, out, n), "spec is NULL"),
        ((rgb, 10, 12, 36, bad_spec, out, n), "224 x 220"),
        ((rgb, 10, 12, 36, good, None, n), "out is NULL"),
    ]
    for (img, h, w, stride, spec, o, cap), needle in cases:
        rc = lib.nora_edge_preprocess(
            None if img is None else img.ctypes.data, h, w, stride,
            None if spec is None else ctypes.addressof(spec), None if o is None else o.ctypes.data, cap, None,
        )  # fmt: skip
        msg = lib.nora_edge_last_error().decode()
        assert rc == edge_lib.ERR_INPUT and needle in msg, (needle, rc, msg)
        assert (out == 7.0).all(), needle
    assert (
        lib.nora_edge_preprocess(
            rgb.ctypes.data, 10, 12, 36, ctypes.addressof(good), out.ctypes.data, n, None
        )
        == 0
    )
    assert (out[n:] == 7.0).all() and np.isfinite(out[:n]).all()
    assert len(cases) == 8
    with pytest.raises(InputError, match="stride|frame"):
        edge_lib.preprocess(np.zeros((0, 4, 3), np.uint8), good)


def test_missing_library_warns_once_and_numpy_runs(tmp_path):
    """No library found (not explicit): one EdgeLibUnavailableWarning, numpy values. Explicit bad path: an error."""
    code = (
        "import warnings, numpy as np\n"
        "from pathlib import Path\n"
        "import nora_edge.edge_lib as e\n"
        "e._LIB.packaged = e._LIB.repo = Path('/nonexistent/libnora_edge_pre.so')\n"
        "from nora_edge.preprocess import preprocess_image\n"
        "img = np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = preprocess_image(img)[0]; b = preprocess_image(img)[0]\n"
        "assert len(w) == 1 and issubclass(w[0].category, e.EdgeLibUnavailableWarning), w\n"
        "assert np.array_equal(a, preprocess_image(img, backend='numpy')[0]) and np.array_equal(a, b)\n"
        "print('warned once')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != edge_lib.ENV_LIB}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "warned once" in r.stdout, r.stderr[-3000:]
    code = (
        "import numpy as np\nimport nora_edge.edge_lib as e\nfrom nora_edge.preprocess import preprocess_image\n"
        "try:\n    preprocess_image(np.zeros((4, 4, 3), np.uint8))\n"
        "except e.EdgeLibError as err:\n    print('raised', err)\n"
    )
    env[edge_lib.ENV_LIB] = str(tmp_path / "nope.so")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "raised libnora_edge unavailable" in r.stdout and "nope.so" in r.stdout, (
        r.stderr
    )


def test_portable_loops_bitwise(edge_build, tmp_path):
    """-DNORA_EDGE_NO_SIMD (the loops non-x86 targets such as Jetson's aarch64 compile): C == numpy bitwise on
    every frame of the main test."""
    r = make("edge", tmp_path / "build", "EDGE_DEFS=-DNORA_EDGE_NO_SIMD")
    assert r.returncode == 0 and "-DNORA_EDGE_NO_SIMD" in r.stdout, (r.stdout + r.stderr)[-4000:]
    assert edge_lib.reload(tmp_path / "build" / "libnora_edge_pre.so"), edge_lib.unavailable_reason()
    compared = 0
    try:
        for name, image, th, tw in frames():
            spec = spec_for(th, tw)
            got = preprocess_image(image, spec, backend="c")[0]
            assert np.array_equal(bits(got), bits(preprocess_image(image, spec, backend="numpy")[0])), name
            compared += 1
    finally:
        edge_lib.reload(edge_build / "libnora_edge_pre.so")
    assert compared >= MIN_FRAMES


@pytest.mark.parametrize("defs", ["", "-DNORA_EDGE_NO_SIMD"], ids=["simd", "portable"])
def test_driver_under_asan_ubsan(tmp_path, defs):
    """tools/pre_check.c + the edge sources with -fsanitize=address,undefined on exact-size frame buffers (padded
    strides too), SSE2 and portable loops: every frame PASSes and equals the numpy path bitwise; the misuse
    checks pass; no report."""
    rng = np.random.default_rng(5)
    lines, expected = [], {}
    shapes = [(1, 1, 224, 224), (7, 5, 56, 28), (480, 640, 224, 224), (5000, 40, 224, 224), (40, 900, 84, 252),
              (300, 17, 224, 224), (224, 224, 224, 224), (33, 70, 28, 28)]  # fmt: skip
    for i, (h, w, th, tw) in enumerate(shapes):
        pad = (0, 5, 1)[i % 3]
        stride = 3 * w + pad
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        raw = np.zeros((h, stride), np.uint8)
        raw[:, : 3 * w] = image.reshape(h, 3 * w)
        size = (h - 1) * stride + 3 * w  # the last row without its padding: an over-read is an ASan report
        (tmp_path / f"f{i}.rgb").write_bytes(raw.reshape(-1)[:size].tobytes())
        spec = spec_for(th, tw)
        oh, ow = spec.output_size()
        lines.append(f"f{i} {tmp_path / f'f{i}.rgb'} {h} {w} {stride} {oh} {ow} {tmp_path / f'f{i}.f32'}")
        expected[f"f{i}"] = preprocess_image(image, spec, backend="numpy")[0]
    (tmp_path / "cases.txt").write_text("\n".join(lines) + "\n")
    r = make("asan-edge", tmp_path / "build", f"CASES={tmp_path / 'cases.txt'}", f"EDGE_DEFS={defs}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "-fsanitize=address,undefined -fno-sanitize-recover=all" in r.stdout
    assert "ERROR: AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert not [ln for ln in rows if ln[0] == "FAIL"], r.stdout[-3000:]
    passed = {ln[2]: int(ln[3]) for ln in rows if ln[1] == "pre"}
    compared = 0
    for name, ref in expected.items():
        got = np.fromfile(tmp_path / f"{name}.f32", "<f4").reshape(ref.shape)
        assert passed[name] == ref.size and np.array_equal(bits(got), bits(ref)), name
        compared += 1
    api = int(next(ln[3] for ln in rows if ln[1] == "misuse"))
    assert compared == len(shapes) and api >= 40
    assert [int(ln[2]) for ln in rows if ln[1] == "total"] == [len(shapes) + api]
