"""NORA's prompt as Qwen ids and its 3-D (mrope) positions, in numpy.

Data flow:
  manifest ``prompt`` pieces (prefix ids ending in <|vision_start|>, image-pad id, <|vision_end|> id,
  suffix ids "<|im_end|>\\n<|im_start|>assistant\\n") + instruction -> ``tokenizers`` (cached per instruction)
  -> input_ids (S,) = prefix + [image_pad] * n_image_tokens + [vision_end] + instruction + suffix
  -> :func:`rope_index` (port of transformers' ``Qwen2_5_VLModel.get_rope_index`` for images)
  -> position_ids (3, 1, S) int64 and ``rope_delta``; decode step at absolute index p uses p + rope_delta
     on all three axes (:func:`decode_position_ids`).

The instruction sits between two special tokens, so the byte-level BPE tokenizes it on its own: encoding it
alone (no special tokens added) gives exactly the ids HF's processor produces for the whole prompt.
Instructions holding a special-token string (e.g. "<|image_pad|>") are refused: HF would splice that token
in and break the image-token count.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from nora_edge.errors import InputError

DEFAULT_MAX_INSTRUCTION_TOKENS = 512


def rope_index(
    input_ids: np.ndarray, image_token_id: int, image_grid_thw: np.ndarray, spatial_merge_size: int
) -> tuple[np.ndarray, int]:
    """3-D rotary positions of one sequence with still images (HF ``get_rope_index``, images only).

    Text runs count up by one on all three axes. An image run of gt*gh*gw/m^2 tokens, starting at text
    position ``s``, gets t = s + frame, h = s + row, w = s + col over the merged grid; the text after it
    resumes at ``s + max(gh, gw) / m`` (HF advances by the larger merged side, not the token count).

    Args:
        input_ids: (S,) int ids of one sequence (no padding).
        image_token_id: the <|image_pad|> id.
        image_grid_thw: (n_images, 3) (t, h, w) in patches, one row per image run in order.
        spatial_merge_size: m (2 for Qwen2.5-VL).

    Returns:
        positions: (3, S) int64 (t, h, w).
        rope_delta: max(positions) + 1 - S; a token at absolute index p >= S has position p + rope_delta.

    Raises:
        InputError: the number of image runs or their lengths do not match ``image_grid_thw``.
    """
    ids = np.asarray(input_ids).reshape(-1)
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    m = int(spatial_merge_size)
    is_img = ids == image_token_id
    # runs of equal modality: boundaries where is_img changes
    edges = np.flatnonzero(np.diff(is_img.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [ids.size]])
    parts = []
    pos = 0
    n_img = 0
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        if not is_img[a]:
            parts.append(np.broadcast_to(np.arange(pos, pos + b - a), (3, b - a)))  # (3, L)
            pos += b - a
            continue
        if n_img >= len(grids):
            raise InputError(f"prompt has more image-token runs than image_grid_thw rows ({len(grids)})")
        t, h, w = (int(v) for v in grids[n_img])
        lt, lh, lw = t, h // m, w // m
        if lt * lh * lw != b - a:
            raise InputError(
                f"image run {n_img} has {b - a} tokens but grid (t={t}, h={h}, w={w}) / merge {m} needs "
                f"{lt * lh * lw}"
            )
        tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")  # (lt, lh, lw)
        parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + pos)  # (3, lt*lh*lw)
        pos += max(lh, lw)
        n_img += 1
    if n_img != len(grids):
        raise InputError(f"prompt has {n_img} image-token runs but image_grid_thw has {len(grids)} rows")
    positions = np.concatenate(parts, axis=1).astype(np.int64) if parts else np.zeros((3, 0), np.int64)
    delta = int(positions.max()) + 1 - ids.size if ids.size else 0
    return positions, delta


def decode_position_ids(index: int, rope_delta: int, length: int = 1) -> np.ndarray:
    """Positions of ``length`` tokens starting at absolute sequence index ``index`` after the prompt.

    Returns:
        (3, 1, length) int64, every axis = index + k + rope_delta.
    """
    p = np.arange(index, index + length, dtype=np.int64) + rope_delta  # (length,)
    return np.broadcast_to(p, (3, 1, length)).copy()  # (3, B=1, length)


@dataclass(frozen=True)
class Prompt:
    """One assembled prompt.

    Attributes:
        input_ids: (S,) int64.
        position_ids: (3, 1, S) int64 mrope positions.
        rope_delta: offset of decode positions (see :func:`rope_index`).
        image_start: index of the first image token (= len(prefix_ids)).
        num_image_tokens: image tokens (merged patches) in the prompt.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    rope_delta: int
    image_start: int
    num_image_tokens: int

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


