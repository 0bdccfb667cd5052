"""Held-out (frame, instruction) pairs of the synthetic task the trained tiny fixtures learned (frames of varied
sizes, seeds far below the training frames), shared by the parity tests."""

from __future__ import annotations

import numpy as np


def held_out_pairs(n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """``n`` deterministic pairs: (H, W, 3) uint8 frames (180..479 x 180..639) and task instructions."""
    from nora_edge.export.images import random_rgb_image
    from nora_edge.export.synthetic_task import instruction_list

    rng = np.random.default_rng(seed)
    texts = instruction_list()
    out = []
    for i in range(n):
        h, w = int(rng.integers(180, 480)), int(rng.integers(180, 640))
        out.append((random_rgb_image(seed * 1000 + i, h, w), texts[int(rng.integers(len(texts)))]))
    return out
