"""Random Qwen2.5-VL weights for fixtures, generated tensor by tensor and streamed to safetensors.

Data flow: config.json dict -> Qwen2_5_VLForConditionalGeneration on the *meta* device (names, shapes and module
kinds only, no memory) -> :func:`tensor_specs` (checkpoint names as NORA's files spell them: ``model.layers.*``,
``visual.*``; the tied lm_head is not stored) -> per tensor: :func:`init_tensor` (numpy RNG seeded by
(seed, name), so each tensor is independent of the order and of the others) -> cast (fp32 or bf16) ->
bytes appended to a safetensors file whose header was written first -> one ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``.
Peak memory is one tensor (the embedding: vocab x hidden fp32 + its cast), never the whole model.

Init rule (chosen so greedy decoding of a random model is not degenerate and every weight matters):
  Linear / Conv3d weight ~ N(0, 1/fan_in); biases ~ N(0, BIAS_STD^2) (non-zero so a dropped bias shows in
  parity tests); embedding ~ N(0, EMBED_STD_SCALE^2 / hidden) (small next to the layers' O(1) residual
  updates, so the model does not just copy its last input token); RMSNorm weights = 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nora_edge import names
from nora_edge.errors import ExportError

BIAS_STD = 0.02
EMBED_STD_SCALE = 0.5  # embedding std = EMBED_STD_SCALE / sqrt(hidden)
_DTYPES = {"float32": (torch.float32, "F32", 4), "bfloat16": (torch.bfloat16, "BF16", 2)}
_ST_ALIGN = 8  # safetensors pads its JSON header to a multiple of 8 bytes


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: checkpoint name, shape, init kind ("linear", "bias", "conv", "embed", "norm"), fan-in."""

    name: str
    shape: tuple[int, ...]
    kind: str
    fan_in: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def checkpoint_name(module_path: str) -> str:
    """Map transformers-5 module paths to the names in NORA's safetensors (transformers-4 layout)."""
    if module_path.startswith("model.language_model."):
        return "model." + module_path[len("model.language_model.") :]
    if module_path.startswith("model.visual."):
        return "visual." + module_path[len("model.visual.") :]
    return module_path


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def _spec_for(module: nn.Module, pname: str, full: str, shape: tuple[int, ...]) -> TensorSpec:
    if isinstance(module, nn.Linear):
        kind = "linear" if pname == "weight" else "bias"
        return TensorSpec(full, shape, kind, module.in_features)
    if isinstance(module, nn.Conv3d):
        if pname != "weight":
            return TensorSpec(full, shape, "bias", 1)
        return TensorSpec(full, shape, "conv", math.prod(shape[1:]))
    if isinstance(module, nn.Embedding):
        return TensorSpec(full, shape, "embed", module.embedding_dim)
    if _is_rms_norm(module) and pname == "weight":
        return TensorSpec(full, shape, "norm", 1)
    raise ExportError(f"fixture weights: no init rule for {full} ({type(module).__name__}.{pname})")


def tensor_specs(config: dict) -> list[TensorSpec]:
    """Every tensor a Qwen2.5-VL checkpoint with this config.json stores, in module order.

    The model is built on the meta device (no memory); the tied lm_head is skipped when
    ``tie_word_embeddings`` is true, as transformers' save_pretrained does.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig.from_dict(dict(config))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    tied = bool(config.get("tie_word_embeddings"))
    specs, seen = [], set()
    for mpath, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if tied and mpath == "lm_head":
                continue
            full = checkpoint_name(f"{mpath}.{pname}")
            specs.append(_spec_for(module, pname, full, tuple(param.shape)))
    return specs


def tensor_seed(seed: int, name: str) -> int:
    """A 64-bit seed that depends only on (seed, tensor name)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def init_tensor(spec: TensorSpec, seed: int) -> np.ndarray:
    """Draw one tensor (float32, shape ``spec.shape``) with the module's init rule."""
    if spec.kind == "norm":
        return np.ones(spec.shape, dtype=np.float32)
    std = {
        "linear": 1.0 / math.sqrt(spec.fan_in),
        "conv": 1.0 / math.sqrt(spec.fan_in),
        "bias": BIAS_STD,
        "embed": EMBED_STD_SCALE / math.sqrt(spec.fan_in),
    }[spec.kind]
    rng = np.random.default_rng(tensor_seed(seed, spec.name))
    out = rng.standard_normal(spec.shape, dtype=np.float32)
    out *= np.float32(std)
    return out


