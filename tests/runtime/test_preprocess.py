"""Preprocessing parity: numpy port vs Pillow's resize and transformers' Qwen2-VL image processor (PIL backend)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from nora_edge.errors import InputError
from nora_edge.preprocess import ImageSpec, preprocess_image, resize_bicubic, vertical_first

NORA_PROCESSOR = dict(min_pixels=3136, max_pixels=12845056)


def hf_pixel_values(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NORA's path: PIL image, qwen-vl-utils resize to 224x224 (Pillow default filter), HF processor."""
    pil = Image.fromarray(image).convert("RGB").resize((224, 224))
    out = Qwen2VLImageProcessorPil(**NORA_PROCESSOR)(images=[pil], return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize(
    "shape", [(224, 224), (256, 256), (480, 640), (640, 480), (97, 31), (1, 1), (720, 1280), (2000, 3)]
)
def test_pixel_values_match_hf(shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ref, ref_grid = hf_pixel_values(image)
    pv, grid = preprocess_image(image)
    assert pv.dtype == np.float32 and pv.shape == ref.shape == (256, 1176)
    np.testing.assert_array_equal(grid, ref_grid)
    assert np.abs(pv - ref).max() <= 1e-5
    assert np.array_equal(pv, ref)  # the port is bit-exact, not just close


def test_smooth_image_matches_hf():
    """A natural-looking image (gradients + edges) exercises the clipping and rounding paths differently."""
    y, x = np.mgrid[0:300, 0:400]
    image = np.stack([(x * 255 // 399), (y * 255 // 299), ((x // 40 + y // 40) % 2) * 255], -1).astype(
        np.uint8
    )
    ref, _ = hf_pixel_values(image)
    assert np.array_equal(preprocess_image(image)[0], ref)


def test_resize_bit_exact_vs_pillow_random_shapes():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = rng.integers(1, 500, 2)
        oh, ow = rng.integers(1, 300, 2)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(image).resize((int(ow), int(oh)), Image.Resampling.BICUBIC))
        got = resize_bicubic(image, int(oh), int(ow))
        assert np.array_equal(got, ref), (h, w, oh, ow, vertical_first(h, w, oh, ow))


def test_integer_dtype_in_range_is_accepted():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess_image(image.astype(np.int64))[0], preprocess_image(image)[0])


def test_non_contiguous_view_is_accepted():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    view = image[::-1, ::2]
    np.testing.assert_array_equal(preprocess_image(view)[0], preprocess_image(np.ascontiguousarray(view))[0])


@pytest.mark.parametrize(
    ("image", "match"),
    [
        ([[[0, 0, 0]]], "numpy array"),
        (np.zeros((10, 10), np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((10, 10, 4), np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((3, 10, 10), np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((10, 10, 3), np.float32), "float32 is not accepted"),
        (np.full((10, 10, 3), np.nan, np.float32), "NaN or inf"),
        (np.full((10, 10, 3), np.inf, np.float64), "NaN or inf"),
        (np.full((10, 10, 3), 256, np.int32), "out of range"),
        (np.full((10, 10, 3), -1, np.int16), "out of range"),
        (np.zeros((10, 10, 3), bool), "bool is not accepted"),
    ],
)
def test_bad_images_raise_input_error(image, match):
    with pytest.raises(InputError, match=match):
        preprocess_image(image)


def test_image_spec_grid():
    assert ImageSpec().grid_thw() == (1, 16, 16)
    assert ImageSpec(resized_height=448, resized_width=224).grid_thw() == (1, 32, 16)
