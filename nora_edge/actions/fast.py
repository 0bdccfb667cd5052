"""FAST / FAST+ action tokenizer (physical-intelligence/fast layout), runtime side: numpy + ``tokenizers``.

Data flow:
  encode: chunk (T, D) --DCT-II ortho over time--> * scale --round--> int (T, D) --flatten row-major-->
          chars chr(max(c - min_token, 0)) --byte-level BPE--> ids
  decode: ids --BPE decode--> string --ord + min_token--> (T*D,) --reshape--> (T, D) --/ scale, DCT-III-->
          actions (T, D) float64
  fit:    chunks --DCT, quantize--> min/max over all data --BPE training (initial alphabet = every char of
          the coefficient range, min_frequency 2, no special tokens)--> FastTokenizer
A directory holds ``processor_config.json`` (scale, vocab_size, min_token, time_horizon, action_dim),
``tokenizer.json`` and ``tokenizer_config.json``, as the published FAST+ does.

Unlike the published processor, a decode failure is never turned into zeros: strict mode raises
:class:`~nora_edge.errors.DetokenizationError` and ``on_error="hold"`` substitutes the caller's previous chunk
and says so in a :class:`~nora_edge.actions.result.DecodeResult`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from nora_edge.actions.bytetable import ByteTable, id_list
from nora_edge.actions.dct import dct_ortho
from nora_edge.actions.result import DecodeResult, decode_batch
from nora_edge.atomic import read_json_object, write_text_atomic
from nora_edge.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
PROCESSOR_CLASS = "UniversalActionProcessor"
AUTO_MAP = {"AutoProcessor": "processing_action_tokenizer.UniversalActionProcessor"}
MAX_CODE_POINT = 0xD7FF  # below the surrogate block, so every coefficient char is a valid Unicode scalar


def new_byte_level_bpe() -> Tokenizer:
    """An empty BPE with the pieces of ``tokenizers.ByteLevelBPETokenizer()`` (no prefix space, GPT-2 regex)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def as_chunk_list(chunks: object, what: str) -> list[np.ndarray]:
    """Validate chunks: ``(B, T, D)`` array, one ``(T, D)`` array or a list of ``(T, D)`` arrays; finite floats."""
    if isinstance(chunks, np.ndarray):
        if chunks.ndim == 2:
            chunks = [chunks]
        elif chunks.ndim == 3:
            chunks = list(chunks)  # (B, T, D) -> B x (T, D)
        else:
            raise InputError(f"{what}: chunks must be (T, D) or (B, T, D), got shape {chunks.shape}")
    out = []
    for i, chunk in enumerate(chunks):  # type: ignore[arg-type]
        arr = np.asarray(chunk, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise InputError(f"{what}: chunk {i} must be a non-empty (T, D) array, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{what}: chunk {i} contains NaN or inf")
        out.append(arr)
    if not out:
        raise InputError(f"{what}: no chunks given")
    return out


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as int if it is a positive integer, else raise InputError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class FastTokenizer:
    """FAST action tokenizer: DCT + byte-level BPE, strict decode, published directory layout.

    Attributes:
        scale: quantization scale (FAST+: 10).
        min_token: smallest quantized coefficient of the fit data (FAST+: -354).
        config_vocab_size: ``vocab_size`` as written in processor_config.json (the requested size).
        time_horizon, action_dim: defaults for decode; None as in FAST+ (then pass them to decode).
        tokenizer: the ``tokenizers.Tokenizer``.
        table: the compiled :class:`ByteTable` (strict UTF-8 diagnostics, alphabet bound, C library input).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        scale: float,
        min_token: int,
        vocab_size: int,
        time_horizon: int | None = None,
        action_dim: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.scale = float(scale)
        self.min_token = int(min_token)
        self.config_vocab_size = int(vocab_size)
        self.time_horizon = None if time_horizon is None else check_positive_int(time_horizon, "time_horizon")
        self.action_dim = None if action_dim is None else check_positive_int(action_dim, "action_dim")
        if tokenizer.get_vocab_size() > self.config_vocab_size:
            raise CheckpointError(
                f"tokenizer.json has {tokenizer.get_vocab_size()} tokens, more than processor_config.json"
                f" vocab_size {self.config_vocab_size}"
            )
        self.table = ByteTable.from_tokenizer(tokenizer, min_token=self.min_token, scale=self.scale)

    @property
    def vocab_size(self) -> int:
        """Number of ids the decoder accepts: [0, vocab_size). May be below ``config_vocab_size``."""
        return self.table.vocab_size

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> FastTokenizer:
        """Load a FAST directory (processor_config.json + tokenizer.json).

        Raises:
            CheckpointError: a file is missing or unreadable, or a config field is missing or mistyped.
        """
        directory = Path(directory)
        cfg_path, tok_path = directory / PROCESSOR_CONFIG, directory / TOKENIZER_FILE
        for path in (cfg_path, tok_path):
            if not path.is_file():
                raise CheckpointError(f"FAST tokenizer file missing: {path}")
        cfg = read_json_object(cfg_path, CheckpointError)
        fields = read_processor_fields(cfg, cfg_path)
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise CheckpointError(f"{tok_path}: cannot be loaded by tokenizers ({exc})") from exc
        try:
            return cls(tokenizer, **fields)
        except InputError as exc:
            raise CheckpointError(f"{cfg_path}: {exc}") from exc

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the three files of the published layout; each file is written atomically.

        Returns:
            The directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        processor = {
            "action_dim": self.action_dim,
            "auto_map": AUTO_MAP,
            "min_token": self.min_token,
            "processor_class": PROCESSOR_CLASS,
            "scale": int(self.scale) if float(self.scale).is_integer() else self.scale,
            "time_horizon": self.time_horizon,
            "vocab_size": self.config_vocab_size,
        }
        tokenizer_config = {
            "added_tokens_decoder": {},
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1000000000000000019884624838656,
            "processor_class": PROCESSOR_CLASS,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        write_text_atomic(directory / TOKENIZER_FILE, self.tokenizer.to_str(pretty=True))
        write_text_atomic(directory / TOKENIZER_CONFIG, json.dumps(tokenizer_config, indent=2) + "\n")
        write_text_atomic(directory / PROCESSOR_CONFIG, json.dumps(processor, indent=2) + "\n")
        return directory

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(
        cls,
        chunks: Sequence[np.ndarray] | np.ndarray,
        *,
        scale: float = 10.0,
        vocab_size: int = 2048,
        time_horizon: int | None = None,
        action_dim: int | None = None,
        show_progress: bool = False,
    ) -> FastTokenizer:
        """Fit a FAST tokenizer with the published algorithm.

        Args:
            chunks: list of (T, D) arrays (T may vary) or one (B, T, D) array, normalized actions.
            scale: quantization scale.
            vocab_size: BPE vocabulary size; the trained vocabulary may stay smaller when the data has too
                few pairs with frequency >= 2.
            time_horizon, action_dim: decode defaults to store (None = give them at decode).
            show_progress: show the ``tokenizers`` training progress bar.

        Raises:
            InputError: bad chunks, or the coefficient range does not fit in ``vocab_size``.
        """
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise InputError(f"scale must be a positive finite number, got {scale!r}")
        vocab_size = check_positive_int(vocab_size, "vocab_size")
        quantized = [
            np.rint(dct_ortho(c) * scale).astype(np.int64).reshape(-1) for c in as_chunk_list(chunks, "fit")
        ]
        flat = np.concatenate(quantized)  # (sum T*D,)
        min_token, max_token = int(flat.min()), int(flat.max())
        span = max_token - min_token
        if span > vocab_size:
            raise InputError(
                f"vocab_size {vocab_size} is too small for the coefficient range [{min_token}, {max_token}]"
                f" ({span + 1} values); raise vocab_size or lower scale"
            )
        if span > MAX_CODE_POINT:
            raise InputError(
                f"coefficient range {span + 1} exceeds the usable code points ({MAX_CODE_POINT + 1})"
            )
        if span + 100 > vocab_size:
            log.warning("initial alphabet %d is almost as large as vocab_size %d", span + 1, vocab_size)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            show_progress=show_progress,
            special_tokens=[],
            initial_alphabet=[chr(i) for i in range(span + 1)],
            max_token_length=10000,
        )
        tokenizer = new_byte_level_bpe()
        tokenizer.train_from_iterator(
            ("".join(map(chr, (q - min_token).tolist())) for q in quantized), trainer
        )
        return cls(
            tokenizer,
            scale=scale,
            min_token=min_token,
            vocab_size=vocab_size,
            time_horizon=time_horizon,
            action_dim=action_dim,
        )

    # ------------------------------------------------------------------ encode
    def quantize(self, chunks: np.ndarray) -> np.ndarray:
        """DCT and quantize: (T, D) or (B, T, D) floats -> int64 (B, T, D) coefficients (no clamping)."""
        arrs = as_chunk_list(chunks, "quantize")
        if len({a.shape for a in arrs}) != 1:
            raise InputError(f"quantize: chunks differ in shape: {sorted({a.shape for a in arrs})}")
        return np.rint(dct_ortho(np.stack(arrs)) * self.scale).astype(np.int64)  # (B, T, D)

    def encode(self, chunks: np.ndarray) -> list[list[int]]:
        """Encode action chunks with the published rule (``c - min_token`` clamped at 0).

        Args:
            chunks: float (T, D) or (B, T, D).

        Returns:
            One id list per chunk.

        Raises:
            InputError: bad shape / non-finite values, shape differs from the configured time_horizon or
                action_dim, or a coefficient has no representation in the vocabulary (would be dropped).
        """
        coeffs = self.quantize(chunks)  # (B, T, D)
        _, t, d = coeffs.shape
        for name, want, got in (("time_horizon", self.time_horizon, t), ("action_dim", self.action_dim, d)):
            if want is not None and want != got:
                raise InputError(f"encode: chunk {name} is {got}, the tokenizer is configured for {want}")
        cps = np.maximum(coeffs.reshape(coeffs.shape[0], -1) - self.min_token, 0)  # (B, T*D) row-major
        if cps.max() > MAX_CODE_POINT:
            b, i = np.unravel_index(int(np.argmax(cps)), cps.shape)
            raise InputError(
                f"encode: chunk {b} coefficient {int(coeffs.reshape(cps.shape)[b, i])} at flat index {i} is far"
                f" outside the fitted range (min_token {self.min_token}); the input is probably not normalized"
            )
        texts = ["".join(map(chr, row)) for row in cps.tolist()]
        encodings = self.tokenizer.encode_batch(texts)
        lengths = self.table.lengths
        out = []
        for b, (text, enc) in enumerate(zip(texts, encodings, strict=True)):
            ids = enc.ids
            if int(lengths[ids].sum()) != len(text.encode("utf-8")):
                raise InputError(
                    f"encode: chunk {b} has coefficients whose bytes are not in the vocabulary (they would be"
                    f" dropped); coefficient range seen {int(coeffs[b].min())}..{int(coeffs[b].max())}"
                )
            out.append(ids)
        return out

    # ------------------------------------------------------------------ decode
    def resolve_shape(self, time_horizon: int | None, action_dim: int | None) -> tuple[int, int]:
        """Decode shape: explicit arguments first, then the config; missing both is an InputError."""
        t = time_horizon if time_horizon is not None else self.time_horizon
        d = action_dim if action_dim is not None else self.action_dim
        if t is None or d is None:
            raise InputError(
                "decode needs time_horizon and action_dim: processor_config.json leaves them null (FAST+),"
                f" pass them explicitly (got time_horizon={t!r}, action_dim={d!r})"
            )
        return check_positive_int(t, "time_horizon"), check_positive_int(d, "action_dim")

    def decode_coefficients(self, ids: object, time_horizon: int, action_dim: int) -> np.ndarray:
        """Strict decode of one id sequence through ``tokenizers`` to int64 (T, D) coefficients.

        Raises:
            DetokenizationError: id out of range, invalid UTF-8 (byte offset named), coefficient outside the
                fitted alphabet, or a coefficient count other than T*D.
        """
        t, d = self.resolve_shape(time_horizon, action_dim)
        return self.table.coefficients_from_text(self.checked_text(ids), t, d)  # (T, D)

    def checked_text(self, ids: object) -> str:
        """``tokenizers`` decode of one range-checked id sequence; invalid UTF-8 raises (byte offset named)."""
        text = self.tokenizer.decode(id_list(ids, self.vocab_size))
        if (
            "\ufffd" in text
        ):  # lossy decode replaced invalid bytes, or a literal U+FFFD: the table tells which
            return self.table.text(ids)
        return text

    def decode(
        self,
        ids: object,
        time_horizon: int | None = None,
        action_dim: int | None = None,
        *,
        on_error: str = "raise",
        last_good: np.ndarray | None = None,
    ) -> np.ndarray | DecodeResult:
        """Decode id sequences to actions.

        Args:
            ids: ``list[list[int]]`` / (B, L) array for a batch, ``list[int]`` / (L,) array for one chunk.
            time_horizon, action_dim: override the config (required when it has null, as FAST+).
            on_error: "raise" (strict, default) or "hold" (failed chunks take ``last_good``).
            last_good: the previous good chunk, (T, D) or (B, T, D); required for "hold".

        Returns:
            "raise": float64 (B, T, D). "hold": :class:`DecodeResult` with per-chunk ok flags and reasons.
        """
        t, d = self.resolve_shape(time_horizon, action_dim)

        def decode_one(seq: object) -> np.ndarray:
            return self.table.actions_from_text(self.checked_text(seq), t, d)  # (T, D)

        return decode_batch(decode_one, ids, t, d, on_error, last_good)


def read_processor_fields(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """Extract and type-check the FastTokenizer fields of a processor_config.json object."""
    missing = [k for k in ("scale", "vocab_size", "min_token") if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {missing}")
    scale, vocab, min_token = cfg["scale"], cfg["vocab_size"], cfg["min_token"]
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise CheckpointError(f"{path}: field 'scale' must be a positive number, got {scale!r}")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise CheckpointError(f"{path}: field 'vocab_size' must be a positive integer, got {vocab!r}")
    if isinstance(min_token, bool) or not isinstance(min_token, int):
        raise CheckpointError(f"{path}: field 'min_token' must be an integer, got {min_token!r}")
    fields: dict[str, Any] = {"scale": scale, "vocab_size": vocab, "min_token": min_token}
    for key in ("time_horizon", "action_dim"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{path}: field '{key}' must be null or a positive integer, got {value!r}")
        fields[key] = value
    return fields
