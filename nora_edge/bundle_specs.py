"""Typed sections of a bundle manifest (numpy + json only): tensor/component specs, prompt, actions, generation,
codec.

Data flow: manifest.json dict -> ``*.from_json`` (every required field checked; a missing or mistyped one raises
:class:`BundleError` naming ``section.field``) -> frozen dataclasses the runtime reads. Re-exported by
:mod:`nora_edge.bundle`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nora_edge.errors import BundleError

MANIFEST = "manifest.json"


def require_field(d: dict, key: str, where: str, kind: type | tuple = object) -> Any:
    """``d[key]``, checked present and of ``kind``; BundleError names ``where.key`` otherwise."""
    if not isinstance(d, dict) or key not in d:
        raise BundleError(f"{MANIFEST}: missing field '{where}.{key}'")
    value = d[key]
    if not isinstance(value, kind):
        raise BundleError(f"{MANIFEST}: field '{where}.{key}' = {value!r:.80} is not {kind}")
    return value


def expand_ranges(ranges: list, where: str) -> np.ndarray:
    """[[start, stop), ...] -> int64 (N,) ids in order."""
    try:
        parts = [np.arange(int(a), int(b), dtype=np.int64) for a, b in ranges]
    except (TypeError, ValueError) as e:
        raise BundleError(f"{MANIFEST}: field '{where}' must be a list of [start, stop) pairs ({e})") from e
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def compress_ranges(ids: list[int] | np.ndarray) -> list[list[int]]:
    """int ids -> [[start, stop), ...] runs of consecutive ids, order kept."""
    runs: list[list[int]] = []
    for i in (int(x) for x in ids):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape (ints or named dims)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_json(cls, d: dict, where: str) -> TensorSpec:
        return cls(
            name=require_field(d, "name", where, str),
            dtype=require_field(d, "dtype", where, str),
            shape=tuple(require_field(d, "shape", where, list)),
        )

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ComponentSpec:
    """An ONNX graph in the bundle.

    Attributes:
        file: graph file (relative to the bundle).
        data_files: external-data files the graph references.
        precision: "fp32", or a quantization recipe name.
        inputs / outputs: tensor specs in graph order.
        meta: component-specific facts (vision: ``grid_thw`` when specialised, ``spatial_merge_size``...;
            decoder: ``num_layers``, ``num_kv_heads``, ``head_dim``, ``hidden_size``, ``head``).
    """

    file: str
    data_files: tuple[str, ...]
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    meta: dict

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @classmethod
    def from_json(cls, d: dict, where: str) -> ComponentSpec:
        return cls(
            file=require_field(d, "file", where, str),
            data_files=tuple(d.get("data_files", [])),
            precision=require_field(d, "precision", where, str),
            inputs=tuple(
                TensorSpec.from_json(t, f"{where}.inputs") for t in require_field(d, "inputs", where, list)
            ),
            outputs=tuple(
                TensorSpec.from_json(t, f"{where}.outputs") for t in require_field(d, "outputs", where, list)
            ),
            meta=dict(d.get("meta", {})),
        )

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "data_files": list(self.data_files),
            "precision": self.precision,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "meta": self.meta,
        }


@dataclass(frozen=True)
class PromptSpec:
    """Prompt pieces as Qwen ids: prefix + [image_pad] * n + [vision_end] + instruction + suffix.

    ``prefix_ids`` ends with <|vision_start|>; ``suffix_ids`` is <|im_end|>\\n<|im_start|>assistant\\n.
    ``mrope`` holds ``section``, ``rope_theta``, ``spatial_merge_size``, ``tokens_per_second``.
    """

    prefix_ids: tuple[int, ...]
    image_pad_id: int
    vision_start_id: int
    vision_end_id: int
    suffix_ids: tuple[int, ...]
    tokenizer: str
    mrope: dict

    @classmethod
    def from_json(cls, d: dict) -> PromptSpec:
        w = "prompt"
        return cls(
            prefix_ids=tuple(int(i) for i in require_field(d, "prefix_ids", w, list)),
            image_pad_id=require_field(d, "image_pad_id", w, int),
            vision_start_id=require_field(d, "vision_start_id", w, int),
            vision_end_id=require_field(d, "vision_end_id", w, int),
            suffix_ids=tuple(int(i) for i in require_field(d, "suffix_ids", w, list)),
            tokenizer=require_field(d, "tokenizer", w, str),
            mrope=require_field(d, "mrope", w, dict),
        )


@dataclass(frozen=True)
class ActionSpec:
    """Action tokens and the decoder head.

    Attributes:
        base: Qwen id of FAST id 0; count: number of action ids.
        head: "action" (sliced head) or "full".
        head_rows: int64 (rows,) Qwen id of each logits row (action head: FAST ids 0..count-1 first, then
            end ids).
        end_ids: ids that end the action sequence (<|im_end|> and the generation eos ids).
    """

    base: int
    count: int
    head: str
    head_rows: np.ndarray
    end_ids: tuple[int, ...]

    @classmethod
    def from_json(cls, d: dict) -> ActionSpec:
        w = "actions"
        return cls(
            base=require_field(d, "base", w, int),
            count=require_field(d, "count", w, int),
            head=require_field(d, "head", w, str),
            head_rows=expand_ranges(require_field(d, "head_rows", w, list), "actions.head_rows"),
            end_ids=tuple(int(i) for i in require_field(d, "end_ids", w, list)),
        )


@dataclass(frozen=True)
class GenerationSpec:
    """What HF greedy generation used (from generation_config.json): the runtime must reproduce it."""

    eos_token_ids: tuple[int, ...]
    repetition_penalty: float | None
    max_new_tokens: int | None
    max_length: int | None
    pad_token_id: int | None

    @classmethod
    def from_json(cls, d: dict) -> GenerationSpec:
        w = "generation"
        return cls(
            eos_token_ids=tuple(int(i) for i in require_field(d, "eos_token_ids", w, list)),
            repetition_penalty=d.get("repetition_penalty"),
            max_new_tokens=d.get("max_new_tokens"),
            max_length=d.get("max_length"),
            pad_token_id=d.get("pad_token_id"),
        )


@dataclass(frozen=True)
class CodecSpec:
    """FAST decode parameters and the codec files (paths relative to the bundle)."""

    scale: float
    min_token: int
    vocab_size: int
    time_horizon: int
    action_dim: int
    byte_table: str
    tokenizer: str
    processor_config: str
    native: str | None = None  # codec/native/: the C library's tables (bundles exported before it: None)

    @classmethod
    def from_json(cls, d: dict) -> CodecSpec:
        w = "codec"
        files = require_field(d, "files", w, dict)
        return cls(
            scale=float(require_field(d, "scale", w, (int, float))),
            min_token=require_field(d, "min_token", w, int),
            vocab_size=require_field(d, "vocab_size", w, int),
            time_horizon=require_field(d, "time_horizon", w, int),
            action_dim=require_field(d, "action_dim", w, int),
            byte_table=require_field(files, "byte_table", "codec.files", str),
            tokenizer=require_field(files, "tokenizer", "codec.files", str),
            processor_config=require_field(files, "processor_config", "codec.files", str),
            native=require_field(files, "native", "codec.files", str) if "native" in files else None,
        )
