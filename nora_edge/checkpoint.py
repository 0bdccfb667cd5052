"""Read a NORA checkpoint directory's metadata without torch.

Data flow: checkpoint dir (config.json, safetensors, tokenizer files, added tokens, norm_stats.json,
generation_config.json) + FAST dir (processor_config.json, tokenizer.json) -> :class:`NoraCheckpoint`
(action-id range, special-token ids, norm stats per unnorm key, action_dim, time horizon, weight files).
Every missing or inconsistent piece raises :class:`CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nora_edge import names
from nora_edge.actions.normalize import NormStats
from nora_edge.atomic import read_json_object
from nora_edge.errors import CheckpointError, InputError

_ACTION_RE = re.compile(r"^<robot_action_(\d+)>$")
REQUIRED_FILES = (
    names.CONFIG,
    names.GENERATION_CONFIG,
    names.PREPROCESSOR_CONFIG,
    names.TOKENIZER_JSON,
    names.TOKENIZER_CONFIG,
    names.NORM_STATS,
)


def read_json(path: Path) -> dict:
    """Read a checkpoint JSON object; every fault is a CheckpointError naming the file."""
    return read_json_object(path, CheckpointError)


def _field(data: dict, key: str, source: Path | str, kind: type | tuple = int):
    if key not in data:
        raise CheckpointError(f"{source}: missing field '{key}'")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise CheckpointError(f"{source}: field '{key}' = {value!r} is not {kind}")
    return value


def read_added_tokens(ckpt: Path) -> dict[str, int]:
    """Token -> id for the added tokens (added_tokens.json, else tokenizer.json's 'added_tokens')."""
    path = ckpt / names.ADDED_TOKENS
    if path.is_file():
        return {str(k): int(v) for k, v in read_json(path).items()}
    tok = read_json(ckpt / names.TOKENIZER_JSON)
    added = tok.get("added_tokens")
    if not isinstance(added, list):
        raise CheckpointError(
            f"{ckpt / names.TOKENIZER_JSON}: no 'added_tokens' list and no {names.ADDED_TOKENS}"
        )
    return {str(t["content"]): int(t["id"]) for t in added}


def find_action_range(added: dict[str, int], source: str) -> tuple[int, int]:
    """Return (base_id, count) of the contiguous ``<robot_action_i>`` block.

    Raises:
        CheckpointError: no action tokens, indices missing, or ids not ``base + i``.
    """
    by_index = {}
    for tok, tid in added.items():
        m = _ACTION_RE.match(tok)
        if m:
            by_index[int(m.group(1))] = tid
    if not by_index:
        raise CheckpointError(f"{source}: no <robot_action_i> tokens among the added tokens")
    count = len(by_index)
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise CheckpointError(
            f"{source}: action tokens not numbered 0..{count - 1}; missing e.g. {missing[:5]}"
        )
    base = by_index[0]
    bad = [(i, by_index[i]) for i in range(count) if by_index[i] != base + i]
    if bad:
        i, tid = bad[0]
        raise CheckpointError(
            f"{source}: action ids not contiguous: <robot_action_{i}> has id {tid}, expected {base + i} "
            f"({len(bad)} tokens out of place)"
        )
    return base, count


@dataclass(frozen=True)
class FastConfig:
    """The FAST tokenizer's processor_config.json (physical-intelligence/fast layout)."""

    path: Path
    scale: float
    vocab_size: int
    min_token: int
    time_horizon: int | None
    action_dim: int | None

    @classmethod
    def load(cls, fast_dir: Path) -> FastConfig:
        src = fast_dir / names.FAST_PROCESSOR_CONFIG
        data = read_json(src)
        if not (fast_dir / names.TOKENIZER_JSON).is_file():
            raise CheckpointError(f"missing file: {fast_dir / names.TOKENIZER_JSON} (FAST BPE tokenizer)")
        th, ad = data.get("time_horizon"), data.get("action_dim")
        for key, v in (("time_horizon", th), ("action_dim", ad)):
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise CheckpointError(f"{src}: field '{key}' = {v!r} must be a positive int or null")
        return cls(
            path=fast_dir,
            scale=float(_field(data, "scale", src, (int, float))),
            vocab_size=_field(data, "vocab_size", src),
            min_token=_field(data, "min_token", src),
            time_horizon=th,
            action_dim=ad,
        )


@dataclass(frozen=True)
class NoraCheckpoint:
    """Metadata of a NORA checkpoint, read without torch.

    Attributes:
        path: checkpoint directory.
        config: parsed config.json.
        generation_config: parsed generation_config.json (greedy parity must use exactly this).
        action_base: Qwen id of ``<robot_action_0>``; FAST id i is Qwen id ``action_base + i``.
        num_action_tokens: number of contiguous action tokens.
        token_ids: special-token ids by name (im_start, im_end, vision_start, vision_end, image_pad, endoftext).
        norm_stats: unnorm key -> NormStats.
        fast: the FAST tokenizer's config (its directory is ``fast.path``).
        action_dim: D, from the FAST config or the norm stats (they must agree).
        time_horizon: T, from the FAST config or the caller.
        weight_files: safetensors files (one, or the shards named by the index).
    """

    path: Path
    config: dict
    generation_config: dict
    action_base: int
    num_action_tokens: int
    token_ids: dict[str, int]
    norm_stats: dict[str, NormStats]
    fast: FastConfig
    action_dim: int
    time_horizon: int
    weight_files: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def text_config(self) -> dict:
        return self.config.get("text_config") or self.config

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]

    @property
    def vocab_size(self) -> int:
        return int(self.text_config["vocab_size"])

    @property
    def action_ids(self) -> range:
        """Qwen ids of the action tokens (the action head's rows)."""
        return range(self.action_base, self.action_base + self.num_action_tokens)

    def norm_stats_for(self, unnorm_key: str | None) -> NormStats:
        """Stats for ``unnorm_key``; None picks the only key and is an error when there are several."""
        if unnorm_key is None:
            if len(self.norm_stats) != 1:
                raise InputError(
                    f"unnorm_key is required: {names.NORM_STATS} has {len(self.norm_stats)} keys "
                    f"{sorted(self.norm_stats)}"
                )
            return next(iter(self.norm_stats.values()))
        if unnorm_key not in self.norm_stats:
            raise InputError(
                f"unknown unnorm_key {unnorm_key!r}; {names.NORM_STATS} has {sorted(self.norm_stats)}"
            )
        return self.norm_stats[unnorm_key]

    @classmethod
    def load(
        cls, path: str | Path, fast_dir: str | Path | None = None, *, time_horizon: int | None = None
    ) -> NoraCheckpoint:
        """Read and cross-check a checkpoint directory.

        Args:
            path: the NORA checkpoint directory.
            fast_dir: FAST tokenizer directory; default ``path/fast`` (where nora-edge fixtures put it).
            time_horizon: T when the FAST config leaves it null (FAST+: 1 for NORA, 5 for NORA-Long); must
                agree with the FAST config when both are given.
        """
        ckpt = Path(path)
        if not ckpt.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {ckpt}")
        for name in REQUIRED_FILES:
            if not (ckpt / name).is_file():
                raise CheckpointError(f"missing file: {ckpt / name}")
        config = read_json(ckpt / names.CONFIG)
        if "vision_config" not in config:
            raise CheckpointError(
                f"{ckpt / names.CONFIG}: missing field 'vision_config' (not a Qwen2.5-VL config)"
            )
        text = config.get("text_config") or config
        vocab = _field(text, "vocab_size", ckpt / names.CONFIG)
        generation_config = read_json(ckpt / names.GENERATION_CONFIG)

        added = read_added_tokens(ckpt)
        base, count = find_action_range(added, str(ckpt / names.ADDED_TOKENS))
        if base + count > vocab:
            raise CheckpointError(
                f"{ckpt / names.CONFIG}: vocab_size {vocab} is smaller than the last action id {base + count - 1} + 1"
            )
        token_ids = _special_ids(added, config, ckpt)

        norm_stats = _read_norm_stats(ckpt / names.NORM_STATS)
        fast = FastConfig.load(Path(fast_dir) if fast_dir is not None else ckpt / names.FAST_SUBDIR)
        action_dim = _check_fast(fast, count, norm_stats)
        horizon = _resolve_horizon(fast, time_horizon)
        return cls(
            path=ckpt,
            config=config,
            generation_config=generation_config,
            action_base=base,
            num_action_tokens=count,
            token_ids=token_ids,
            norm_stats=norm_stats,
            fast=fast,
            action_dim=action_dim,
            time_horizon=horizon,
            weight_files=_weight_files(ckpt),
        )


