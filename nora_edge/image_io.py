"""Read a camera frame from disk for the CLI: ``.npy`` natively, PNG/JPEG through Pillow when installed.

The runtime itself takes numpy arrays; this module only serves ``nora-edge run`` and the bench.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nora_edge.errors import InputError


def load_image(path: str | Path) -> np.ndarray:
    """Load an image file as (H, W, 3) uint8.

    Raises:
        InputError: missing file, unsupported format, or Pillow absent for a compressed format.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image file not found: {p}")
    if p.suffix.lower() == ".npy":
        arr = np.load(p, allow_pickle=False)
    else:
        try:
            from PIL import Image  # optional: the robot usually hands frames as arrays
        except ImportError as e:
            raise InputError(
                f"{p}: reading {p.suffix} files needs Pillow (pip install pillow) or pass a .npy"
            ) from e
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise InputError(f"{p}: not a readable image ({e})") from e
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(f"{p}: expected an (H, W, 3) uint8 image, got {arr.shape} {arr.dtype}")
    return arr
