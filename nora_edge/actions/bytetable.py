"""FAST byte table: the BPE vocabulary compiled into flat arrays, and a decode that needs no ``tokenizers``.

Data flow (compile, export side): tokenizer.json (byte-level BPE) --per id: token string --GPT-2 byte-level
char map--> raw bytes--> ``offsets (V+1,) int32`` + ``data (N,) uint8``.
Data flow (decode, runtime or C/CUDA): ids --gather--> bytes --strict UTF-8--> code points
--+ min_token--> coefficients (T*D,) --reshape--> (T, D) --/ scale, iDCT--> actions (T, D) float64.

The per-id bytes follow ``tokenizers``' ByteLevel decoder: a token whose every char is in the byte-level
alphabet becomes those bytes; any other token (FAST's raw initial-alphabet chars, e.g. U+03E8) becomes its
own UTF-8 encoding. ``tokenizers`` then applies a lossy UTF-8 decode; here the decode is strict and an
error names the byte offset.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nora_edge.actions.dct import idct_basis
from nora_edge.actions.result import DecodeResult, decode_batch
from nora_edge.atomic import atomic_path, write_bytes_atomic
from nora_edge.errors import BundleError, CheckpointError, DetokenizationError

TABLE_FORMAT_VERSION = 1
RAW_OFFSETS = "fast_offsets.i32"  # little-endian int32 (V+1,)
RAW_DATA = "fast_bytes.u8"  # uint8 (N,)
RAW_META = "fast_table.json"  # min_token, scale, alphabet_max, vocab_size, format_version


def detokenization_error(reason: str, message: str) -> DetokenizationError:
    """Build a :class:`DetokenizationError` carrying a machine-readable ``reason`` attribute.

    Reasons: ``id_out_of_range``, ``not_integer``, ``invalid_utf8``, ``coefficient_out_of_range``,
    ``wrong_count``, ``not_allowed`` (automaton).
    """
    err = DetokenizationError(message)
    err.reason = reason  # type: ignore[attr-defined]
    return err


@functools.lru_cache(maxsize=1)
def byte_level_char_map() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: printable char -> byte value (256 entries).

    Bytes 33..126, 161..172 and 174..255 stand for themselves; the other 68 bytes, in increasing order,
    are shifted to chars U+0100, U+0101, ... so that every byte has a visible char.
    """
    self_mapped = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in set(self_mapped)]
    mapping = {chr(b): b for b in self_mapped}
    mapping.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return mapping


def token_to_bytes(token: str) -> bytes:
    """Raw bytes one vocabulary token decodes to under the ByteLevel decoder (see module docstring)."""
    char_map = byte_level_char_map()
    if all(ch in char_map for ch in token):
        return bytes(char_map[ch] for ch in token)
    return token.encode("utf-8")


def check_id_range(ids: np.ndarray, vocab_size: int) -> None:
    """Raise ``id_out_of_range`` if any id is outside [0, vocab_size); ``ids`` is int64 (L,)."""
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        pos = int(bad[0])
        raise detokenization_error(
            "id_out_of_range",
            f"FAST id {int(ids[pos])} at position {pos} is outside the vocabulary [0, {vocab_size})"
            f" ({bad.size} out-of-range id(s) in a sequence of {ids.size})",
        )


def id_list(ids: object, vocab_size: int) -> list[int]:
    """Validate one id sequence (integers in [0, vocab_size)) and return it as a list of Python ints.

    A list of plain ints (what generation produces) takes a fast path without numpy.
    """
    if isinstance(ids, list) and all(type(i) is int for i in ids):
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            check_id_range(np.asarray(ids, dtype=np.int64), vocab_size)
        return ids
    arr = as_id_array(ids)
    check_id_range(arr, vocab_size)
    return arr.tolist()


