"""Export-friendly Qwen2.5-VL vision forward and its ONNX export.

Data flow: pixel_values (patches, C*Tp*P*P) --patch embed (the Conv3d as one MatMul)--> (patches, D)
--gather window_index (window order)--> blocks (RMSNorm, qkv, 2-D rotary, attention with an additive
block-diagonal mask built in-graph from segment ids: window segments, or frame segments in the
``fullatt_block_indexes`` blocks; SiLU MLP) --gather reverse_window_index (patch order)--> merger (RMSNorm,
(merged, m*m*D), Linear, GELU, Linear) --> image_embeds (merged, out_hidden).

The index tensors come from :mod:`nora_edge.vision_index` (host side); with ``specialise_224`` they are
folded into the graph as constants for the 224x224 grid (1, 16, 16) and the graph takes only pixel_values.
Every linear is written as ``x @ W_t + b`` so the graph holds MatMul + Add (ONNX Runtime's quantizers skip
Gemm). The math mirrors transformers' ``Qwen2_5_VisionTransformerPretrainedModel.forward``: the window
permutation is applied per merge unit, so undoing it per patch before the merger equals HF's undoing it per
merged token after the merger.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from nora_edge import bundle
from nora_edge.errors import ExportError
from nora_edge.vision_index import VisionIndex, compute_vision_index

SPECIALISED_GRID = (1, 16, 16)  # 224x224 with patch 14


def transposed(linear: nn.Linear) -> tuple[nn.Parameter, nn.Parameter | None]:
    """fp32 (in, out) weight and (out,) bias of a Linear, detached copies."""
    w = nn.Parameter(linear.weight.detach().float().t().contiguous(), requires_grad=False)
    b = (
        None
        if linear.bias is None
        else nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    )
    return w, b


class MatMulLinear(nn.Module):
    """``x @ w_t + b``: a Linear that exports as MatMul (+ Add), never Gemm."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.w_t, self.b = transposed(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.w_t)
        return y if self.b is None else y + self.b


