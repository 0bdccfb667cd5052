"""NORA-format checkpoint fixtures with the real Qwen2.5-VL architecture and random weights.

Data flow: (preset, horizon, seed) -> text tokenizer (text_tokenizer.py) -> config.json (transformers-4 flat
layout, as NORA ships it) -> weights (fixture_weights.py, streamed tensor by tensor) -> generation_config.json,
preprocessor_config.json, chat_template.json, norm_stats.json -> FAST tokenizer fitted on smooth synthetic
trajectories (``fast/``) -> all of it built in ``out.tmp-*`` -> optionally trained in place there
(``train_steps > 0``, train_fixture.py) -> renamed to ``out`` (atomic).

Presets:
  tiny        1.07 M params, base vocab 512, fp32 single file. Builds in ~2 s, loads in < 0.1 s.
  medium      91.9 M params (hidden 1024, 6 layers, 16 heads / 2 KV heads), base vocab 4096, fp32 single file.
  real-shape  exact Qwen2.5-VL-3B dims, base vocab 151643 + 22 specials + 2048 actions = 153713,
              3.758 B params, random bf16 in 3 shards of <= 3 GiB + index (7.5 GB). Measured on the 2-core
              dev machine: 80 s wall, peak RSS 2.3 GB (one tensor at a time).
fp32 for tiny/medium so parity tests against ONNX fp32 are not limited by bf16 rounding; bf16 for
real-shape because that is what NORA stores (and it halves the 7.5 GB).

Every preset keeps the vision tower's real window logic: patch 14, spatial merge 2, temporal patch 2,
window 112 (a 224x224 image -> 16x16 patches -> 2x2 windows of 4x4 merged patches) and full-attention blocks.

generation_config.json is Qwen2.5-VL-3B-Instruct's file (which NORA ships unchanged) with this vocabulary's
ids: bos/pad <|endoftext|>, eos [<|im_end|>, <|endoftext|>], do_sample, repetition_penalty 1.05, temperature
0.1, top_p 0.001, top_k 1 and transformers_version, and no length field. So HF ``generate`` makes its default
of 20 new tokens (transformers generation/utils.py ``_prepare_generated_length``), exactly as with the real
checkpoint: a NORA-Long chunk needing more than 20 tokens is cut off into a malformed decode (real NORA
behaviour; the random-weight fixtures hit it on every input, the trained ones need 5-8 tokens).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nora_edge import names
from nora_edge.actions.fast import FastTokenizer
from nora_edge.errors import ExportError

from . import fixture_weights
from .text_tokenizer import build_text_tokenizer, write_json, write_tokenizer_files

ACTION_DIM = 7
FIXTURE_UNNORM_KEY = "fixture_robot"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Preset:
    """Architecture of one fixture preset (text decoder + vision tower + tokenizer size + storage)."""

    base_vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    fullatt_blocks: tuple[int, ...]
    dtype: str
    shard_bytes: int | None
    corpus_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS = {
    "tiny": Preset(512, 128, 384, 2, 4, 2, 4, 64, 128, 4, (1,), "float32", None, 4000),
    "medium": Preset(4096, 1024, 2816, 6, 16, 2, 4, 512, 1368, 8, (1, 3), "float32", None, 8000),
    "real-shape": Preset(
        151643, 2048, 11008, 36, 16, 2, 32, 1280, 3420, 16, (7, 15, 23, 31), "bfloat16", 3 * 2**30, 20000
    ),
}


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's [16, 24, 24] (temporal, height, width) scaled so the sum stays head_dim / 2."""
    half = head_dim // 2
    if head_dim % 16:
        raise ExportError(f"head_dim {head_dim} must be a multiple of 16 to scale mrope_section [16, 24, 24]")
    return [half // 4, 3 * half // 8, 3 * half // 8]


def special_ids(base: int) -> dict[str, int]:
    """Qwen special-token ids of a fixture: names.QWEN_SPECIAL_TOKENS in order from ``base``."""
    return {tok: base + i for i, tok in enumerate(names.QWEN_SPECIAL_TOKENS)}


def model_config(p: Preset) -> dict:
    """config.json in the flat transformers-4 layout that Qwen2.5-VL-3B / NORA ship."""
    ids = special_ids(p.base_vocab)
    vocab = p.base_vocab + len(names.QWEN_SPECIAL_TOKENS) + names.NUM_ACTION_TOKENS
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": p.hidden,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate,
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": p.heads,
        "num_hidden_layers": p.layers,
        "num_key_value_heads": p.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_section(p.head_dim)},
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": p.dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": p.vision_depth,
            "fullatt_block_indexes": list(p.fullatt_blocks),
            "hidden_act": "silu",
            "hidden_size": p.vision_hidden,
            "in_channels": 3,
            "intermediate_size": p.vision_intermediate,
            "num_heads": p.vision_heads,
            "out_hidden_size": p.hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
        },
        "vocab_size": vocab,
    }


