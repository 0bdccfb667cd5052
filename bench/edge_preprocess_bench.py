"""Image preprocessing of one camera frame: libnora_edge (C) vs the numpy path vs the HF image processor.

Data flow:
  frame (480, 640, 3) uint8 (gradients, edges and noise; seeded)
    C      nora_edge.preprocess.preprocess_image(backend="c")  -> nora_edge_preprocess through ctypes
    numpy  preprocess_image(backend="numpy")                    -> the reference numpy port
    HF     PIL.Image.fromarray(frame).resize((224, 224)) (qwen-vl-utils' Pillow default, bicubic)
           + transformers' Qwen2VLImageProcessorPil (NORA's min/max_pixels)
  --> pixel_values (256, 1176) float32: all three compared bitwise before any timing
  --> interleaved timing in one process (order rotated each round): ms per frame, median / p99 per path
  kernels/tools/pre_check.c (plain build, static library) under ``valgrind --tool=callgrind
  --toggle-collect=nora_edge_preprocess`` --> instructions per frame of the C call alone (stable under load)
  --> edge_preprocess_bench.json + edge_preprocess_bench.md under --out.

Run: ``python -m nora_edge.bench.edge_preprocess_bench --out out/edge-preprocess-bench [--rounds 300] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from nora_edge import edge_lib
from nora_edge.atomic import write_text_atomic
from nora_edge.bench.kernels_callgrind import summary_ir
from nora_edge.bench.report import table, write_json_atomic
from nora_edge.bench.stats import summarize
from nora_edge.errors import InputError
from nora_edge.preprocess import ImageSpec, preprocess_image

REPO = Path(__file__).resolve().parent.parent
SIZE = (480, 640)
PATHS = ("c", "numpy", "hf")


def make_frame(seed: int) -> np.ndarray:
    """A (480, 640, 3) uint8 frame: smooth gradients, hard checker edges and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : SIZE[0], 0 : SIZE[1]]
    base = np.stack([x * 255 / (SIZE[1] - 1), y * 255 / (SIZE[0] - 1), ((x // 37 + y // 29) % 2) * 255.0], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def hf_path():
    """The HF pipeline NORA's processor runs: Pillow resize + Qwen2VLImageProcessorPil (imported here: bench
    extra)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)

    def run(frame: np.ndarray) -> np.ndarray:
        pil = Image.fromarray(frame).convert("RGB").resize((224, 224))
        return proc(images=[pil], return_tensors="np")["pixel_values"]

    return run


def check_bitwise(frame: np.ndarray, fns: dict) -> dict[str, bool]:
    """Every path's pixel values equal the C path's, bit for bit (the C path itself is one of them)."""
    ref = np.ascontiguousarray(fns["c"](frame), np.float32).view(np.uint32)
    out = {}
    for name, fn in fns.items():
        got = np.ascontiguousarray(fn(frame), np.float32)
        out[name] = bool(got.shape == ref.shape and np.array_equal(got.view(np.uint32), ref))
    return out


def time_interleaved(frame: np.ndarray, fns: dict, rounds: int, warmup: int) -> dict[str, dict]:
    """ms per frame for each path: ``rounds`` rounds, each timing every path once (order rotated)."""
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter_ns()
            fns[n](frame)
            dt = (time.perf_counter_ns() - t0) / 1e6
            if r >= warmup:
                samples[n].append(dt)
    return {n: summarize(s) for n, s in samples.items()}


def callgrind_c(frame: np.ndarray, out_dir: Path) -> dict:
    """Instructions of one nora_edge_preprocess call on ``frame`` (pre_check --frames-only under callgrind)."""
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind not installed"}
    build = out_dir / "build"
    r = subprocess.run(["make", "-C", str(REPO / "kernels"), f"BUILD={build}", f"{build}/edge/pre_check"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    if r.returncode != 0:
        raise InputError(f"building pre_check failed:\n{(r.stdout + r.stderr)[-2000:]}")
    h, w = frame.shape[:2]
    (out_dir / "frame.rgb").write_bytes(np.ascontiguousarray(frame).tobytes())
    oh, ow = ImageSpec().output_size()
    cases = out_dir / "cases.txt"
    cases.write_text(f"frame {out_dir / 'frame.rgb'} {h} {w} {3 * w} {oh} {ow} {out_dir / 'frame.f32'}\n")
    dump = out_dir / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", "--toggle-collect=nora_edge_preprocess",
           f"--callgrind-out-file={dump}", str(build / "edge" / "pre_check"), str(cases), "--frames-only"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or "PASS pre frame" not in r.stdout:
        raise InputError(f"callgrind run failed:\n{(r.stdout + r.stderr)[-2000:]}")
    ref = preprocess_image(frame, backend="numpy")[0]
    same = np.array_equal(np.fromfile(out_dir / "frame.f32", "<f4").reshape(ref.shape).view(np.uint32),
                          ref.view(np.uint32))  # fmt: skip
    return {"instructions_per_frame": summary_ir(dump), "bitwise_equal_numpy": bool(same), "cflags": "-O2"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/edge-preprocess-bench"), help="output directory")
    p.add_argument("--rounds", type=int, default=300, help="timed rounds (each times every path once)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="30 rounds, for smoke runs")
    p.add_argument("--no-callgrind", action="store_true", help="skip the instruction count")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not edge_lib.available():
        raise InputError(
            f"libnora_edge unavailable ({edge_lib.unavailable_reason()}); run `make -C kernels cpu`"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    frame = make_frame(args.seed)
    fns = {
        "c": lambda f: preprocess_image(f, backend="c")[0],
        "numpy": lambda f: preprocess_image(f, backend="numpy")[0],
        "hf": hf_path(),
    }
    equal = check_bitwise(frame, fns)
    if not all(equal.values()):
        raise InputError(f"pixel values differ between paths: {equal}")
    rounds = 30 if args.quick else args.rounds
    stats = time_interleaved(frame, fns, rounds, args.warmup)
    cg = {"skipped": "--no-callgrind"} if args.no_callgrind else callgrind_c(frame, args.out)
    result = {
        "frame": list(frame.shape),
        "output": [256, 1176],
        "bitwise_equal": equal,
        "rounds": rounds,
        "ms": stats,
        "speedup_median": {
            "c_vs_hf": stats["hf"]["median"] / stats["c"]["median"],
            "c_vs_numpy": stats["numpy"]["median"] / stats["c"]["median"],
        },
        "callgrind": cg,
        "library": str(edge_lib.library_path()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
        },
    }
    rows = [[n, stats[n]["median"], stats[n]["p99"], stats["hf"]["median"] / stats[n]["median"], equal[n]]
            for n in PATHS]  # fmt: skip
    md = "\n\n".join([
        f"# Image preprocessing, one {SIZE[0]}x{SIZE[1]} frame -> (256, 1176) float32",
        table(["path", "median ms", "p99 ms", "x HF (median)", "bitwise = C"], rows),
        f"callgrind (C call only): {cg.get('instructions_per_frame', cg.get('skipped'))} instructions per frame",
        f"{rounds} interleaved rounds in one process; library {edge_lib.library_path()}",
    ])  # fmt: skip
    write_json_atomic(args.out / "edge_preprocess_bench.json", result)
    write_text_atomic(args.out / "edge_preprocess_bench.md", md + "\n")
    print(md)
    return result


if __name__ == "__main__":
    main()
