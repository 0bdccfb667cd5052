"""libnora_edge's example programs (kernels/examples/run_bundle.c, robot_loop.cpp) against the Python runtime.

Data flow: ``make -C kernels examples BUILD=<tmp>`` (mk/examples.mk; it builds the runtime library of
mk/runtime.mk first) --> run_bundle / robot_loop; the ``fused_trained_bundle`` session fixture --> both programs
(onnxruntime: the pip wheel's libonnxruntime, passed with --ort) and, as the independent reference,
``NoraPolicy`` (onnxruntime's Python binding over the same library, numpy / libnora_fast codec) on the same frames:
  run_bundle: a Pillow-written PNG and a hand-written P6 PPM (with a comment) of one frame -> JSON; token ids and
      classes equal ``run_chunk``'s, actions within 1e-9; PNG and PPM give the same output.
  robot_loop: 12 ticks over its fake camera, rebuilt here (:func:`camera_frames`) and checked byte for byte
      against the frames the program wrote; every tick's action within 1e-9 of ``select_action``'s on the same
      frame (and ``reset`` at the same episode starts), new-chunk flags equal.
The image decoding alone (``run_bundle --dump-rgb``, no bundle loaded) is compared with Pillow's
``convert("RGB")`` for every PNG color type.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .conftest import make

ATOL = 1e-9
TICKS, EPISODE = 12, 8  # robot_loop: reset at ticks 0 and 8
SEED = 2463534242  # robot_loop's default xorshift32 seed


def _ort_library() -> Path:
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so.1*"))
    assert libs, f"no libonnxruntime.so.1* in {capi}"
    return libs[-1]


def camera_frames(n: int, height: int = 224, width: int = 224, seed: int = SEED) -> np.ndarray:
    """robot_loop's FakeCamera (kernels/examples/robot_loop.cpp, file comment), rebuilt in Python.

    A xorshift32 stream (x ^= x << 13; x ^= x >> 17; x ^= x << 5 on uint32, seeded with ``seed``); frame k takes the
    next ceil(H*W*3 / 4) outputs, whose bytes, least significant first, are the noise bytes b in (y, x, c) order;
    pixel (y, x, c) = (b >> 1) + ((x + 37 * k) % W) * 128 // W.

    Returns:
        (n, height, width, 3) uint8 frames.
    """
    size, x, frames = height * width * 3, seed, []
    ramp_x = np.arange(width)
    for k in range(n):
        words = []
        for _ in range((size + 3) // 4):
            x ^= (x << 13) & 0xFFFFFFFF
            x ^= x >> 17
            x ^= (x << 5) & 0xFFFFFFFF
            words.append(x)
        noise = np.asarray(words, dtype="<u4").view(np.uint8)[:size].reshape(height, width, 3)
        ramp = (((ramp_x + 37 * k) % width) * 128 // width).astype(np.uint8)  # (W,)
        frames.append((noise >> 1) + ramp[None, :, None])
    return np.stack(frames)


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    """run_bundle and robot_loop (and the runtime library they link) built once into a temp BUILD dir."""
    build = tmp_path_factory.mktemp("examples")
    probe = make("runtime", build, "-n")
    if probe.returncode != 0:
        pytest.skip(f"make -C kernels runtime is not available: {probe.stderr.strip()[-400:]}")
    r = make("examples", build, "-j2", timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # kernels/examples/ is a directory, so without mk/examples.mk `make examples` succeeds and builds nothing
    missing = [n for n in ("run_bundle", "robot_loop") if not (build / n).is_file()]
    assert not missing, (
        f"make examples did not build {missing}: does kernels/Makefile include mk/examples.mk?"
    )
    return build


@pytest.fixture(scope="module")
def instruction() -> str:
    from nora_edge.export.synthetic_task import instruction_list

    return instruction_list()[5]


@pytest.fixture(scope="module")
def reference(fused_trained_bundle):
    """The Python runtime on the same bundle: CPU, one thread, forced tokens flagged (as --flag)."""
    from nora_edge.policy import NoraPolicy

    policy = NoraPolicy.load(fused_trained_bundle, providers="cpu", threads=1, forced_tokens="flag")
    yield policy
    policy.close()


def _run(exe: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(exe), *map(str, args)], capture_output=True, text=True, timeout=600, check=False
    )


def _write_ppm(path: Path, image: np.ndarray) -> None:
    """Binary PPM with a comment in the header (netpbm allows one before any field)."""
    h, w, _ = image.shape
    path.write_bytes(b"P6\n# nora-edge test frame\n%d %d\n255\n" % (w, h) + image.tobytes())


def test_run_bundle_equals_run_chunk_for_png_and_ppm(
    examples, fused_trained_bundle, reference, instruction, make_rgb_image, tmp_path
):
    from PIL import Image

    image = make_rgb_image(seed=3, height=240, width=320)  # not 224: the library resizes like Pillow
    png, ppm = tmp_path / "frame.png", tmp_path / "frame.ppm"
    Image.fromarray(image).save(png)
    _write_ppm(ppm, image)
    outs = {}
    for path in (png, ppm):
        run = _run(examples / "run_bundle", fused_trained_bundle, path, "--instruction", instruction,
                   "--threads", 1, "--flag", "--ort", _ort_library())  # fmt: skip
        assert run.returncode == 0, run.stderr
        outs[path.suffix] = json.loads(run.stdout)
    want = reference.run_chunk(image, instruction)
    got = outs[".png"]
    t, d = reference.time_horizon, reference.action_dim
    actions = np.asarray(got["actions"], dtype=np.float64)
    assert actions.shape == (t, d) == want.actions.shape
    np.testing.assert_allclose(actions, want.actions, rtol=0, atol=ATOL)
    assert got["token_ids"] == want.ids.tolist()
    assert got["token_classes"] == list(want.token_classes)
    assert got["flagged"] == want.flagged
    compared = actions.size + len(got["token_ids"]) + len(got["token_classes"])
    assert compared == t * d + 2 * want.ids.size and want.ids.size >= 1

    import onnxruntime

    assert got["onnxruntime"] == onnxruntime.__version__
    assert set(got["timings_ms"]) >= {"preprocess", "vision", "prefill", "decode", "detokenize", "total"}
    for out in outs.values():
        del out["timings_ms"]
    assert outs[".png"] == outs[".ppm"]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "P+tRNS", "1"])
def test_run_bundle_decodes_png_like_pillow(examples, mode, tmp_path, make_rgb_image):
    """--dump-rgb writes the decoded frame without loading a bundle; it equals Pillow's convert("RGB")."""
    from PIL import Image

    rgb = make_rgb_image(seed=7, height=31, width=45)
    alpha = np.arange(31 * 45, dtype=np.uint8).reshape(31, 45, 1)
    base = Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA")
    im = {
        "RGB": lambda: base.convert("RGB"),
        "RGBA": lambda: base,
        "L": lambda: base.convert("L"),
        "LA": lambda: base.convert("LA"),
        "P": lambda: base.convert("RGB").quantize(50),
        "P+tRNS": lambda: base.convert("RGB").quantize(50),
        "1": lambda: base.convert("1"),
    }[mode]()
    src, out = tmp_path / "in.png", tmp_path / "out.ppm"
    im.save(src, **({"transparency": 3} if mode == "P+tRNS" else {}))
    with Image.open(src) as check:
        assert check.mode == mode.split("+")[0]
        want = np.asarray(check.convert("RGB"))
    run = _run(examples / "run_bundle", tmp_path / "no-bundle", src, "--dump-rgb", out)
    assert run.returncode == 0, run.stderr
    with Image.open(out) as dumped:
        got = np.asarray(dumped)
    assert got.shape == want.shape == (31, 45, 3)
    np.testing.assert_array_equal(got, want)


