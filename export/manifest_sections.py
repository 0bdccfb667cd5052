"""Manifest sections derived from the checkpoint (everything except graphs and validation).

Data flow: NoraCheckpoint + its processor (chat template, tokenizer, image processor) ->
``source_checkpoint`` (sha256 of config + weight index), ``prompt`` (prefix/suffix ids read off the real chat
template, mrope info), ``image`` (the runtime ImageSpec's fields), ``actions`` (action range, head rows, end
ids), ``generation`` (generation_config.json and the length rule HF applies to it), ``codec`` (FAST
parameters + codec file names), ``norm_stats``, ``postprocess`` (the action chain); plus
:func:`write_codec_files` (FAST files + compiled byte table into the staging dir).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
from tokenizers import Tokenizer

from nora_edge import bundle, names
from nora_edge.actions.bytetable import ByteTable
from nora_edge.bundle import sha256_file
from nora_edge.checkpoint import NoraCheckpoint
from nora_edge.errors import ExportError


def source_checkpoint(ckpt: NoraCheckpoint) -> dict:
    """{path, fast_dir, sha256 {config.json, weight index or single weight file, FAST files}}."""
    weights = ckpt.path / names.SAFETENSORS_INDEX
    if not weights.is_file():
        weights = ckpt.path / names.SAFETENSORS_SINGLE
    hashed = [ckpt.path / names.CONFIG, weights]
    fast = [ckpt.fast.path / names.FAST_PROCESSOR_CONFIG, ckpt.fast.path / names.TOKENIZER_JSON]
    return {
        "path": str(ckpt.path.resolve()),
        "fast_dir": str(ckpt.fast.path.resolve()),
        "sha256": {p.name: sha256_file(p) for p in hashed},
        "fast_sha256": {p.name: sha256_file(p) for p in fast},
    }


def prompt_pieces(processor, ckpt: NoraCheckpoint, image_size: int) -> tuple[list[int], list[int]]:
    """(prefix_ids, suffix_ids) read off the checkpoint's own chat template with an empty instruction.

    The processor renders ``prefix + pads + <|vision_end|> + instruction + suffix``; with instruction "" the ids
    after <|vision_end|> are exactly the suffix.

    Raises:
        ExportError: the rendered prompt does not have that shape.
    """
    from nora_edge.export.reference import nora_messages

    image = PIL.Image.new("RGB", (image_size, image_size))
    text = processor.apply_chat_template(nora_messages(image, ""), tokenize=False, add_generation_prompt=True)
    ids = processor(text=[text], images=[image], return_tensors="np")["input_ids"][0].tolist()
    tid = ckpt.token_ids
    pads = [i for i, t in enumerate(ids) if t == tid["image_pad"]]
    if not pads or pads != list(range(pads[0], pads[-1] + 1)):
        raise ExportError(
            f"chat template: expected one contiguous run of <|image_pad|>, got positions {pads[:4]}"
        )
    prefix, rest = ids[: pads[0]], ids[pads[-1] + 1 :]
    if not prefix or prefix[-1] != tid["vision_start"] or not rest or rest[0] != tid["vision_end"]:
        raise ExportError(
            "chat template: the image pads are not wrapped in <|vision_start|> ... <|vision_end|>"
        )
    suffix = rest[1:]
    if not suffix or suffix[0] != tid["im_end"]:
        raise ExportError(f"chat template: the user turn does not end with <|im_end|> (suffix {suffix[:4]})")
    return prefix, suffix


def prompt_section(processor, ckpt: NoraCheckpoint, image_size: int) -> dict:
    prefix, suffix = prompt_pieces(processor, ckpt, image_size)
    text = ckpt.text_config
    vision = ckpt.vision_config
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    return {
        "prefix_ids": prefix,
        "image_pad_id": ckpt.token_ids["image_pad"],
        "vision_start_id": ckpt.token_ids["vision_start"],
        "vision_end_id": ckpt.token_ids["vision_end"],
        "suffix_ids": suffix,
        "tokenizer": bundle.TOKENIZER,
        "mrope": {
            "section": list(rope.get("mrope_section", [16, 24, 24])),
            "rope_theta": float(rope.get("rope_theta", text.get("rope_theta", 1e6))),
            "spatial_merge_size": int(vision["spatial_merge_size"]),
            "tokens_per_second": vision.get("tokens_per_second"),
        },
    }


def image_section(ckpt: NoraCheckpoint, image_size: int) -> dict:
    """The runtime ImageSpec fields, from preprocessor_config.json.

    Raises:
        ExportError: the processor does not rescale and normalize (the runtime always does both).
    """
    path = ckpt.path / names.PREPROCESSOR_CONFIG
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for flag in ("do_rescale", "do_normalize"):
        if cfg.get(flag, True) is not True:
            raise ExportError(f"{path}: field '{flag}' = {cfg[flag]!r}; the runtime supports only true")
    size = cfg.get("size") or {}
    return {
        "resized_height": int(image_size),
        "resized_width": int(image_size),
        "patch_size": int(cfg.get("patch_size", 14)),
        "temporal_patch_size": int(cfg.get("temporal_patch_size", 2)),
        "merge_size": int(cfg.get("merge_size", 2)),
        "min_pixels": int(cfg.get("min_pixels", size.get("shortest_edge", 56 * 56))),
        "max_pixels": int(cfg.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
        "rescale_factor": float(cfg.get("rescale_factor", 1 / 255)),
        "image_mean": [float(v) for v in cfg["image_mean"]],
        "image_std": [float(v) for v in cfg["image_std"]],
        "do_rescale": True,
        "do_normalize": True,
        "resample": int(cfg.get("resample", 3)),
    }


def eos_ids(ckpt: NoraCheckpoint) -> list[int]:
    """generation_config eos ids (int or list), in order."""
    eos = ckpt.generation_config.get("eos_token_id")
    if eos is None:
        raise ExportError(f"{ckpt.path / names.GENERATION_CONFIG}: missing field 'eos_token_id'")
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def end_ids(ckpt: NoraCheckpoint) -> list[int]:
    """<|im_end|> first, then the other generation eos ids."""
    out = [ckpt.token_ids["im_end"]]
    out += [e for e in eos_ids(ckpt) if e not in out]
    return out


def actions_section(ckpt: NoraCheckpoint, head: str, head_rows: list[int]) -> dict:
    return {
        "base": ckpt.action_base,
        "count": ckpt.num_action_tokens,
        "head": head,
        "head_rows": bundle.compress_ranges(head_rows),
        "end_ids": end_ids(ckpt),
    }


def length_rule(g: dict) -> str:
    """Which of HF's length rules limits unconstrained generation (``nora_edge.generate.new_token_limit``)."""
    from nora_edge.generate import HF_DEFAULT_NEW_TOKENS

    if g.get("max_new_tokens") is not None:
        return "max_new_tokens"
    if g.get("max_length") is not None:
        return "max_length (prompt + new tokens)"
    return (
        f"none set: transformers' default of {HF_DEFAULT_NEW_TOKENS} new tokens (as Qwen2.5-VL-3B-Instruct)"
    )