def generation_config(base: int) -> dict:
    """generation_config.json exactly as Qwen2.5-VL-3B-Instruct ships it
    (huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct, file generation_config.json: no max_new_tokens / max_length),
    with this vocabulary's special ids (the real file: bos/pad 151643, eos [151645, 151643]; here
    <|endoftext|> and <|im_end|> from ``base``)."""
    ids = special_ids(base)
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.49.0.dev0",
    }


def preprocessor_config() -> dict:
    """preprocessor_config.json for Qwen2VLImageProcessor (as Qwen2.5-VL-3B-Instruct ships it)."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": CLIP_STD,
        "max_pixels": 12845056,
        "merge_size": 2,
        "min_pixels": 3136,
        "patch_size": 14,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "temporal_patch_size": 2,
    }


def _stats(x: np.ndarray) -> dict:
    """OpenVLA-style statistics over axis 0 of (N, D) samples."""
    return {
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "max": x.max(0).tolist(),
        "min": x.min(0).tolist(),
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
    }


def norm_stats_entry(seed: int, n: int = 5000) -> dict:
    """One norm_stats.json entry from synthetic robot data: 6 end-effector deltas + a 0/1 gripper (mask False)."""
    rng = np.random.default_rng(seed)
    scales = np.array([0.01, 0.012, 0.015, 0.03, 0.035, 0.04]) * rng.uniform(0.5, 2.0, 6)
    deltas = rng.standard_normal((n, 6)) * scales  # (N, 6)
    gripper = (rng.random((n, 1)) < 0.6).astype(np.float64)  # (N, 1)
    action = _stats(np.concatenate([deltas, gripper], axis=1))  # (N, 7) -> stats
    action["mask"] = [True] * 6 + [False]
    proprio = _stats(rng.standard_normal((n, 8)) * 0.2)
    return {"action": action, "proprio": proprio, "num_transitions": n, "num_trajectories": n // 50}


def smooth_trajectories(horizon: int, seed: int, n_chunks: int = 2000) -> np.ndarray:
    """Normalized action chunks (B, T, 7) in [-1, 1]: sums of low-frequency sinusoids; gripper +-1 steps."""
    rng = np.random.default_rng(seed)
    t = np.arange(horizon)[None, :, None] + rng.uniform(0, 100, (n_chunks, 1, 1))  # (B, T, 1)
    freq = rng.uniform(0.005, 0.08, (n_chunks, 3, ACTION_DIM))  # cycles per step, 3 components
    amp = rng.uniform(0.0, 1.0, (n_chunks, 3, ACTION_DIM))
    phase = rng.uniform(0, 2 * np.pi, (n_chunks, 3, ACTION_DIM))
    waves = amp[:, None] * np.sin(2 * np.pi * freq[:, None] * t[..., None] + phase[:, None])  # (B, T, 3, 7)
    x = waves.sum(2) / np.maximum(amp.sum(1), 1e-9)[:, None]  # (B, T, 7), |x| <= 1
    x[..., -1] = np.where(x[..., -1] >= 0, 1.0, -1.0)
    return np.clip(x, -1.0, 1.0)


def write_fast_dir(out: Path, horizon: int, seed: int) -> None:
    """Fit FAST (scale 10, vocab 2048, T=horizon, D=7) on smooth trajectories and save it to ``out``."""
    chunks = smooth_trajectories(horizon, seed)
    fast = FastTokenizer.fit(
        chunks, scale=10.0, vocab_size=names.NUM_ACTION_TOKENS, time_horizon=horizon, action_dim=ACTION_DIM
    )
    fast.save_pretrained(out)


def _rich_progress(enabled: bool, label: str):
    """(context manager, factory total -> advance) for a rich byte progress bar, or no-ops."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(), None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn())

    def factory(total: int) -> Callable[[int], None]:
        task = bar.add_task(label, total=total)
        return lambda n: bar.advance(task, n)

    return bar, factory