class RMSNorm(nn.Module):
    """HF Qwen2RMSNorm in fp32: ``w * x / sqrt(mean(x^2) + eps)``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().float().clone(), requires_grad=False)
        self.eps = float(norm.variance_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def block_mask(seg: torch.Tensor) -> torch.Tensor:
    """Additive (1, S, S) mask: 0 where two positions share a segment id, float32 min elsewhere."""
    same = seg.unsqueeze(0) == seg.unsqueeze(1)  # (S, S)
    zero = torch.zeros((), dtype=torch.float32)
    neg = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
    return torch.where(same, zero, neg).unsqueeze(0)


class VisionBlock(nn.Module):
    """One Qwen2.5-VL vision block with an explicit additive attention mask."""

    def __init__(self, blk: nn.Module, num_heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(blk.norm1), RMSNorm(blk.norm2)
        self.qkv, self.proj = MatMulLinear(blk.attn.qkv), MatMulLinear(blk.attn.proj)
        self.gate, self.up = MatMulLinear(blk.mlp.gate_proj), MatMulLinear(blk.mlp.up_proj)
        self.down = MatMulLinear(blk.mlp.down_proj)
        self.act = blk.mlp.act_fn
        self.num_heads = num_heads
        self.scaling = float(blk.attn.scaling)

    def attention(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        s, d = x.shape
        qkv = (
            self.qkv(x).reshape(s, 3, self.num_heads, d // self.num_heads).permute(1, 2, 0, 3)
        )  # (3, H, S, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * cos + rotate_half(q) * sin  # cos/sin (1, S, hd)
        k = k * cos + rotate_half(k) * sin
        scores = torch.matmul(q, k.transpose(1, 2)) * self.scaling + mask  # (H, S, S)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (H, S, hd)
        return self.proj(out.transpose(0, 1).reshape(s, d))  # (S, D)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), cos, sin, mask)
        h = self.norm2(x)
        return x + self.down(self.act(self.gate(h)) * self.up(h))


class VisionForExport(nn.Module):
    """fp32 export wrapper over an HF ``model.visual`` (weights copied, transposed for MatMul).

    Args:
        visual: the HF vision tower.
        free_source: replace each HF block by Identity once copied (the tower is unusable afterwards).
    """

    def __init__(self, visual: nn.Module, *, free_source: bool = False) -> None:
        super().__init__()
        cfg = visual.config
        pe = visual.patch_embed.proj.weight.detach().float()  # (D, C, Tp, P, P)
        self.patch_w_t = nn.Parameter(pe.reshape(pe.shape[0], -1).t().contiguous(), requires_grad=False)
        self.register_buffer(
            "inv_freq", visual.rotary_pos_emb.inv_freq.detach().float().clone(), persistent=False
        )
        blocks = []
        for i in range(len(visual.blocks)):
            blocks.append(VisionBlock(visual.blocks[i], cfg.num_heads))
            if free_source:
                visual.blocks[i] = nn.Identity()  # keep peak memory near one fp32 copy of the tower
        self.blocks = nn.ModuleList(blocks)
        self.full_blocks = frozenset(int(i) for i in cfg.fullatt_block_indexes)
        self.ln_q = RMSNorm(visual.merger.ln_q)
        self.fc1, self.fc2 = MatMulLinear(visual.merger.mlp[0]), MatMulLinear(visual.merger.mlp[2])
        self.unit = int(cfg.spatial_merge_size) ** 2
        self.vision_config = {
            "patch_size": int(cfg.patch_size),
            "temporal_patch_size": int(cfg.temporal_patch_size),
            "spatial_merge_size": int(cfg.spatial_merge_size),
            "window_size": int(cfg.window_size),
            "in_channels": int(cfg.in_channels),
            "hidden_size": int(cfg.hidden_size),
            "out_hidden_size": int(cfg.out_hidden_size),
            "fullatt_block_indexes": sorted(self.full_blocks),
        }

    def rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, 2) int64 (h, w) -> cos, sin (1, S, head_dim): [h freqs, w freqs] twice."""
        freqs = pos.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (S, 2, hd/4)
        emb = freqs.reshape(freqs.shape[0], -1)  # (S, hd/2) = [h freqs | w freqs]
        emb = torch.cat((emb, emb), dim=-1)  # (S, hd)
        return emb.cos().unsqueeze(0), emb.sin().unsqueeze(0)

    def forward(
        self,
        pixel_values: torch.Tensor,
        rotary_pos_ids: torch.Tensor,
        window_index: torch.Tensor,
        reverse_window_index: torch.Tensor,
        window_segment_ids: torch.Tensor,
        full_segment_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Image embeddings.

        Args:
            pixel_values: (S, C*Tp*P*P) float32.
            rotary_pos_ids: (S, 2) int64, HF order.
            window_index: (S,) int64, window order -> patch.
            reverse_window_index: (S,) int64, inverse of window_index.
            window_segment_ids, full_segment_ids: (S,) int64, attention blocks in window order.

        Returns:
            (S / m^2, out_hidden) float32.
        """
        x = torch.matmul(pixel_values, self.patch_w_t)  # (S, D)
        x = torch.index_select(x, 0, window_index)
        cos, sin = self.rotary(torch.index_select(rotary_pos_ids, 0, window_index))
        window_mask, full_mask = block_mask(window_segment_ids), block_mask(full_segment_ids)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, full_mask if i in self.full_blocks else window_mask)
        x = torch.index_select(x, 0, reverse_window_index)  # back to patch (merge-block) order
        x = self.ln_q(x).reshape(-1, self.unit * x.shape[-1])  # (S / m^2, m^2 * D)
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class SpecialisedVision(nn.Module):
    """A :class:`VisionForExport` with one grid's index tensors as constants; input pixel_values only."""

    def __init__(self, core: VisionForExport, index: VisionIndex) -> None:
        super().__init__()
        self.core = core
        for name, arr in index.graph_feeds().items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(arr)), persistent=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.core(
            pixel_values,
            self.rotary_pos_ids,
            self.window_index,
            self.reverse_window_index,
            self.window_segment_ids,
            self.full_segment_ids,
        )


INDEX_INPUTS = (
    bundle.ROTARY_POS_IDS,
    bundle.WINDOW_INDEX,
    bundle.REVERSE_WINDOW_INDEX,
    bundle.WINDOW_SEGMENT_IDS,
    bundle.FULL_SEGMENT_IDS,
)


