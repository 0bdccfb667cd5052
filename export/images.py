"""Deterministic synthetic camera frames for tests and benchmarks (numpy only, no torch).

Data flow: seed -> smooth per-channel color gradients + Gaussian noise -> (H, W, 3) uint8 RGB.
"""

from __future__ import annotations

import numpy as np

from nora_edge import names
from nora_edge.errors import InputError


def random_rgb_image(
    seed: int = 0, height: int = names.IMAGE_SIZE, width: int = names.IMAGE_SIZE
) -> np.ndarray:
    """A deterministic (height, width, 3) uint8 image: smooth color gradients plus noise, per seed."""
    if height < 1 or width < 1:
        raise InputError(f"image size must be positive, got {height}x{width}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)  # (H, W) each
    freqs = rng.uniform(0, 3, (3, 3))  # per channel: x frequency, y frequency, phase
    base = np.stack(
        [np.sin(2 * np.pi * (fx * xx + fy * yy) + ph) for fx, fy, ph in freqs], axis=-1
    )  # (H, W, 3)
    img = 127.5 * (base + 1.0) + rng.normal(0, 20, (height, width, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
