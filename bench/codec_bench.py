"""FAST codec micro-benchmark: published decode vs FastTokenizer.decode vs byte-table decode vs automaton masks.

Data flow: FAST dir (or a FAST+-like tokenizer fitted here on smooth synthetic chunks) --encode N chunks per
(T, D)--> id sequences --each decode path timed per chunk, interleaved in one process (order rotated every
chunk)--> median / p99 per path --> markdown table on stdout.

Paths:
  published      tokenizers decode -> ord + min_token -> reshape -> scipy.fft.idct (the reference algorithm)
  FastTokenizer  FastTokenizer.decode (tokenizers + strict checks + numpy iDCT)
  byte table     ByteTable.decode_chunk (no tokenizers: bytes -> strict UTF-8 -> numpy iDCT)
  mask+advance   allowed + advance over the whole chunk (per chunk, what constrained decoding adds)
  mask/step      FastAutomaton.allowed at each step of the chunk's own id path (per call; masks are cached
                 per state, so after warm-up this is a dict hit), and compute_mask (the uncached work)

Run: ``python bench/codec_bench.py [--fast-dir DIR] [--chunks 2000]``. Timings are wall clock (perf_counter_ns)
on whatever machine runs it; compare only rows from the same run.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from nora_edge.actions import FastAutomaton, FastTokenizer
from nora_edge.errors import InputError

DEFAULT_SHAPES = ((1, 7), (5, 7), (10, 7), (50, 14))


def smooth_chunks(rng: np.random.Generator, n: int, t: int, d: int) -> np.ndarray:
    """Sums of three sinusoids per dim plus noise: float64 (n, T, D), roughly in [-1, 1]."""
    time_axis = np.linspace(0.0, 1.0, t)[None, :, None, None]  # (1, T, 1, 1)
    amp = rng.normal(0.0, 0.35, (n, 1, 3, d))
    freq = rng.uniform(0.2, 2.0, (n, 1, 3, d))
    phase = rng.uniform(0.0, 2 * np.pi, (n, 1, 3, d))
    waves = amp * np.sin(2 * np.pi * freq * time_axis + phase)  # (n, T, 3, D)
    return waves.sum(axis=2) + rng.normal(0.0, 0.01, (n, t, d))  # (n, T, D)


def fit_synthetic(shapes, seed: int) -> FastTokenizer:
    """A FAST+-like tokenizer (scale 10, vocab 2048) fitted on smooth chunks of every benchmarked shape."""
    rng = np.random.default_rng(seed)
    chunks = [c for t, d in shapes for c in smooth_chunks(rng, 3000 // len(shapes) + 500, t, d)]
    return FastTokenizer.fit(chunks, scale=10.0, vocab_size=2048)


def published_decode(fast: FastTokenizer, ids: list[int], t: int, d: int, idct) -> np.ndarray:
    """The published decode of one sequence (physical-intelligence/fast), minus its zero fallback."""
    coeffs = np.array(list(map(ord, fast.tokenizer.decode(ids)))) + fast.min_token
    coeffs = coeffs.reshape(-1, d)  # (T, D)
    if coeffs.shape != (t, d):
        raise ValueError("wrong coefficient count")
    return idct(coeffs / fast.scale, axis=0, norm="ortho")


def encode_encodable(fast: FastTokenizer, chunks, limit: int | None = None) -> list[list[int]]:
    """Encode chunk by chunk, skipping the few a synthetic vocabulary cannot represent; stop at ``limit``."""
    out = []
    for chunk in chunks:
        try:
            out.append(fast.encode(chunk)[0])
        except InputError:
            continue
        if len(out) == limit:
            break
    return out


def time_ns(fn) -> int:
    start = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - start


def bench_shape(fast: FastTokenizer, t: int, d: int, n_chunks: int, seed: int) -> tuple[list[tuple], float]:
    """Per-path samples (µs) for one (T, D); returns (rows, automaton build ms)."""
    from scipy.fft import idct  # the reference only; scipy is not a runtime dependency

    rng = np.random.default_rng(seed)
    sequences = encode_encodable(fast, smooth_chunks(rng, n_chunks, t, d))
    build_start = time.perf_counter()
    auto = FastAutomaton.from_tokenizer(fast, t, d)
    build_ms = (time.perf_counter() - build_start) * 1e3
    table = fast.table
    samples: dict[str, list[float]] = {
        k: [] for k in ("published", "FastTokenizer", "byte table", "mask+advance")
    }
    mask_step: list[float] = []
    mask_cold: list[float] = []

    def walk(ids: list[int]) -> None:
        state = auto.start()
        for token in ids:
            auto.allowed(state)
            state = auto.advance(state, token)

    for ids in sequences[:50]:  # warm-up (caches, allocator)
        (
            published_decode(fast, ids, t, d, idct),
            fast.decode([ids], t, d),
            table.decode_chunk(ids, t, d),
            walk(ids),
        )
    paths = [
        ("published", lambda ids: published_decode(fast, ids, t, d, idct)),
        ("FastTokenizer", lambda ids: fast.decode([ids], t, d)),
        ("byte table", lambda ids: table.decode_chunk(ids, t, d)),
        ("mask+advance", walk),
    ]
    for n, ids in enumerate(sequences):
        rotation = paths[n % len(paths) :] + paths[: n % len(paths)]
        for name, fn in rotation:
            samples[name].append(time_ns(lambda fn=fn, ids=ids: fn(ids)) / 1e3)
        state = auto.start()
        for token in ids:
            mask_step.append(time_ns(lambda s=state: auto.allowed(s)) / 1e3)
            mask_cold.append(time_ns(lambda s=state: auto.compute_mask(s)) / 1e3)
            state = auto.advance(state, token)
    tokens = np.mean([len(s) for s in sequences])
    rows = []
    for name, values in [
        *samples.items(),
        ("mask/step (cached)", mask_step),
        ("mask/step (uncached)", mask_cold),
    ]:
        arr = np.asarray(values)
        rows.append((f"{t}x{d}", f"{tokens:.1f}", name, np.median(arr), np.percentile(arr, 99), arr.size))
    return rows, build_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast-dir", help="FAST directory (default: fit a FAST+-like tokenizer here)")
    parser.add_argument("--chunks", type=int, default=2000, help="chunks per shape")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fast = (
        FastTokenizer.from_pretrained(args.fast_dir)
        if args.fast_dir
        else fit_synthetic(DEFAULT_SHAPES, args.seed)
    )
    print(
        f"FAST: vocab {fast.vocab_size}, min_token {fast.min_token}, alphabet U+0000..U+{fast.table.alphabet_max:04X},"
        f" scale {fast.scale:g}; {platform.processor() or platform.machine()}, numpy {np.__version__}\n"
    )
    print("| T x D | ids/chunk | path | median µs | p99 µs | n |")
    print("|---|---|---|---|---|---|")
    builds = []
    for t, d in DEFAULT_SHAPES:
        rows, build_ms = bench_shape(fast, t, d, args.chunks, args.seed + t * 100 + d)
        builds.append(f"{t}x{d}: {build_ms:.1f} ms")
        for shape, tokens, name, med, p99, n in rows:
            print(f"| {shape} | {tokens} | {name} | {med:.1f} | {p99:.1f} | {n} |")
    print(f"\nautomaton build (once per bundle load): {', '.join(builds)}")


if __name__ == "__main__":
    main()