class PromptBuilder:
    """Assemble NORA prompts from the manifest pieces with a per-instruction token cache.

    Args:
        prefix_ids: system turn + "<|im_start|>user\\n<|vision_start|>" as ids.
        image_pad_id: the <|image_pad|> id.
        vision_end_id: the <|vision_end|> id.
        suffix_ids: "<|im_end|>\\n<|im_start|>assistant\\n" as ids.
        tokenizer: a ``tokenizers.Tokenizer`` (the checkpoint's tokenizer.json).
        spatial_merge_size: m of the vision merger.
        max_instruction_tokens: longest instruction accepted (in tokens).
        forbidden_ids: ids an instruction may not contain (the special/vision/action tokens).
        cache_size: instructions kept in the LRU token cache.
    """

    def __init__(
        self,
        prefix_ids: tuple[int, ...],
        image_pad_id: int,
        vision_end_id: int,
        suffix_ids: tuple[int, ...],
        tokenizer: object,
        spatial_merge_size: int,
        *,
        max_instruction_tokens: int = DEFAULT_MAX_INSTRUCTION_TOKENS,
        forbidden_ids: frozenset[int] = frozenset(),
        cache_size: int = 256,
    ) -> None:
        self.prefix_ids = np.asarray(prefix_ids, dtype=np.int64)
        self.image_pad_id = int(image_pad_id)
        self.vision_end_id = int(vision_end_id)
        self.suffix_ids = np.asarray(suffix_ids, dtype=np.int64)
        self.tokenizer = tokenizer
        self.spatial_merge_size = int(spatial_merge_size)
        self.max_instruction_tokens = int(max_instruction_tokens)
        self.forbidden_ids = frozenset(int(i) for i in forbidden_ids) | {
            self.image_pad_id,
            self.vision_end_id,
        }
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = int(cache_size)

    def instruction_ids(self, instruction: object) -> np.ndarray:
        """Token ids of the raw instruction (as NORA passes it: no lowercasing, no stripping).

        Raises:
            InputError: not a str, empty/whitespace-only, longer than ``max_instruction_tokens``, or holding a
                special token.
        """
        if not isinstance(instruction, str):
            raise InputError(f"instruction must be a str, got {type(instruction).__name__}")
        hit = self._cache.get(instruction)
        if hit is not None:
            self._cache.move_to_end(instruction)
            return hit
        if not instruction.strip():
            raise InputError(f"instruction is empty: {instruction!r}")
        ids = np.asarray(self.tokenizer.encode(instruction, add_special_tokens=False).ids, dtype=np.int64)
        if ids.size > self.max_instruction_tokens:
            raise InputError(
                f"instruction is too long: {ids.size} tokens > max_instruction_tokens "
                f"{self.max_instruction_tokens} ({instruction[:60]!r}...)"
            )
        bad = sorted({int(i) for i in ids} & self.forbidden_ids)
        if bad:
            raise InputError(f"instruction contains special token id(s) {bad[:5]}: {instruction[:80]!r}")
        ids.setflags(write=False)
        self._cache[instruction] = ids
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ids

    def build(self, instruction: str, image_grid_thw: np.ndarray) -> Prompt:
        """Prompt ids and positions for one image and one instruction.

        Args:
            instruction: the task text.
            image_grid_thw: (1, 3) grid of the image in patches.

        Returns:
            the :class:`Prompt`.
        """
        instr = self.instruction_ids(instruction)
        grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
        if grid.shape[0] != 1:
            raise InputError(f"NORA prompts hold exactly one image; image_grid_thw has {grid.shape[0]} rows")
        n_img = int(grid[0].prod()) // self.spatial_merge_size**2
        ids = np.concatenate(
            [
                self.prefix_ids,
                np.full(n_img, self.image_pad_id, dtype=np.int64),
                [self.vision_end_id],
                instr,
                self.suffix_ids,
            ]
        ).astype(np.int64)  # (S,)
        positions, delta = rope_index(ids, self.image_pad_id, grid, self.spatial_merge_size)
        return Prompt(
            input_ids=ids,
            position_ids=positions[:, None, :],  # (3, 1, S)
            rope_delta=delta,
            image_start=int(self.prefix_ids.size),
            num_image_tokens=n_img,
        )
