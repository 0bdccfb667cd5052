"""A small synthetic manipulation task: (camera frame, instruction) -> smooth normalized action chunk.

Data flow: frame (H, W, 3) uint8 --resize to 224x224 as NORA does--> :func:`image_features` (channel means and
left/right, top/bottom brightness differences, standardized and clipped to [-1, 1]) ; instruction -> (verb,
color, object) by :func:`parse_instruction` ; both -> :func:`target_chunk` (T, 7) in [-0.9, 0.9] for the six
end-effector dims and +-1 for the gripper.

The chunk is a deterministic, smooth function of its inputs (d < 6 the end-effector dims):
  base_d  = 0.35 * VERB_DIR[verb][d] + 0.2 * s * OBJECT_DIR[obj][d] + 0.1 * gx * OBJECT_DIR[obj][5 - d]
  swing_d = 0.125 * (gy * VERB_DIR[verb][5 - d] + s * OBJECT_DIR[obj][d])
  x[t, d] = base_d + swing_d * cos(pi * (2t + 1) / (2T))          |x| <= 0.9 by construction
  x[t, 6] = GRIPPER[verb]                                          +-1
with s the standardized mean of the instruction's color channel(s), gx / gy the standardized right-minus-left
and bottom-minus-top brightness differences (all in [-1, 1]). The verb sets direction and gripper, the color
says which image channel scales the motion, the object shapes it. The time profile is a constant plus FAST's
first DCT basis function (a half cosine), so a chunk has non-zero DCT coefficients only at k = 0 and k = 1 and
its FAST tokens stay regular; for T = 1 the swing term vanishes (cos(pi / 2) = 0).
"""

from __future__ import annotations

import itertools

import numpy as np
import PIL.Image

from nora_edge import names
from nora_edge.errors import InputError

VERBS = ("pick up", "push", "lift", "slide")
COLORS = ("red", "green", "blue", "yellow")
OBJECTS = ("block", "cup", "bowl")
TEMPLATES = (
    "{verb} the {color} {obj}",
    "{verb} the {obj} that is {color}",
    "please {verb} the {color} {obj}",
)

VERB_DIR = {
    "pick up": np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.5]),
    "push": np.array([1.0, 0.0, -0.5, 0.0, 0.5, 0.0]),
    "lift": np.array([0.0, 0.5, 1.0, -0.5, 0.0, 0.0]),
    "slide": np.array([-0.5, 1.0, 0.0, 0.0, -0.5, 0.0]),
}
GRIPPER = {"pick up": 1.0, "push": -1.0, "lift": 1.0, "slide": -1.0}
COLOR_WEIGHTS = {
    "red": np.array([1.0, 0.0, 0.0]),
    "green": np.array([0.0, 1.0, 0.0]),
    "blue": np.array([0.0, 0.0, 1.0]),
    "yellow": np.array([0.5, 0.5, 0.0]),
}
OBJECT_DIR = {
    "block": np.array([1.0, -1.0, 0.5, 0.0, 0.5, -0.5]),
    "cup": np.array([-1.0, 0.5, 0.0, 1.0, -0.5, 0.5]),
    "bowl": np.array([0.5, 1.0, -1.0, -0.5, 0.0, 1.0]),
}
# standardization of image features, from random_rgb_image frames: channel means ~0.5 +- 0.06,
# half-image brightness differences ~0 +- 0.06
FEATURE_CENTER = np.array([0.5, 0.5, 0.5, 0.0, 0.0])
FEATURE_SCALE = np.array([0.1, 0.1, 0.1, 0.1, 0.1])


def instruction_list() -> list[str]:
    """Every instruction of the task (templates x verbs x colors x objects), in a fixed order."""
    return [
        t.format(verb=v, color=c, obj=o)
        for t, v, c, o in itertools.product(TEMPLATES, VERBS, COLORS, OBJECTS)
    ]


def parse_instruction(instruction: str) -> tuple[str, str, str]:
    """(verb, color, object) of an instruction from :func:`instruction_list`; InputError otherwise."""
    for t, v, c, o in itertools.product(TEMPLATES, VERBS, COLORS, OBJECTS):
        if t.format(verb=v, color=c, obj=o) == instruction:
            return v, c, o
    raise InputError(f"instruction {instruction!r} is not one of the synthetic task's templates")


def image_features(image: np.ndarray) -> np.ndarray:
    """(5,) features in [-1, 1]: standardized R, G, B means, right-minus-left and bottom-minus-top brightness.

    Computed on the 224x224 resize NORA feeds the model (Pillow default filter), so the target depends on
    exactly what the model sees.
    """
    if not (
        isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    ):
        raise InputError(f"image must be (H, W, 3) uint8, got {getattr(image, 'shape', type(image))}")
    size = names.IMAGE_SIZE
    resized = PIL.Image.fromarray(image).resize((size, size))
    img = np.asarray(resized, dtype=np.float64) / 255.0  # (224, 224, 3)
    gray = img.mean(-1)  # (224, 224)
    half = size // 2
    raw = np.array(
        [
            *img.mean((0, 1)),
            gray[:, half:].mean() - gray[:, :half].mean(),
            gray[half:].mean() - gray[:half].mean(),
        ]
    )
    return np.clip((raw - FEATURE_CENTER) / FEATURE_SCALE, -1.0, 1.0)


def target_chunk(features: np.ndarray, instruction: str, horizon: int) -> np.ndarray:
    """The normalized action chunk (T, 7) for ``features`` (from :func:`image_features`) and ``instruction``."""
    verb, color, obj = parse_instruction(instruction)
    feats = np.asarray(features, dtype=np.float64)
    if feats.shape != (5,):
        raise InputError(f"features must have shape (5,), got {feats.shape}")
    s = float(COLOR_WEIGHTS[color] @ feats[:3])
    gx, gy = float(feats[3]), float(feats[4])
    u, w = VERB_DIR[verb], OBJECT_DIR[obj]
    t = np.arange(horizon)
    profile = np.cos(np.pi * (2 * t + 1) / (2 * horizon))  # (T,), DCT-II basis k = 1
    base = 0.35 * u + 0.2 * s * w + 0.1 * gx * w[::-1]  # (6,)
    swing = 0.125 * (gy * u[::-1] + s * w)  # (6,)
    arm = np.clip(base[None, :] + profile[:, None] * swing[None, :], -0.9, 0.9)  # (T, 6), clip never binds
    grip = np.full((horizon, 1), GRIPPER[verb])  # (T, 1)
    return np.concatenate([arm, grip], axis=1)  # (T, 7)