_SPECIAL = {
    "endoftext": ("<|endoftext|>", None),
    "im_start": ("<|im_start|>", None),
    "im_end": ("<|im_end|>", None),
    "vision_start": ("<|vision_start|>", "vision_start_token_id"),
    "vision_end": ("<|vision_end|>", "vision_end_token_id"),
    "image_pad": ("<|image_pad|>", "image_token_id"),
    "video_pad": ("<|video_pad|>", "video_token_id"),
}


def _special_ids(added: dict[str, int], config: dict, ckpt: Path) -> dict[str, int]:
    ids = {}
    for name, (tok, cfg_key) in _SPECIAL.items():
        if tok not in added:
            raise CheckpointError(f"{ckpt}: special token {tok} not among the added tokens")
        ids[name] = added[tok]
        cfg_val = config.get(cfg_key) if cfg_key else None
        if cfg_val is None and cfg_key and isinstance(config.get("text_config"), dict):
            cfg_val = config["text_config"].get(cfg_key)
        if cfg_val is not None and cfg_val != added[tok]:
            raise CheckpointError(
                f"{ckpt / names.CONFIG}: field '{cfg_key}' = {cfg_val} but the tokenizer maps {tok} to {added[tok]}"
            )
    return ids


def _read_norm_stats(path: Path) -> dict[str, NormStats]:
    data = read_json(path)
    if not data:
        raise CheckpointError(f"{path}: no unnorm keys")
    return {key: NormStats.from_json(key, entry, str(path)) for key, entry in data.items()}


