"""Image preprocessing for the NORA vision graph, in numpy (no Pillow, no torch).

Data flow (NORA's path, reproduced bit-for-bit):
  image (H, W, 3) uint8
  -> qwen-vl-utils ``fetch_image``: resize to the requested size (224x224) rounded to a multiple of 28, with
     Pillow's default filter for RGB (bicubic)                                   -> (h, w, 3) uint8
  -> ``Qwen2VLImageProcessor`` (the PIL/numpy backend): its own ``smart_resize`` (a no-op for 224x224),
     rescale by 1/255 (float64, then float32), normalize with the CLIP mean/std (float32)
  -> patchify: duplicate the frame ``temporal_patch_size`` times and order patches in 2x2 merge groups
                                                            -> pixel_values (gt*gh*gw, 3*2*14*14) float32
                                                               image_grid_thw (1, 3) int64

Two implementations of that flow, same values bit for bit: this module's numpy code (the reference and the
fallback) and libnora_edge's ``nora_edge_preprocess`` in C (:mod:`nora_edge.edge_lib`, ~9x faster on x86).
:func:`preprocess_image` picks the C one (``backend="auto"``) when the library loaded and the spec is one the C
function implements (one resize: the image processor's ``smart_resize`` keeps the ``fetch_image`` size, and
``rescale_factor`` is 1/255), else numpy; a missing library is warned about once.

Pillow's resampler (``libImaging/Resample.c``) is a separable filter: a horizontal and a vertical pass (in an
order that depends on the shapes, see :func:`vertical_first`), each with double-precision filter weights normalized per output pixel, converted to 22-bit fixed point, applied
with int32 accumulation and a uint8 clip after each pass. :func:`resize_bicubic` re-implements that arithmetic
(integer sums are exact, so the tap order is free).

Accepted input: a numpy array (H, W, 3) of dtype uint8, or any integer dtype whose values all lie in
[0, 255]. Floating-point images are rejected: [0, 1] versus [0, 255] cannot be told apart safely, and the
reference (a PIL image from a uint8 frame) is defined on uint8 only. Convert explicitly, e.g.
``(img * 255).round().astype(np.uint8)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from nora_edge import edge_lib, names
from nora_edge.errors import BundleError, InputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PRECISION_BITS = 22  # Pillow: 32 - 8 - 2
_BICUBIC_SUPPORT = 2.0
_MAX_SIDE = 16384  # far beyond any camera; guards against absurd allocations (NE_MAX_SIDE in the C code)
BACKENDS = ("auto", "c", "numpy")


@dataclass(frozen=True)
class ImageSpec:
    """How frames are turned into ``pixel_values`` (the bundle manifest's ``image`` section).

    Attributes:
        resized_height: the height asked of ``fetch_image`` (NORA: 224).
        resized_width: the width asked of ``fetch_image`` (NORA: 224).
        patch_size: ViT patch side (14).
        temporal_patch_size: frames per temporal patch (2; a still image is duplicated).
        merge_size: spatial merge of the patch merger (2).
        min_pixels: the image processor's ``min_pixels`` (size.shortest_edge).
        max_pixels: the image processor's ``max_pixels`` (size.longest_edge).
        rescale_factor: multiplier applied to uint8 values (1/255).
        image_mean: per-channel mean (CLIP).
        image_std: per-channel std (CLIP).
    """

    resized_height: int = names.IMAGE_SIZE
    resized_width: int = names.IMAGE_SIZE
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    rescale_factor: float = 1.0 / 255.0
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def factor(self) -> int:
        """Side multiple both resizes round to (patch_size * merge_size = 28)."""
        return self.patch_size * self.merge_size

    def output_size(self) -> tuple[int, int]:
        """(height, width) of the frame fed to the patchifier (both resizes applied)."""
        h, w = smart_resize(
            self.resized_height, self.resized_width, self.factor, 4 * 28 * 28, 16384 * 28 * 28
        )
        return smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)

    def grid_thw(self) -> tuple[int, int, int]:
        """(grid_t, grid_h, grid_w) in patches for one still image."""
        h, w = self.output_size()
        return 1, h // self.patch_size, w // self.patch_size

    @classmethod
    def from_manifest(cls, data: dict, source: str = "manifest.json: image") -> ImageSpec:
        """Build from the bundle manifest's ``image`` section.

        Fields: the :class:`ImageSpec` field names (``resized_height``, ``resized_width``, ``patch_size``,
        ``temporal_patch_size``, ``merge_size``, ``min_pixels``, ``max_pixels``, ``rescale_factor``,
        ``image_mean``, ``image_std``); ``size`` (int, [h, w] or {"height", "width"}) may stand for the two
        resized_* fields; the flags ``do_rescale``/``do_normalize`` (must be true) and ``resample`` (must be
        3 = bicubic) may be present, as those are the only pipeline this module implements. Missing fields
        keep NORA's defaults.

        Raises:
            BundleError: an unknown field, a wrong type, or a pipeline option this runtime does not implement.
        """
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected an object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__) | {"size", "do_rescale", "do_normalize", "resample"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"{source}: unknown field(s) {unknown}; this runtime reads {sorted(known)}")
        for flag in ("do_rescale", "do_normalize"):
            if data.get(flag, True) is not True:
                raise BundleError(f"{source}: field '{flag}' = {data[flag]!r}; only true is implemented")
        if data.get("resample", 3) != 3:
            raise BundleError(
                f"{source}: field 'resample' = {data['resample']!r}; only 3 (bicubic) is implemented"
            )
        kw: dict = {}
        if "size" in data:
            kw["resized_height"], kw["resized_width"] = _parse_size(data["size"], source)
        ints = ("resized_height", "resized_width", "patch_size", "temporal_patch_size", "merge_size")
        for key in (*ints, "min_pixels", "max_pixels"):
            if key in data:
                value = data[key]
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise BundleError(f"{source}: field '{key}' = {value!r} must be a positive int")
                kw[key] = value
        for key in ("image_mean", "image_std"):
            if key in data:
                value = data[key]
                if not isinstance(value, list | tuple) or len(value) != 3:
                    raise BundleError(f"{source}: field '{key}' = {value!r} must be 3 numbers")
                kw[key] = tuple(float(v) for v in value)
        if "rescale_factor" in data:
            kw["rescale_factor"] = float(data["rescale_factor"])
        return cls(**kw)


def _parse_size(size: object, source: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, list | tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    if isinstance(size, dict) and {"height", "width"} <= set(size):
        return int(size["height"]), int(size["width"])
    raise BundleError(f"{source}: field 'size' = {size!r}; expected an int, [h, w] or {{height, width}}")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's size rule: sides divisible by ``factor``, area in [min_pixels, max_pixels], aspect kept.

    Raises:
        InputError: aspect ratio above 200 (the Qwen processors refuse it too).
    """
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def validate_image(image: object) -> np.ndarray:
    """Check a camera frame and return it as a C-contiguous (H, W, 3) uint8 array.

    Raises:
        InputError: not a numpy array, not (H, W, 3), empty, a float/bool dtype, NaN/inf, or integer values
            outside [0, 255]. The message names the field and the offending value.
    """
    return np.ascontiguousarray(_as_uint8(image))


def _as_uint8(image: object) -> np.ndarray:
    """:func:`validate_image` without the contiguous copy of a uint8 view (the C path reads strided rows)."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image must have shape (H, W, 3) (RGB, channels last), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"image is empty: shape {image.shape}")
    if max(image.shape[:2]) > _MAX_SIDE:
        raise InputError(f"image side {max(image.shape[:2])} exceeds {_MAX_SIDE} pixels: shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise InputError(f"image ({image.dtype}) contains NaN or inf")
        raise InputError(
            f"image dtype {image.dtype} is not accepted (range [0,1] vs [0,255] is ambiguous); "
            "pass uint8, e.g. (img * 255).round().astype(np.uint8)"
        )
    if np.issubdtype(image.dtype, np.integer):
        lo, hi = int(image.min()), int(image.max())
        if lo < 0 or hi > 255:
            raise InputError(f"image ({image.dtype}) values out of range [0, 255]: min {lo}, max {hi}")
        return np.ascontiguousarray(image, dtype=np.uint8)
    raise InputError(f"image dtype {image.dtype} is not accepted; pass uint8 (H, W, 3)")


@functools.lru_cache(maxsize=32)
def bicubic_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's fixed-point bicubic taps for one axis (``precompute_coeffs`` + ``normalize_coeffs_8bpc``).

    Args:
        in_size: source length along the axis.
        out_size: target length.

    Returns:
        index: (out_size, K) int64 source index of each tap (clamped into range; unused taps weigh 0).
        weight: (out_size, K) int32 weights in units of 2**-22.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale  # (O,)
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # (O,)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin  # (O,) tap count
    taps = np.arange(ksize)  # (K,)
    used = taps[None, :] < xmax[:, None]  # (O, K)
    x = ((xmin[:, None] + taps[None, :]) - center[:, None] + 0.5) * (1.0 / filterscale)  # (O, K)
    w = np.where(used, _bicubic(x), 0.0)
    ww = np.zeros(out_size)
    for k in range(ksize):  # sequential sum, the order Pillow's loop uses
        ww = ww + w[:, k]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    scaled = w * float(1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)  # C's (int)(v +- 0.5)
    index = np.minimum(xmin[:, None] + taps[None, :], in_size - 1)  # (O, K)
    index.setflags(write=False)  # cached: shared between calls
    fixed.setflags(write=False)
    return index, fixed


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5, evaluated exactly as Pillow's ``bicubic_filter``."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _apply_pass(taps: tuple[np.ndarray, np.ndarray], image: np.ndarray, axis: int) -> np.ndarray:
    """One separable pass in Pillow's int32 fixed point along ``axis`` of a (H, W, 3) uint8 image."""
    index, weight = taps
    src = np.ascontiguousarray(np.moveaxis(image, axis, 0), dtype=np.int32)  # (I, other, 3)
    acc = np.full(
        (index.shape[0], *src.shape[1:]), 1 << (_PRECISION_BITS - 1), dtype=np.int32
    )  # (O, other, 3)
    tap = np.empty_like(acc)
    for k in range(index.shape[1]):  # the sum is exact in int32, so tap order does not matter
        np.take(src, index[:, k], axis=0, out=tap)
        tap *= weight[:, k, None, None]
        acc += tap
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)  # arithmetic shift = floor, like clip8
    return np.moveaxis(out, 0, axis)


def vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Pillow 13's pass order: vertical first when the height shrinks by more than twice what the width does.

    (Read from Pillow 13.0.0 ``ImagingResampleInner``; earlier Pillow always ran the horizontal pass first.
    The two orders round differently, so the order is part of the bit-exact contract.)
    """
    return (in_h - out_h) > 0 and (in_h - out_h) > (in_w - out_w) * 2


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow ``Image.resize((width, height), BICUBIC)`` of an RGB uint8 image, bit-exact.

    Args:
        image: (H, W, 3) uint8.
        height: target rows.
        width: target columns.

    Returns:
        (height, width, 3) uint8. Same-size input is returned as a copy (Pillow does the same).
    """
    in_h, in_w = image.shape[:2]
    passes = [(1, in_w, width), (0, in_h, height)]  # (axis, in, out), horizontal first by default
    if vertical_first(in_h, in_w, height, width):
        passes.reverse()
    out = image
    for axis, n_in, n_out in passes:
        if n_in != n_out:
            out = _apply_pass(bicubic_weights(n_in, n_out), out, axis=axis)
    return out.copy() if out is image else out


def patchify(image: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Cut a normalized (3, h, w) frame into Qwen2-VL's flattened patch rows.

    Args:
        image: (C, h, w) float32, h and w multiples of ``spec.factor``.
        spec: patch/merge sizes.

    Returns:
        (gh*gw, C*tp*p*p) float32: rows in merge-group order (each 2x2 group of patches contiguous), each row
        laid out (C, tp, p, p) with the frame repeated along tp.
    """
    c, h, w = image.shape
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p)  # (C, gh/m, m, p, gw/m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))  # (gh/m, gw/m, m, m, C, tp, p, p)
    return np.ascontiguousarray(x.reshape(gh * gw, c * tp * p * p), dtype=np.float32)  # (gh*gw, C*tp*p*p)


def c_path_unsupported(spec: ImageSpec) -> str:
    """Why ``nora_edge_preprocess`` cannot reproduce ``spec`` ("" when it can; the library's own checks aside).

    The C function resizes once, to its spec's height x width, and rescales by 1/255; the numpy path resizes a
    second time when the image processor's ``smart_resize`` (min/max_pixels) moves the ``fetch_image`` size.
    """
    h, w = smart_resize(spec.resized_height, spec.resized_width, spec.factor, 4 * 28 * 28, 16384 * 28 * 28)
    h2, w2 = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
    if (h2, w2) != (h, w):
        return f"the image processor resizes {h}x{w} again to {h2}x{w2} (min/max_pixels); C resizes once"
    if spec.rescale_factor != 1.0 / 255.0:
        return f"rescale_factor {spec.rescale_factor!r} is not 1/255, the C function's"
    return ""


def _preprocess_c(frame: np.ndarray, spec: ImageSpec, strict: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """The C path, or None where it does not apply (``strict``: raise instead)."""
    if not edge_lib.available():
        if strict or edge_lib.explicitly_requested():
            raise edge_lib.EdgeLibError(f"libnora_edge unavailable: {edge_lib.unavailable_reason()}")
        edge_lib.warn_unavailable()
        return None
    why = c_path_unsupported(spec)
    if not why:
        h, w = spec.output_size()
        cspec = edge_lib.make_spec(
            h, w, spec.patch_size, spec.temporal_patch_size, spec.merge_size, spec.image_mean, spec.image_std
        )
        why = edge_lib.spec_error(cspec)
        if not why:
            return edge_lib.preprocess(frame, cspec)
    if strict:
        raise InputError(f"preprocess backend 'c' cannot run this image spec: {why}")
    return None


def preprocess_image(
    image: object, spec: ImageSpec | None = None, *, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Turn one camera frame into the vision graph's inputs, exactly as NORA's HF pipeline does.

    Args:
        image: (H, W, 3) uint8 RGB frame (see the module docstring for accepted dtypes).
        spec: the bundle's image settings; default NORA's (224x224, CLIP mean/std).
        backend: "auto" (libnora_edge's C function where it applies, else numpy; one warning when the
            library is missing), "c" (the C function or an error) or "numpy". The values are identical.

    Returns:
        pixel_values: (gt*gh*gw, 3*tp*p*p) float32, (256, 1176) for NORA.
        image_grid_thw: (1, 3) int64, [[1, 16, 16]] for NORA.

    Raises:
        InputError: the frame is invalid (see :func:`validate_image`); backend "c" with a spec it cannot run.
        EdgeLibError: backend "c" (or $NORA_EDGE_EDGE_LIB set) and the library did not load.
    """
    spec = spec or ImageSpec()
    if backend not in BACKENDS:
        raise InputError(f"preprocess backend {backend!r} is not one of {BACKENDS}")
    frame = _as_uint8(image)
    spec.output_size()  # the spec's own errors (aspect ratio) first, whichever path runs
    if backend != "numpy":
        done = _preprocess_c(frame, spec, strict=backend == "c")
        if done is not None:
            return done
    frame = np.ascontiguousarray(frame)
    # qwen-vl-utils fetch_image: smart_resize of the requested size, then PIL's default (bicubic) resize
    h, w = smart_resize(spec.resized_height, spec.resized_width, spec.factor, 4 * 28 * 28, 16384 * 28 * 28)
    frame = resize_bicubic(frame, h, w)
    # the image processor's own resize (identity for NORA's 224x224)
    h2, w2 = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
    frame = resize_bicubic(frame, h2, w2)
    x = (frame.astype(np.float64) * spec.rescale_factor).astype(np.float32)  # (h, w, 3), HF rescale
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    x = ((x - mean) / std).transpose(2, 0, 1)  # (3, h, w) float32, HF normalize
    pixel_values = patchify(x, spec)
    _, gh, gw = spec.grid_thw()
    return pixel_values, np.array([[1, gh, gw]], dtype=np.int64)