def write_checkpoint_files(
    tmp: Path, preset: Preset, horizon: int, seed: int, extra_norm_keys: tuple[str, ...], progress: bool
) -> None:
    """Write every file of the checkpoint into ``tmp`` (weights last, they take longest)."""
    tok = build_text_tokenizer(preset.base_vocab, seed=seed, corpus_size=preset.corpus_size)
    write_tokenizer_files(tok, tmp)
    config = model_config(preset)
    write_json(tmp / names.CONFIG, config)
    write_json(tmp / names.GENERATION_CONFIG, generation_config(preset.base_vocab))
    write_json(tmp / names.PREPROCESSOR_CONFIG, preprocessor_config())
    stats = {FIXTURE_UNNORM_KEY: norm_stats_entry(seed)}
    for i, key in enumerate(extra_norm_keys):
        if key in stats:
            raise ExportError(f"extra_norm_keys: duplicate unnorm key {key!r}")
        stats[key] = norm_stats_entry(seed + 1000 * (i + 1))
    write_json(tmp / names.NORM_STATS, stats)
    write_fast_dir(tmp / names.FAST_SUBDIR, horizon, seed)
    bar, factory = _rich_progress(progress, f"fixture weights ({preset.dtype})")
    with bar:
        fixture_weights.write_weights(
            tmp, config, seed=seed, dtype=preset.dtype, shard_bytes=preset.shard_bytes, progress=factory
        )


def build_fixture(
    out: str | Path,
    *,
    preset: str = "tiny",
    horizon: int = 1,
    seed: int = 0,
    extra_norm_keys: tuple[str, ...] | list[str] = (),
    progress: bool = True,
    train_steps: int = 0,
) -> Path:
    """Write a complete NORA-format checkpoint directory with random (or briefly trained) weights.

    Args:
        out: target directory; must not exist (built in ``out.tmp-*`` and renamed, so it appears complete
            or not at all).
        preset: "tiny", "medium" or "real-shape" (see module doc).
        horizon: FAST time horizon T (1 = NORA, 5 = NORA-Long); recorded in ``fast/processor_config.json``.
        seed: every random choice (corpus, weights, norm stats, FAST data) derives from it.
        extra_norm_keys: more unnorm keys in norm_stats.json besides ``fixture_robot``.
        progress: show a progress bar while writing weights (and training).
        train_steps: when > 0, train the model for that many steps with train_fixture.train_fixture (seed
            ``seed``, its default hyperparameters) before the rename, so greedy decoding yields well-formed
            FAST chunks; 0 (default) keeps the random weights.

    Returns:
        ``out`` as a Path.

    Raises:
        ExportError: unknown preset, bad horizon or train_steps, or ``out`` already exists.
    """
    out = Path(out)
    if preset not in PRESETS:
        raise ExportError(f"unknown fixture preset {preset!r}; choose from {sorted(PRESETS)}")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ExportError(f"fixture horizon must be a positive int, got {horizon!r}")
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 0:
        raise ExportError(f"fixture train_steps must be a non-negative int, got {train_steps!r}")
    if out.exists():
        raise ExportError(f"fixture target already exists: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_checkpoint_files(tmp, PRESETS[preset], horizon, seed, tuple(extra_norm_keys), progress)
        if train_steps > 0:
            from .train_fixture import train_fixture  # torch training stack only when asked for

            train_fixture(tmp, steps=train_steps, seed=seed, progress=progress)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def describe(ckpt: Path) -> dict:
    """Small summary of a fixture (preset dims from config.json and the stored parameter count)."""
    config = json.loads((ckpt / names.CONFIG).read_text(encoding="utf-8"))
    return {
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "layers": config["num_hidden_layers"],
        "vision_depth": config["vision_config"]["depth"],
        "parameters": fixture_weights.count_stored_parameters(ckpt),
    }