def _check_fast(fast: FastConfig, num_action_tokens: int, norm_stats: dict[str, NormStats]) -> int:
    src = fast.path / names.FAST_PROCESSOR_CONFIG
    if fast.vocab_size != num_action_tokens:
        raise CheckpointError(
            f"FAST dir mismatch: {src} field 'vocab_size' = {fast.vocab_size} but the checkpoint has "
            f"{num_action_tokens} <robot_action_i> tokens"
        )
    dims = {ns.action_dim for ns in norm_stats.values()}
    if len(dims) != 1:
        raise CheckpointError(f"norm_stats.json: keys disagree on action_dim: {sorted(dims)}")
    (dim,) = dims
    if fast.action_dim is not None and fast.action_dim != dim:
        raise CheckpointError(
            f"FAST dir mismatch: {src} field 'action_dim' = {fast.action_dim} but norm_stats.json q01 has {dim} dims"
        )
    return dim


def _resolve_horizon(fast: FastConfig, time_horizon: int | None) -> int:
    src = fast.path / names.FAST_PROCESSOR_CONFIG
    if time_horizon is not None and (not isinstance(time_horizon, int) or time_horizon <= 0):
        raise InputError(f"time_horizon must be a positive int, got {time_horizon!r}")
    if fast.time_horizon is None and time_horizon is None:
        raise CheckpointError(
            f"{src}: field 'time_horizon' is null (FAST+); pass time_horizon (1 for NORA, 5 for NORA-Long)"
        )
    if fast.time_horizon is not None and time_horizon is not None and fast.time_horizon != time_horizon:
        raise CheckpointError(
            f"{src}: field 'time_horizon' = {fast.time_horizon} but {time_horizon} was requested"
        )
    return int(time_horizon if time_horizon is not None else fast.time_horizon)


def _weight_files(ckpt: Path) -> tuple[Path, ...]:
    index = ckpt / names.SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing field 'weight_map'")
        shards = tuple(ckpt / s for s in sorted(set(weight_map.values())))
        for s in shards:
            if not s.is_file():
                raise CheckpointError(f"missing file: {s} (named in {index.name})")
        return shards
    single = ckpt / names.SAFETENSORS_SINGLE
    if single.is_file():
        return (single,)
    raise CheckpointError(f"{ckpt}: no {names.SAFETENSORS_SINGLE} and no {names.SAFETENSORS_INDEX}")
