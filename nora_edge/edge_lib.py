"""Loading libnora_edge (``kernels/src/edge``, ABI ``kernels/include/nora_edge.h``) with ctypes; its preprocessing.

Data flow:
  library: $NORA_EDGE_EDGE_LIB (explicit; an error when set but unloadable) | nora_edge/_native/libnora_edge_pre.so
  (shipped by ``pip install .``, see setup.py) | kernels/build/libnora_edge_pre.so (``make -C kernels cpu``, dev trees)
  --ctypes.CDLL, symbols declared--> the library handle, resolved once per process.
  :func:`preprocess`: RGB frame (H, W, 3) uint8 (rows may be padded: any row stride >= 3*W, pixels packed)
  + the final size and patch/normalization settings --nora_edge_preprocess (Pillow-exact bicubic, HF
  rescale/normalize, patchify)--> pixel_values (gh*gw, 3*tp*p*p) float32, image_grid_thw (1, 3) int64.

:mod:`nora_edge.preprocess` decides when this path applies (it mirrors the numpy path bit for bit) and falls back
to numpy, warning once (:func:`warn_unavailable`), when the library is missing. Call errors raise
:class:`~nora_edge.errors.InputError` (bad input: the C message names the value) or :class:`EdgeLibError`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from nora_edge.errors import InputError, NoraEdgeError
from nora_edge.native_loader import NativeLibrary, open_library

ENV_LIB = "NORA_EDGE_EDGE_LIB"
LIB_NAME = "libnora_edge_pre.so"
ERR_INPUT = 1  # NORA_EDGE_ERR_INPUT
ERR_NOMEM = 7  # NORA_EDGE_ERR_NOMEM


class EdgeLibError(NoraEdgeError):
    """libnora_edge is unavailable, or a call failed for a reason other than its input (memory)."""


class EdgeLibUnavailableWarning(RuntimeWarning):
    """libnora_edge could not be loaded; the numpy preprocessing runs instead (same values, slower)."""


class ImageSpecC(ctypes.Structure):
    """``nora_edge_image_spec`` (nora_edge.h)."""

    _fields_ = [
        ("height", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("patch_size", ctypes.c_int32),
        ("temporal_patch_size", ctypes.c_int32),
        ("merge_size", ctypes.c_int32),
        ("mean", ctypes.c_float * 3),
        ("std", ctypes.c_float * 3),
    ]


def _try_load(path: Path) -> tuple[ctypes.CDLL | None, str]:
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    spec_p = ctypes.POINTER(ImageSpecC)
    return open_library(
        path,
        {
            "nora_edge_last_error": (ctypes.c_char_p, []),
            "nora_edge_pixel_values_size": (sz, [spec_p]),
            "nora_edge_preprocess": (
                ctypes.c_int,
                [vp, ctypes.c_int32, ctypes.c_int32, sz, spec_p, vp, sz, vp],
            ),
        },
    )


_LIB = NativeLibrary(
    LIB_NAME, ENV_LIB, _try_load, "the numpy image preprocessing (same values)", EdgeLibUnavailableWarning,
    EdgeLibError,
)  # fmt: skip
PACKAGED_LIB, REPO_LIB = _LIB.packaged, _LIB.repo
reload = _LIB.reload  # tests and tools that build the library elsewhere: reload(path) / reload()
available = _LIB.available  # True when libnora_edge loaded and exports the preprocessing functions
unavailable_reason = _LIB.unavailable_reason
library_path = _LIB.library_path
explicitly_requested = _LIB.explicitly_requested  # $NORA_EDGE_EDGE_LIB names it: a load failure is an error
warn_unavailable = _LIB.warn_unavailable
_lib = _LIB.handle


def _raise(lib: ctypes.CDLL, rc: int) -> None:
    msg = f"{(lib.nora_edge_last_error() or b'').decode(errors='replace')} (error {rc})"
    if rc == ERR_INPUT:
        raise InputError(msg)
    if rc == ERR_NOMEM:
        raise MemoryError(msg)
    raise EdgeLibError(msg)


def make_spec(
    height: int,
    width: int,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> ImageSpecC:
    """A C spec; mean/std are rounded to float32 as numpy's ``np.asarray(..., np.float32)`` does.

    Raises:
        InputError: a size outside int32 or not 3 mean/std values.
    """
    sizes = (height, width, patch_size, temporal_patch_size, merge_size)
    if any(not -(2**31) <= int(v) < 2**31 for v in sizes) or len(mean) != 3 or len(std) != 3:
        raise InputError(
            f"image spec sizes {sizes} / mean {mean} / std {std} do not fit nora_edge_image_spec"
        )
    m32, s32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ImageSpecC(*(int(v) for v in sizes), (ctypes.c_float * 3)(*m32), (ctypes.c_float * 3)(*s32))


def pixel_values_size(spec: ImageSpecC) -> int:
    """Floats ``nora_edge_preprocess`` writes for ``spec``; 0 when the library refuses the spec."""
    return int(_lib().nora_edge_pixel_values_size(ctypes.byref(spec)))


def spec_error(spec: ImageSpecC) -> str:
    """Why the library refuses ``spec`` ("" when it accepts it)."""
    lib = _lib()
    if lib.nora_edge_pixel_values_size(ctypes.byref(spec)):
        return ""
    return (lib.nora_edge_last_error() or b"").decode(errors="replace")


def preprocess(frame: np.ndarray, spec: ImageSpecC) -> tuple[np.ndarray, np.ndarray]:
    """``nora_edge_preprocess`` on one frame.

    Args:
        frame: (H, W, 3) uint8; pixels packed (strides (s, 3, 1), s >= 3*W) or it is copied contiguous first.
        spec: the final size and patch/normalization settings (:func:`make_spec`).

    Returns:
        pixel_values: (gh*gw, 3*tp*p*p) float32.
        image_grid_thw: (1, 3) int64, [[1, gh, gw]].

    Raises:
        InputError: a bad frame or spec (the C message names the value).
        EdgeLibError: the library is unavailable.
        MemoryError: the library could not allocate its scratch buffers.
    """
    lib = _lib()
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise InputError(f"frame must be a (H, W, 3) uint8 array, got {getattr(frame, 'shape', type(frame))}")
    s0, s1, s2 = frame.strides
    if not (s2 == 1 and s1 == 3 and s0 >= 3 * frame.shape[1]):
        frame = np.ascontiguousarray(frame)
        s0 = frame.strides[0]
    n = lib.nora_edge_pixel_values_size(ctypes.byref(spec))
    if n == 0:
        _raise(lib, ERR_INPUT)
    row = 3 * spec.temporal_patch_size * spec.patch_size * spec.patch_size
    out = np.empty((n // row, row), np.float32)  # (gh*gw, 3*tp*p*p)
    grid = np.empty((1, 3), np.int64)
    h, w = frame.shape[:2]
    rc = lib.nora_edge_preprocess(
        frame.ctypes.data, h, w, s0, ctypes.byref(spec), out.ctypes.data, out.size, grid.ctypes.data
    )
    if rc != 0:
        _raise(lib, rc)
    return out, grid