def vision_io_specs(core: VisionForExport, grid: tuple[int, int, int] | None) -> tuple[list, list]:
    """Input and output :class:`bundle.TensorSpec` lists of the graph (fixed shapes when ``grid`` is given)."""
    cfg = core.vision_config
    patch_dim = cfg["in_channels"] * cfg["temporal_patch_size"] * cfg["patch_size"] ** 2
    out_hidden = cfg["out_hidden_size"]
    if grid is not None:
        n = int(np.prod(grid))
        ins = [bundle.TensorSpec(bundle.PIXEL_VALUES, "float32", (n, patch_dim))]
        return ins, [bundle.TensorSpec(bundle.IMAGE_EMBEDS, "float32", (n // core.unit, out_hidden))]
    ins = [
        bundle.TensorSpec(bundle.PIXEL_VALUES, "float32", ("patches", patch_dim)),
        bundle.TensorSpec(bundle.ROTARY_POS_IDS, "int64", ("patches", 2)),
        *[bundle.TensorSpec(n, "int64", ("patches",)) for n in INDEX_INPUTS[1:]],
    ]
    return ins, [bundle.TensorSpec(bundle.IMAGE_EMBEDS, "float32", ("merged", out_hidden))]


def example_inputs(core: VisionForExport, grid_thw: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Random pixel_values and the index tensors for one grid (trace inputs)."""
    cfg = core.vision_config
    idx = compute_vision_index(
        np.array([grid_thw]),
        spatial_merge_size=cfg["spatial_merge_size"],
        window_size=cfg["window_size"],
        patch_size=cfg["patch_size"],
    )
    patch_dim = cfg["in_channels"] * cfg["temporal_patch_size"] * cfg["patch_size"] ** 2
    gen = torch.Generator().manual_seed(0)
    pv = torch.randn(idx.num_patches, patch_dim, generator=gen)
    return (pv, *[torch.from_numpy(a) for a in idx.graph_feeds().values()])


def export_vision(
    model: nn.Module,
    out_path: str | Path,
    *,
    specialise_224: bool = False,
    specialise_grid: tuple[int, int, int] | None = None,
    free_source: bool = False,
) -> bundle.ComponentSpec:
    """Export the vision tower of an HF Qwen2.5-VL model to ONNX.

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration`` (or anything with ``.model.visual`` / ``.visual``).
        out_path: the .onnx file to write (external data ``<name>.data`` beside it when large).
        specialise_224: fold the (1, 16, 16) grid's index tensors into the graph (input pixel_values only);
            otherwise the graph is dynamic over resolution (dim ``patches``) and takes the index tensors.
        specialise_grid: like ``specialise_224`` for another (t, h, w) grid (e.g. a 448x448 frame).
        free_source: drop the HF vision blocks while copying them (the model's vision tower is unusable
            afterwards).

    Returns:
        the component spec for the manifest (file names relative to ``out_path``'s directory).
    """
    from nora_edge.export.onnx_io import export_module

    grid = (
        tuple(specialise_grid)
        if specialise_grid is not None
        else (SPECIALISED_GRID if specialise_224 else None)
    )
    visual = find_visual(model)
    out_path = Path(out_path)
    core = VisionForExport(visual, free_source=free_source).eval()
    args = example_inputs(core, grid if grid is not None else (1, 12, 20))
    ins, outs = vision_io_specs(core, grid)
    if grid is not None:
        module = SpecialisedVision(core, compute_index_for(core, grid)).eval()
        args = args[:1]
    else:
        module = core
    data_files = export_module(module, args, out_path, ins, outs)
    meta = dict(core.vision_config)
    meta["grid_thw"] = list(grid) if grid is not None else None
    return bundle.ComponentSpec(
        file=out_path.name,
        data_files=tuple(data_files),
        precision="fp32",
        inputs=tuple(ins),
        outputs=tuple(outs),
        meta=meta,
    )


def compute_index_for(core: VisionForExport, grid: tuple[int, int, int]) -> VisionIndex:
    cfg = core.vision_config
    return compute_vision_index(
        np.array([grid]),
        spatial_merge_size=cfg["spatial_merge_size"],
        window_size=cfg["window_size"],
        patch_size=cfg["patch_size"],
    )


def find_visual(model: nn.Module) -> nn.Module:
    """The HF vision tower of a Qwen2.5-VL model (``model.model.visual``, ``model.visual`` or itself)."""
    for path in ("model.visual", "visual"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    if hasattr(model, "patch_embed") and hasattr(model, "merger"):
        return model
    raise ExportError(f"{type(model).__name__} has no Qwen2.5-VL vision tower (.model.visual)")
