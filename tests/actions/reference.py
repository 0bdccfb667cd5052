"""Reference pieces for the FAST codec tests: smooth synthetic chunks and the published algorithm.

The reference (``published_encode`` / ``published_decode``) follows physical-intelligence/fast's
processing_action_tokenizer: scipy DCT, ``tokenizers`` encode/decode; it shares no code with nora_edge.
"""

from __future__ import annotations

import numpy as np
from scipy.fft import dct, idct


def smooth_chunk(rng: np.random.Generator, t: int, d: int, amplitude: float = 0.35) -> np.ndarray:
    """Sum of three sinusoids per dim plus small noise: float64 (T, D), roughly in [-1, 1]."""
    time = np.linspace(0.0, 1.0, t)[:, None]  # (T, 1)
    out = np.zeros((t, d))
    for _ in range(3):
        amp = rng.normal(0.0, amplitude, (1, d))
        freq = rng.uniform(0.2, 2.0, (1, d))
        phase = rng.uniform(0.0, 2 * np.pi, (1, d))
        out += amp * np.sin(2 * np.pi * freq * time + phase)
    return out + rng.normal(0.0, 0.01, (t, d))


def training_chunks(seed: int, shapes: list[tuple[int, int]], per_shape: int, amplitude: float = 0.35):
    rng = np.random.default_rng(seed)
    return [smooth_chunk(rng, t, d, amplitude) for t, d in shapes for _ in range(per_shape)]


def published_encode(tokenizer, chunk: np.ndarray, scale: float, min_token: int) -> list[int]:
    """Published FAST encode of one (T, D) chunk."""
    coeff = np.around(dct(chunk, axis=0, norm="ortho") * scale)
    text = "".join(map(chr, np.maximum(coeff.flatten() - min_token, 0).astype(int)))
    return tokenizer.encode(text).ids


def published_decode(tokenizer, ids, t: int, d: int, scale: float, min_token: int):
    """Published FAST decode of one sequence: (coeffs int (T, D), actions (T, D)) or None where it fails
    (the published code would print and return zeros there)."""
    text = tokenizer.decode(list(ids))
    coeffs = np.array(list(map(ord, text)), dtype=np.int64) + min_token
    if coeffs.size % d:
        return None
    coeffs = coeffs.reshape(-1, d)
    if coeffs.shape != (t, d):
        return None
    return coeffs, idct(coeffs / scale, axis=0, norm="ortho")
