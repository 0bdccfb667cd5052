"""Host-side index tensors of the Qwen2.5-VL vision tower (numpy only; export stage and runtime share it).

Data flow: image_grid_thw (n_images, 3) + vision config (patch_size, spatial_merge_size, window_size)
-> rotary (h, w) position ids (patches, 2) -> window permutation over merge units (merged,) and its inverse
-> cumulative window / frame boundaries (HF ``cu_window_seqlens`` / ``cu_seqlens``) -> per-patch segment ids
in window order (equal ids = same attention block) -> patch-level permutations the vision graph gathers with.

Semantics follow transformers' ``get_vision_position_ids`` and ``get_vision_window_index`` (transformers 5.x
``vision_utils.py``) exactly, including ragged windows when the merged grid is not a multiple of the window
(``window_size // spatial_merge_size // patch_size`` merge units per side) and the zero-length windows HF
drops with ``unique_consecutive``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nora_edge import bundle
from nora_edge.errors import InputError


def as_grid(grid_thw: object) -> np.ndarray:
    """Validate image_grid_thw -> int64 (n, 3) of positive (t, h, w)."""
    grid = np.asarray(grid_thw)
    if grid.ndim == 1:
        grid = grid[None, :]
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise InputError(f"image_grid_thw must have shape (n, 3), got {np.asarray(grid_thw).shape}")
    if not np.issubdtype(grid.dtype, np.integer) or (grid <= 0).any():
        raise InputError(f"image_grid_thw must hold positive integers, got {grid.tolist()}")
    return grid.astype(np.int64)


def rotary_position_ids(grid_thw: object, spatial_merge_size: int) -> np.ndarray:
    """(h, w) rotary position of every patch, patches in merge-block order (HF order, before windowing).

    Args:
        grid_thw: (n, 3) temporal, height, width in patches per image.
        spatial_merge_size: merge block side m (h and w must be multiples of it).

    Returns:
        int64 (patches, 2); patches = sum(t * h * w).
    """
    m = int(spatial_merge_size)
    out = []
    for t, h, w in as_grid(grid_thw).tolist():
        if h % m or w % m:
            raise InputError(f"grid (t={t}, h={h}, w={w}) is not a multiple of spatial_merge_size {m}")
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w) each
        hpos = hpos.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # (h*w,)
        wpos = wpos.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))  # (t*h*w, 2)
    return np.concatenate(out, axis=0).astype(np.int64)


def merger_window_size(spatial_merge_size: int, window_size: int, patch_size: int) -> int:
    """Window side in merge units (HF ``vit_merger_window_size``); 4 for Qwen2.5-VL (112 // 2 // 14)."""
    vws = int(window_size) // int(spatial_merge_size) // int(patch_size)
    if vws <= 0:
        raise InputError(
            f"window_size {window_size} is smaller than spatial_merge_size * patch_size "
            f"= {spatial_merge_size * patch_size}"
        )
    return vws


def window_index(
    grid_thw: object, spatial_merge_size: int, window_size: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Window permutation over merge units and cumulative window boundaries (in patches).

    Returns:
        window_index: int64 (merged,), position k of the windowed sequence holds merge unit window_index[k].
        cu_window_seqlens: int32 (n_windows + 1,), patch offsets of the windows (zero-length windows dropped).
    """
    m = int(spatial_merge_size)
    unit = m * m
    vws = merger_window_size(m, window_size, patch_size)
    index_parts = []
    cu = [0]
    offset = 0
    for t, h, w in as_grid(grid_thw).tolist():
        if h % m or w % m:
            raise InputError(f"grid (t={t}, h={h}, w={w}) is not a multiple of spatial_merge_size {m}")
        lh, lw = h // m, w // m
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        pad_h = vws - lh % vws  # HF pads a full extra window when lh % vws == 0; it ends up empty
        pad_w = vws - lw % vws
        nwh, nww = (lh + pad_h) // vws, (lw + pad_w) // vws
        padded = np.full((t, lh + pad_h, lw + pad_w), -100, dtype=np.int64)
        padded[:, :lh, :lw] = index
        padded = padded.reshape(t, nwh, vws, nww, vws).transpose(0, 1, 3, 2, 4)  # (t, nwh, nww, vws, vws)
        padded = padded.reshape(t, nwh * nww, vws, vws)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)  # (t * n_windows,)
        flat = padded.reshape(-1)
        index_parts.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu_arr = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # unique_consecutive
    return np.concatenate(index_parts).astype(np.int64), cu_arr[keep].astype(np.int32)


def frame_seqlens(grid_thw: object) -> np.ndarray:
    """HF ``cu_seqlens`` for full attention: int32 (n_frames + 1,), one segment of h*w patches per frame."""
    grid = as_grid(grid_thw)
    lens = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])  # (n_frames,)
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def segment_ids(cu_seqlens: np.ndarray, n: int) -> np.ndarray:
    """int64 (n,): index of the [cu[k], cu[k+1]) segment that holds each position."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if cu[0] != 0 or cu[-1] != n or np.any(np.diff(cu) <= 0):
        raise InputError(f"cu_seqlens must rise strictly from 0 to {n}, got {cu.tolist()[:8]}...")
    return (np.searchsorted(cu[1:], np.arange(n), side="right")).astype(np.int64)


def unit_to_patch_index(unit_index: np.ndarray, unit: int) -> np.ndarray:
    """Expand a permutation of merge units (merged,) to one of patches (merged * unit,)."""
    idx = np.asarray(unit_index, dtype=np.int64)
    return (idx[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)  # (merged, unit) -> (patches,)


@dataclass(frozen=True)
class VisionIndex:
    """Every host-computed index tensor of one vision forward.

    Attributes:
        grid_thw: int64 (n, 3).
        rotary_pos_ids: int64 (patches, 2), HF order.
        window_index: int64 (merged,), HF ``window_index``.
        reverse_window_index: int64 (merged,), argsort(window_index).
        cu_window_seqlens: int32 (n_windows + 1,), HF semantics.
        cu_seqlens: int32 (n_frames + 1,), HF semantics.
        window_segment_ids: int64 (patches,), window of each patch in window order.
        full_segment_ids: int64 (patches,), frame of each patch in window order.
        patch_window_index: int64 (patches,), window order -> patch (unit permutation expanded).
        patch_reverse_index: int64 (patches,), its inverse.
    """

    grid_thw: np.ndarray
    rotary_pos_ids: np.ndarray
    window_index: np.ndarray
    reverse_window_index: np.ndarray
    cu_window_seqlens: np.ndarray
    cu_seqlens: np.ndarray
    window_segment_ids: np.ndarray
    full_segment_ids: np.ndarray
    patch_window_index: np.ndarray
    patch_reverse_index: np.ndarray

    @property
    def num_patches(self) -> int:
        return int(self.rotary_pos_ids.shape[0])

    @property
    def num_merged(self) -> int:
        """Number of image tokens (image_pad ids) the vision output fills."""
        return int(self.window_index.shape[0])

    def graph_feeds(self) -> dict[str, np.ndarray]:
        """The index inputs of a dynamic vision graph, by tensor name (``nora_edge.bundle`` constants)."""
        return {
            bundle.ROTARY_POS_IDS: self.rotary_pos_ids,
            bundle.WINDOW_INDEX: self.patch_window_index,
            bundle.REVERSE_WINDOW_INDEX: self.patch_reverse_index,
            bundle.WINDOW_SEGMENT_IDS: self.window_segment_ids,
            bundle.FULL_SEGMENT_IDS: self.full_segment_ids,
        }


def compute_vision_index(
    grid_thw: object, *, spatial_merge_size: int, window_size: int, patch_size: int
) -> VisionIndex:
    """Compute every host index tensor for ``grid_thw`` (see :class:`VisionIndex`)."""
    grid = as_grid(grid_thw)
    unit = int(spatial_merge_size) ** 2
    pos = rotary_position_ids(grid, spatial_merge_size)
    widx, cu_w = window_index(grid, spatial_merge_size, window_size, patch_size)
    n = pos.shape[0]
    cu_full = frame_seqlens(grid)
    patch_widx = unit_to_patch_index(widx, unit)
    return VisionIndex(
        grid_thw=grid,
        rotary_pos_ids=pos,
        window_index=widx,
        reverse_window_index=np.argsort(widx, kind="stable").astype(np.int64),
        cu_window_seqlens=cu_w,
        cu_seqlens=cu_full,
        window_segment_ids=segment_ids(cu_w, n),
        full_segment_ids=segment_ids(cu_full, n),
        patch_window_index=patch_widx,
        patch_reverse_index=np.argsort(patch_widx, kind="stable").astype(np.int64),
    )


def vision_index_from_config(grid_thw: object, vision_config: dict) -> VisionIndex:
    """:func:`compute_vision_index` with the parameters read from a ``vision_config`` dict."""
    for key in ("spatial_merge_size", "window_size", "patch_size"):
        if key not in vision_config:
            raise InputError(f"vision_config lacks field '{key}'")
    return compute_vision_index(
        grid_thw,
        spatial_merge_size=vision_config["spatial_merge_size"],
        window_size=vision_config["window_size"],
        patch_size=vision_config["patch_size"],
    )