def test_run_bundle_errors_name_the_problem(
    examples, fused_trained_bundle, instruction, make_rgb_image, tmp_path
):
    image = make_rgb_image(seed=1, height=64, width=64)
    ppm = tmp_path / "frame.ppm"
    _write_ppm(ppm, image)
    short = tmp_path / "short.ppm"
    short.write_bytes(ppm.read_bytes()[:-100])
    common = ("--instruction", instruction, "--threads", 1, "--ort", _ort_library())
    run = _run(examples / "run_bundle", fused_trained_bundle, short, *common)
    assert run.returncode == 2 and str(short) in run.stderr and "truncated PPM" in run.stderr, run.stderr
    missing = tmp_path / "missing.png"
    run = _run(examples / "run_bundle", fused_trained_bundle, missing, *common)
    assert run.returncode == 2 and str(missing) in run.stderr and "cannot open" in run.stderr, run.stderr
    text = tmp_path / "frame.txt"
    text.write_text("not an image")
    run = _run(examples / "run_bundle", fused_trained_bundle, text, *common)
    assert run.returncode == 2 and "not a binary PPM (P6) or a PNG" in run.stderr, run.stderr
    run = _run(examples / "run_bundle", fused_trained_bundle, ppm, *common, "--unnorm-key", "no_such_robot")
    assert run.returncode == 1 and run.stdout == "", run.stdout
    assert "NORA_EDGE_ERR_INPUT" in run.stderr and "no_such_robot" in run.stderr, run.stderr
    run = _run(examples / "run_bundle", fused_trained_bundle)
    assert run.returncode == 2 and "usage:" in run.stderr