def to_bytes(arr: np.ndarray, dtype: str) -> memoryview:
    """Little-endian raw bytes of ``arr`` cast to ``dtype`` ("float32" or "bfloat16", round-to-nearest-even)."""
    if dtype == "float32":
        return memoryview(np.ascontiguousarray(arr, dtype="<f4")).cast("B")
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.bfloat16)
    return memoryview(t.view(torch.int16).numpy()).cast("B")


def safetensors_header(specs: list[TensorSpec], dtype: str) -> bytes:
    """The 8-byte length + padded JSON header for tensors laid out contiguously in ``specs`` order."""
    st_dtype, itemsize = _DTYPES[dtype][1], _DTYPES[dtype][2]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        nbytes = s.numel * itemsize
        header[s.name] = {
            "dtype": st_dtype,
            "shape": list(s.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _ST_ALIGN)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    path: Path, specs: list[TensorSpec], dtype: str, seed: int, advance: Callable[[int], None] | None = None
) -> None:
    """Stream ``specs`` into one safetensors file: header first, then each tensor as it is generated."""
    itemsize = _DTYPES[dtype][2]
    with open(path, "wb") as f:
        f.write(safetensors_header(specs, dtype))
        for s in specs:
            data = to_bytes(init_tensor(s, seed), dtype)
            if data.nbytes != s.numel * itemsize:
                raise ExportError(
                    f"{path.name}: {s.name} produced {data.nbytes} bytes, expected {s.numel * itemsize}"
                )
            f.write(data)
            if advance is not None:
                advance(data.nbytes)


def plan_shards(specs: list[TensorSpec], dtype: str, shard_bytes: int | None) -> list[list[TensorSpec]]:
    """Group tensors (in order) into shards of at most ``shard_bytes`` (one shard when None)."""
    if shard_bytes is None:
        return [specs]
    itemsize = _DTYPES[dtype][2]
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        nbytes = s.numel * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-0000i-of-0000n.safetensors`` (HF naming)."""
    if n == 1:
        return [names.SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_weights(
    out: Path,
    config: dict,
    *,
    seed: int,
    dtype: str,
    shard_bytes: int | None,
    progress: Callable[[Iterable[int], int], Callable[[int], None]] | None = None,
) -> list[Path]:
    """Write the random weights for ``config`` into ``out``.

    Args:
        out: checkpoint directory (exists).
        config: the config.json dict.
        seed: weight seed.
        dtype: "float32" or "bfloat16".
        shard_bytes: max bytes per shard; None writes a single ``model.safetensors``.
        progress: optional factory ``(total_bytes) -> advance(nbytes)`` for a progress bar.

    Returns:
        the written safetensors files.
    """
    if dtype not in _DTYPES:
        raise ExportError(f"fixture weights: dtype {dtype!r} not in {sorted(_DTYPES)}")
    specs = tensor_specs(config)
    shards = plan_shards(specs, dtype, shard_bytes)
    files = shard_names(len(shards))
    itemsize = _DTYPES[dtype][2]
    total = sum(s.numel for s in specs) * itemsize
    advance = progress(total) if progress is not None else None
    for fname, group in zip(files, shards, strict=True):
        write_safetensors(out / fname, group, dtype, seed, advance)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {s.name: fname for fname, group in zip(files, shards, strict=True) for s in group},
        }
        (out / names.SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [out / f for f in files]


def count_stored_parameters(ckpt: Path) -> int:
    """Sum of element counts over every tensor in the checkpoint's safetensors headers (no data read)."""
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{ckpt}: no .safetensors files")
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total