def generation_section(ckpt: NoraCheckpoint) -> dict:
    g = ckpt.generation_config
    return {
        "eos_token_ids": eos_ids(ckpt),
        "repetition_penalty": g.get("repetition_penalty"),
        "max_new_tokens": g.get("max_new_tokens"),
        "max_length": g.get("max_length"),
        "length_rule": length_rule(g),
        "pad_token_id": g.get("pad_token_id"),
        "do_sample": False,
        "source": names.GENERATION_CONFIG,
    }


def codec_section(ckpt: NoraCheckpoint) -> dict:
    f = ckpt.fast
    return {
        "scale": f.scale,
        "min_token": f.min_token,
        "vocab_size": f.vocab_size,
        "time_horizon": ckpt.time_horizon,
        "action_dim": ckpt.action_dim,
        "files": {
            "byte_table": bundle.CODEC_BYTE_TABLE,
            "tokenizer": bundle.CODEC_TOKENIZER,
            "processor_config": bundle.CODEC_PROCESSOR_CONFIG,
        },
    }


def norm_stats_section(ckpt: NoraCheckpoint) -> dict:
    return {key: stats.to_json() for key, stats in ckpt.norm_stats.items()}


def postprocess_section(
    ckpt: NoraCheckpoint,
    stats: str | Path | None = None,
    stats_key: str = "action",
    norm_mode: str = "min_max",
    gripper: Sequence[str] = (),
    mask: Sequence[bool] | None = None,
) -> list[dict]:
    """The action post-processing chain (``nora_edge.actions.postprocess``) as the manifest stores it.

    No ``stats``: NORA's q01/q99 by the caller's unnorm key (then ``gripper`` steps); with ``stats`` (a LeRobot
    dataset root or ``meta/stats.json``-shaped file): ``norm_mode`` unnormalize from its ``stats_key`` feature.

    Raises:
        ExportError: naming the stats file and field (see ``nora_edge.export.lerobot_stats.build_chain``).
    """
    from nora_edge.export.lerobot_stats import build_chain

    chain = build_chain(
        ckpt.action_dim,
        ckpt.norm_stats,
        stats=stats,
        stats_key=stats_key,
        norm_mode=norm_mode,
        gripper=tuple(gripper),
        mask=mask,
    )
    return chain.to_json()