def test_robot_loop_equals_select_action(examples, fused_trained_bundle, reference, instruction, tmp_path):
    frames_file = tmp_path / "frames.bin"
    run = _run(examples / "robot_loop", fused_trained_bundle, "--ticks", TICKS, "--hz", 1000,
               "--instruction", instruction, "--ort", _ort_library(), "--threads", 1, "--flag",
               "--episode", EPISODE, "--frames-out", frames_file)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    ticks, summary = lines[:-1], lines[-1]["summary"]
    assert [t["tick"] for t in ticks] == list(range(TICKS))

    frames = camera_frames(TICKS)
    written = np.fromfile(frames_file, dtype=np.uint8)
    assert written.size == frames.size == TICKS * 224 * 224 * 3
    np.testing.assert_array_equal(written.reshape(frames.shape), frames)

    assert reference.time_horizon == 5  # the fixture is NORA-Long: chunks run at ticks 0, 5 and 8 (reset)
    compared, want_fresh = 0, [k in (0, 5, 8) for k in range(TICKS)]
    for k in range(TICKS):
        if k % EPISODE == 0:
            reference.reset()
        want = reference.select_action(frames[k], instruction)
        got = np.asarray(ticks[k]["action"], dtype=np.float64)
        assert got.shape == want.shape == (reference.action_dim,)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"tick {k}")
        compared += got.size
    assert compared == TICKS * reference.action_dim
    assert [tk["new_chunk"] for tk in ticks] == want_fresh
    assert [tk["episode_start"] for tk in ticks] == [k % EPISODE == 0 for k in range(TICKS)]
    assert summary["ticks"] == TICKS and summary["chunks"] == sum(want_fresh) == 3
    assert 0 < summary["median_ms"] <= summary["max_ms"]


def _own_errors(log: str) -> list[str]:
    """Valgrind error records whose first frame outside valgrind's preload is in run_bundle or libnora_edge.

    The dynamic loader's strncmp over rpath strings and onnxruntime's self-overlapping memcpy_chk are reported
    too (valgrind false positives / onnxruntime internals); they are not this code's.
    """
    text = "\n".join(re.sub(r"^==\d+== ?", "", ln) for ln in log.splitlines())
    own = []
    for block in text.split("\n\n"):  # valgrind separates records with an empty line
        frames = [ln for ln in block.splitlines() if re.match(r"\s+(at|by) 0x", ln) and "vgpreload" not in ln]
        if frames and ("run_bundle" in frames[0] or "libnora_edge" in frames[0]):
            own.append(block)
    return own


def test_run_bundle_is_valgrind_clean(examples, fused_trained_bundle, instruction, make_rgb_image, tmp_path):
    import shutil

    from PIL import Image

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (apt-get install valgrind)")
    png = tmp_path / "frame.png"
    Image.fromarray(make_rgb_image(seed=2, height=100, width=150)).save(png)
    log = tmp_path / "valgrind.log"
    run = subprocess.run(
        ["valgrind", "--leak-check=full", f"--log-file={log}", str(examples / "run_bundle"),
         str(fused_trained_bundle), str(png), "--instruction", instruction, "--threads", "1", "--flag",
         "--ort", str(_ort_library())],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["token_ids"]) >= 1
    text = log.read_text()
    if "no leaks are possible" not in text:  # else the LEAK SUMMARY lists each kind
        for kind in ("definitely lost", "indirectly lost", "possibly lost"):
            assert f"{kind}: 0 bytes in 0 blocks" in text, text[-3000:]
    own = _own_errors(text)
    assert not own, "\n".join(own)[:3000]