def as_id_array(ids: object) -> np.ndarray:
    """Convert one id sequence to int64 (L,), raising ``not_integer`` for anything that is not integral."""
    arr = np.asarray(ids)
    if arr.ndim != 1 and not (arr.ndim == 0 and arr.size == 0):
        raise detokenization_error("not_integer", f"an id sequence must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise detokenization_error("not_integer", f"FAST ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


@dataclass(frozen=True)
class ByteTable:
    """Per-id raw bytes of a FAST byte-level BPE vocabulary, plus the FAST decode parameters.

    Attributes:
        offsets: int32 (V+1,); id ``i`` owns ``data[offsets[i]:offsets[i+1]]``.
        data: uint8 (N,), all tokens' bytes back to back.
        min_token: FAST ``min_token`` (coefficient = code point + min_token).
        scale: FAST quantization scale.
        alphabet_max: largest code point the decoder accepts (the fitted coefficient alphabet is
            U+0000..alphabet_max). Inferred as the longest run chr(0), chr(1), ... of single-char tokens;
            that can overshoot by a few code points but never undershoot.
    """

    offsets: np.ndarray
    data: np.ndarray
    min_token: int
    scale: float
    alphabet_max: int
    _token_bytes: list[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        offsets, data = self.offsets, self.data
        if offsets.dtype != np.int32 or offsets.ndim != 1 or offsets.size < 2:
            raise BundleError(f"byte table offsets must be int32 (V+1,), got {offsets.dtype} {offsets.shape}")
        if data.dtype != np.uint8 or data.ndim != 1:
            raise BundleError(f"byte table data must be uint8 (N,), got {data.dtype} {data.shape}")
        if offsets[0] != 0 or offsets[-1] != data.size or np.any(np.diff(offsets) < 1):
            raise BundleError(
                "byte table offsets must start at 0, end at len(data) and give every id >= 1 byte"
            )
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise BundleError(f"byte table scale must be a positive finite number, got {self.scale!r}")
        raw = data.tobytes()
        bounds = offsets.tolist()
        object.__setattr__(
            self, "_token_bytes", [raw[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids V."""
        return int(self.offsets.size - 1)

    @property
    def lengths(self) -> np.ndarray:
        """int32 (V,) bytes per id."""
        return np.diff(self.offsets)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one id."""
        return self._token_bytes[token_id]

    @classmethod
    def from_tokenizer(cls, tokenizer: object, *, min_token: int, scale: float) -> ByteTable:
        """Compile a ``tokenizers.Tokenizer`` (byte-level BPE, ByteLevel decoder, no added tokens).

        Raises:
            CheckpointError: the tokenizer is not a plain byte-level BPE as FAST writes it.
        """
        spec = json.loads(tokenizer.to_str())  # type: ignore[attr-defined]
        decoder = (spec.get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            raise CheckpointError(f"tokenizer.json: FAST needs decoder type 'ByteLevel', found {decoder!r}")
        if spec.get("added_tokens"):
            names = [t.get("content") for t in spec["added_tokens"]][:5]
            raise CheckpointError(f"tokenizer.json: FAST tokenizer must have no added tokens, found {names}")
        vocab_size = tokenizer.get_vocab_size()  # type: ignore[attr-defined]
        chunks = []
        for token_id in range(vocab_size):
            token = tokenizer.id_to_token(token_id)  # type: ignore[attr-defined]
            if token is None:
                raise CheckpointError(f"tokenizer.json: vocabulary has no token for id {token_id}")
            chunks.append(token_to_bytes(token))
        lengths = np.array([len(c) for c in chunks], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # (V+1,)
        data = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()  # (N,)
        vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
        alphabet_max = -1
        while chr(alphabet_max + 1) in vocab:
            alphabet_max += 1
        if alphabet_max < 0:
            raise CheckpointError("tokenizer.json: no FAST coefficient alphabet (token '\\x00' is missing)")
        return cls(offsets, data, int(min_token), float(scale), alphabet_max)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one uncompressed ``.npz`` atomically (offsets, data, meta as int64/float64 scalars)."""
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(
                tmp,
                offsets=self.offsets,
                data=self.data,
                min_token=np.int64(self.min_token),
                scale=np.float64(self.scale),
                alphabet_max=np.int64(self.alphabet_max),
                format_version=np.int64(TABLE_FORMAT_VERSION),
            )
        return path

    def save_raw(self, directory: str | os.PathLike[str]) -> Path:
        """Write the raw files a C/CUDA decoder reads (``RAW_OFFSETS``, ``RAW_DATA``, ``RAW_META``), atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": TABLE_FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "n_bytes": int(self.data.size),
            "min_token": self.min_token,
            "scale": self.scale,
            "alphabet_max": self.alphabet_max,
        }
        payloads = {
            RAW_OFFSETS: self.offsets.astype("<i4").tobytes(),
            RAW_DATA: self.data.tobytes(),
            RAW_META: (json.dumps(meta, indent=2) + "\n").encode("utf-8"),
        }
        for name, payload in payloads.items():
            write_bytes_atomic(directory / name, payload)
        return directory

    @classmethod
    def load_raw(cls, directory: str | os.PathLike[str]) -> ByteTable:
        """Read the files written by :meth:`save_raw`.

        Raises:
            BundleError: a file is missing, the meta is malformed, or sizes disagree with the meta.
        """
        directory = Path(directory)
        for name in (RAW_OFFSETS, RAW_DATA, RAW_META):
            if not (directory / name).is_file():
                raise BundleError(f"byte table file missing: {directory / name}")
        try:
            meta = json.loads((directory / RAW_META).read_text(encoding="utf-8"))
            version, vocab, n_bytes = meta["format_version"], meta["vocab_size"], meta["n_bytes"]
            min_token, scale, alphabet_max = meta["min_token"], meta["scale"], meta["alphabet_max"]
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{directory / RAW_META}: malformed ({exc!r})") from exc
        if version != TABLE_FORMAT_VERSION:
            raise BundleError(
                f"{directory / RAW_META}: format_version {version}, expected {TABLE_FORMAT_VERSION}"
            )
        offsets = np.fromfile(directory / RAW_OFFSETS, dtype="<i4").astype(np.int32)
        data = np.fromfile(directory / RAW_DATA, dtype=np.uint8)
        if offsets.size != vocab + 1 or data.size != n_bytes:
            raise BundleError(
                f"{directory}: {RAW_OFFSETS} has {offsets.size} entries (expected {vocab + 1}),"
                f" {RAW_DATA} {data.size} bytes (expected {n_bytes})"
            )
        return cls(offsets, data, int(min_token), float(scale), int(alphabet_max))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ByteTable:
        """Read a table written by :meth:`save`.

        Raises:
            BundleError: missing file, missing array or unknown format version.
        """
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"byte table file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise BundleError(f"byte table {path} is not a readable .npz: {exc}") from exc
        needed = ("offsets", "data", "min_token", "scale", "alphabet_max", "format_version")
        missing = [k for k in needed if k not in arrays]
        if missing:
            raise BundleError(f"byte table {path} lacks array(s) {missing}")
        if int(arrays["format_version"]) != TABLE_FORMAT_VERSION:
            raise BundleError(
                f"byte table {path}: format_version {int(arrays['format_version'])},"
                f" this build reads {TABLE_FORMAT_VERSION}"
            )
        return cls(
            arrays["offsets"],
            arrays["data"],
            int(arrays["min_token"]),
            float(arrays["scale"]),
            int(arrays["alphabet_max"]),
        )

    def concat_bytes(self, ids: object) -> bytes:
        """Range-check one id sequence and concatenate its tokens' bytes."""
        table = self._token_bytes
        return b"".join([table[i] for i in id_list(ids, self.vocab_size)])

    def text(self, ids: object) -> str:
        """Strictly decode one id sequence to a string (one char per coefficient).

        Raises:
            DetokenizationError: out-of-range id, or invalid UTF-8 (the message names the byte offset,
                the offending byte and the id that holds it).
        """
        raw = self.concat_bytes(ids)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._utf8_error(ids, raw, exc.start, exc.reason) from None

    def code_points(self, ids: object) -> np.ndarray:
        """Strictly decode one id sequence to int64 (L,) Unicode code points (see :meth:`text`)."""
        return np.frombuffer(self.text(ids).encode("utf-32-le"), dtype="<u4").astype(np.int64)  # (L,)

    def _utf8_error(self, ids: object, raw: bytes, offset: int, why: str) -> DetokenizationError:
        arr = np.asarray(id_list(ids, self.vocab_size), dtype=np.int64)
        ends = np.cumsum(self.lengths[arr])  # (L,) end byte offset of each id
        pos = int(np.searchsorted(ends, offset, side="right"))
        return detokenization_error(
            "invalid_utf8",
            f"invalid UTF-8 at byte offset {offset} (byte 0x{raw[offset]:02x}, {why}) in FAST id"
            f" {int(arr[pos])} at position {pos}; {len(raw)} bytes from {arr.size} ids",
        )

    def check_text(self, text: str, time_horizon: int, action_dim: int) -> None:
        """Raise unless ``text`` holds exactly T*D chars, all inside the coefficient alphabet."""
        if text and ord(max(text)) > self.alphabet_max:
            i, cp = next((i, ord(ch)) for i, ch in enumerate(text) if ord(ch) > self.alphabet_max)
            raise detokenization_error(
                "coefficient_out_of_range",
                f"coefficient {cp + self.min_token} (code point U+{cp:04X}) at index {i} is outside the"
                f" tokenizer's alphabet [{self.min_token}, {self.alphabet_max + self.min_token}]",
            )
        expected = time_horizon * action_dim
        if len(text) != expected:
            raise detokenization_error(
                "wrong_count",
                f"decoded {len(text)} coefficients, expected time_horizon*action_dim ="
                f" {time_horizon}*{action_dim} = {expected}",
            )

    def coefficients_from_text(self, text: str, time_horizon: int, action_dim: int) -> np.ndarray:
        """Checked chars -> int64 (T, D) quantized DCT coefficients (code point + min_token)."""
        self.check_text(text, time_horizon, action_dim)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)  # (T*D,)
        return (cps + self.min_token).reshape(time_horizon, action_dim)  # (T, D)

    def actions_from_text(self, text: str, time_horizon: int, action_dim: int) -> np.ndarray:
        """Checked chars -> float64 (T, D) actions: iDCT of (code point + min_token) / scale."""
        self.check_text(text, time_horizon, action_dim)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.float64)  # (T*D,)
        return self.actions_from_coefficients((cps + self.min_token).reshape(time_horizon, action_dim))

    def actions_from_coefficients(self, coeffs: np.ndarray) -> np.ndarray:
        """Integer DCT coefficients (code point + min_token), (T, D) any numeric dtype -> float64 (T, D)
        actions: iDCT of coefficients / scale (what every decode path ends with, e.g. after libnora_fast)."""
        coeffs = np.asarray(coeffs, dtype=np.float64)
        return np.matmul(idct_basis(coeffs.shape[0]), coeffs / self.scale)  # (T, T) @ (T, D)

    def decode_coefficients(self, ids: object, time_horizon: int, action_dim: int) -> np.ndarray:
        """Strict decode of one id sequence to int64 (T, D) coefficients."""
        return self.coefficients_from_text(self.text(ids), time_horizon, action_dim)

    def decode_chunk(self, ids: object, time_horizon: int, action_dim: int) -> np.ndarray:
        """Strict decode of one id sequence to float64 (T, D) actions (iDCT of coefficients / scale)."""
        return self.actions_from_text(self.text(ids), time_horizon, action_dim)

    def decode(
        self,
        ids: object,
        time_horizon: int,
        action_dim: int,
        *,
        on_error: str = "raise",
        last_good: np.ndarray | None = None,
    ) -> np.ndarray | DecodeResult:
        """Batch decode without ``tokenizers``; same contract as ``FastTokenizer.decode``.

        Returns:
            float64 (B, T, D) for "raise"; :class:`DecodeResult` for "hold".
        """
        return decode_batch(
            lambda seq: self.decode_chunk(seq, time_horizon, action_dim),
            ids,
            time_horizon,
            action_dim,
            on_error,
            last_good,
        )