def write_codec_files(ckpt: NoraCheckpoint, staging: Path) -> int:
    """Copy the FAST files and the checkpoint tokenizer; compile the FAST byte table.

    Returns:
        the BPE vocabulary size (ids the byte table knows; it may be below the action-token count when BPE
        training found fewer merges, and FAST ids beyond it are detokenization errors).
    """
    (staging / bundle.CODEC_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt.fast.path / names.FAST_PROCESSOR_CONFIG, staging / bundle.CODEC_PROCESSOR_CONFIG)
    shutil.copyfile(ckpt.fast.path / names.TOKENIZER_JSON, staging / bundle.CODEC_TOKENIZER)
    shutil.copyfile(ckpt.path / names.TOKENIZER_JSON, staging / bundle.TOKENIZER)
    fast_tok = Tokenizer.from_file(str(ckpt.fast.path / names.TOKENIZER_JSON))
    table = ByteTable.from_tokenizer(fast_tok, min_token=ckpt.fast.min_token, scale=ckpt.fast.scale)
    if table.vocab_size > ckpt.num_action_tokens:
        raise ExportError(
            f"{ckpt.fast.path / names.TOKENIZER_JSON}: {table.vocab_size} BPE ids but the checkpoint has only "
            f"{ckpt.num_action_tokens} action tokens"
        )
    table.save(staging / bundle.CODEC_BYTE_TABLE)
    return table.vocab_size


def write_native_codec(staging: Path, sections: dict) -> str:
    """Write ``codec/native/`` (the C library's tables, ``nora_edge.actions.native``) from the staged byte table
    and the manifest sections (actions head rows, codec T/D, post-processing chain, norm stats).

    Returns:
        the directory's bundle-relative path (``codec.files.native``).

    Raises:
        ExportError: the sections are inconsistent (e.g. the head lacks a FAST id's row).
    """
    from nora_edge.actions.automaton import FastAutomaton
    from nora_edge.actions.native import NATIVE_DIR, build_native, write_native
    from nora_edge.actions.normalize import NormStats
    from nora_edge.actions.postprocess import Chain, default_chain
    from nora_edge.bundle_specs import ActionSpec
    from nora_edge.errors import BundleError

    codec = sections["codec"]
    table = ByteTable.load(staging / bundle.CODEC_BYTE_TABLE)
    automaton = FastAutomaton(table, codec["time_horizon"], codec["action_dim"])
    norm_stats = {k: NormStats.from_json(k, v) for k, v in sections["norm_stats"].items()}
    post = sections.get("postprocess")
    chain = Chain.from_json(post, ExportError, "postprocess") if post is not None else default_chain()
    actions = ActionSpec.from_json(sections["actions"])
    try:
        tables = build_native(table, automaton, actions.head_rows, actions.base, chain, norm_stats)
    except BundleError as e:
        raise ExportError(f"native codec tables: {e}") from e
    write_native(staging / NATIVE_DIR, tables)
    return NATIVE_DIR
