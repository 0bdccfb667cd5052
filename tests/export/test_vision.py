"""Vision index tensors vs transformers' own functions; exported vision graphs vs HF ``get_image_features``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from nora_edge import bundle
from nora_edge.errors import InputError
from nora_edge.vision_index import compute_vision_index, segment_ids

GRIDS = [
    [[1, 16, 16]],  # 224x224: windows tile exactly (HF pads a whole empty window)
    [[1, 12, 20]],  # non-square
    [[1, 18, 22]],  # ragged windows on both axes
    [[1, 2, 2]],  # smaller than one window
    [[1, 16, 34]],  # ragged on one axis only
    [[2, 8, 8], [1, 10, 6]],  # two entries, one with two frames
]


def hf_index(grid, merge=2, window=112, patch=14):
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    g = torch.tensor(grid)
    widx, cu_w = get_vision_window_index(g, merge, window, patch)
    return (
        get_vision_position_ids(g, merge).numpy(),
        widx.numpy(),
        cu_w.numpy(),
        get_vision_cu_seqlens(g).numpy(),
    )


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_index_matches_transformers(grid):
    pos, widx, cu_w, cu = hf_index(grid)
    idx = compute_vision_index(np.array(grid), spatial_merge_size=2, window_size=112, patch_size=14)
    np.testing.assert_array_equal(idx.rotary_pos_ids, pos)
    np.testing.assert_array_equal(idx.window_index, widx)
    np.testing.assert_array_equal(idx.cu_window_seqlens, cu_w)
    np.testing.assert_array_equal(idx.cu_seqlens, cu)
    np.testing.assert_array_equal(idx.window_index[idx.reverse_window_index], np.arange(idx.num_merged))


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_segments_and_patch_permutation(grid):
    idx = compute_vision_index(np.array(grid), spatial_merge_size=2, window_size=112, patch_size=14)
    n = idx.num_patches
    # segment ids: constant inside each [cu[k], cu[k+1]) and distinct across segments
    for cu, seg in ((idx.cu_window_seqlens, idx.window_segment_ids), (idx.cu_seqlens, idx.full_segment_ids)):
        for k in range(len(cu) - 1):
            assert set(seg[cu[k] : cu[k + 1]].tolist()) == {k}
        assert seg.shape == (n,)
    # the patch permutation moves whole merge units, as HF's reshape(-1, 4, D)[window_index] does
    x = np.arange(n * 3).reshape(n, 3)
    hf = x.reshape(n // 4, 4, 3)[idx.window_index].reshape(n, 3)
    np.testing.assert_array_equal(x[idx.patch_window_index], hf)
    np.testing.assert_array_equal(idx.patch_window_index[idx.patch_reverse_index], np.arange(n))


@pytest.mark.parametrize(
    "grid",
    [[[1, 15, 16]], [[1, 16]], [[0, 16, 16]], [[1.0, 16.0, 16.0]], np.zeros((0, 3), np.int64)],
    ids=["odd", "rank", "zero", "float", "empty"],
)
def test_bad_grid_raises(grid):
    with pytest.raises(InputError):
        compute_vision_index(np.array(grid), spatial_merge_size=2, window_size=112, patch_size=14)


def test_bad_window_and_segments_raise():
    with pytest.raises(InputError, match="window_size"):
        compute_vision_index(np.array([[1, 16, 16]]), spatial_merge_size=2, window_size=20, patch_size=14)
    with pytest.raises(InputError, match="cu_seqlens"):
        segment_ids(np.array([0, 5, 5, 8]), 8)


def hf_features(model, pv: np.ndarray, grid) -> np.ndarray:
    with torch.inference_mode():
        return model.get_image_features(torch.from_numpy(pv), torch.tensor([grid])).pooler_output[0].numpy()


def rel_err(out, ref) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def random_pixels(grid, seed=7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((int(np.prod(grid)), 1176)).astype(np.float32)


@pytest.mark.parametrize("grid", [(1, 16, 16), (1, 12, 20), (1, 18, 22), (1, 4, 4)], ids=str)
def test_dynamic_graph_matches_hf(tiny_model, vision_dynamic_onnx, grid):
    from nora_edge.export.validate import run_vision, session

    path, spec = vision_dynamic_onnx
    pv = random_pixels(grid)
    out = run_vision(session(path), spec, pv, grid)
    ref = hf_features(tiny_model, pv, grid)
    assert (
        out.shape == ref.shape == (int(np.prod(grid)) // 4, tiny_model.config.vision_config.out_hidden_size)
    )
    assert rel_err(out, ref) <= 1e-4


def test_specialised_graph_matches_hf(tiny_model, tiny_bundle):
    from nora_edge.errors import ExportError
    from nora_edge.export.validate import run_vision, session

    b = bundle.Bundle.load(tiny_bundle)
    spec = b.components["vision"]
    assert spec.input_names == [bundle.PIXEL_VALUES]
    assert spec.meta["grid_thw"] == [1, 16, 16]
    sess = session(b.file(spec.file))
    pv = random_pixels((1, 16, 16), seed=11)
    assert rel_err(run_vision(sess, spec, pv, (1, 16, 16)), hf_features(tiny_model, pv, (1, 16, 16))) <= 1e-4
    with pytest.raises(ExportError, match="specialised"):
        run_vision(sess, spec, random_pixels((1, 12, 20)), (1, 12, 20))


def test_graph_interface_and_ops(vision_dynamic_onnx):
    path, spec = vision_dynamic_onnx
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "Gemm" not in ops and "MatMul" in ops
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input
    }
    assert dims[bundle.PIXEL_VALUES] == ["patches", 1176]
    assert dims[bundle.WINDOW_INDEX] == ["patches"]
    out = model.graph.output[0]
    assert out.name == bundle.IMAGE_EMBEDS
    assert out.type.tensor_type.shape.dim[0].dim_param == "merged"
    assert spec.input_names == [i.name for i in model.graph.input]
