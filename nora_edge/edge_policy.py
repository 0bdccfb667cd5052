"""libnora_edge's policy object from Python (ctypes over ``kernels/include/nora_edge.h``): the C runtime that
firmware links, driven from Python for parity tests and side-by-side benchmarks.

Data flow: ``EdgePolicy.load(bundle, onnxruntime=...)`` --nora_policy_create (bundle verified, both graphs opened
through the given libonnxruntime, prompt prefix prefilled)--> ``step(frame, instruction, unnorm_key)``
--nora_policy_step--> :class:`EdgeChunk` (actions (T, D) float64, generated ids, token classes, timings);
``select_action`` / ``reset`` mirror :class:`nora_edge.policy.NoraPolicy`'s queue; ``decoding="multi-token"``
runs the library's lossless multi-token loop (nora_edge/multitoken.py's algorithm, its draft table seeded from the
bundle's ``drafts.json`` unless ``bundle_drafts=False``; counters in :attr:`EdgeChunk.counters`). A non-OK status raises the
Python runtime's exception for it (InputError, BundleError, DetokenizationError, ForcedTokenError) with the
library's message.

The library: ``kernels/build/libnora_edge.so`` (``make -C kernels runtime``) or an explicit path; onnxruntime: the
pip wheel's ``onnxruntime/capi/libonnxruntime.so.1.*`` by default (:func:`wheel_onnxruntime`).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nora_edge.errors import BundleError, DetokenizationError, ForcedTokenError, InputError
from nora_edge.generate import TOKEN_CLASSES

REPO_LIB = Path(__file__).resolve().parent.parent / "kernels" / "build" / "libnora_edge.so"
STATUS = ("ok", "input", "bundle", "detokenize", "forced", "unsupported", "runtime", "nomem")


class EdgeRuntimeError(RuntimeError):
    """libnora_edge could not load, or returned unsupported / runtime / out-of-memory."""

    def __init__(self, message: str, status: str = "runtime") -> None:
        super().__init__(message)
        self.status = status


class _Options(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("onnxruntime_path", ctypes.c_char_p),
        ("threads", ctypes.c_int32),
        ("verify_hashes", ctypes.c_int32),
        ("forced_tokens", ctypes.c_int32),
        ("max_repaired", ctypes.c_int32),
        # ABI 0.3
        ("provider", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("trt_cache_dir", ctypes.c_char_p),
        ("trt_fp16", ctypes.c_int32),
        # ABI 0.4
        ("decoding", ctypes.c_int32),
        ("max_draft", ctypes.c_int32),
        ("tie_margin", ctypes.c_double),
        ("gate_rate", ctypes.c_double),
        ("adaptive_draft", ctypes.c_int32),
        # ABI 0.5 (reserved0: the 0.4 struct's tail padding, ignored)
        ("reserved0", ctypes.c_int32),
        ("bundle_drafts", ctypes.c_int32),
    ]


# nora_edge_provider (nora_edge.h): where the graphs run
PROVIDERS = ("cpu", "cuda", "tensorrt")
# nora_edge_decoding (nora_edge.h, ABI 0.4): the names of nora_edge.policy.DECODINGS
DECODINGS = ("plain", "multi-token")
# nora_chunk_info's ABI 0.4 counters (EdgeChunk.counters)
COUNTERS = ("decoder_calls", "verify_calls", "proposed", "accepted", "fallback")


class _Info(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("time_horizon", ctypes.c_int32),
        ("action_dim", ctypes.c_int32),
        ("max_tokens", ctypes.c_int32),
        ("num_unnorm_keys", ctypes.c_int32),
        ("prefix_tokens", ctypes.c_int32),
        ("max_len", ctypes.c_int32),
        ("onnxruntime_version", ctypes.c_char * 32),
    ]


class _ChunkInfo(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("num_tokens", ctypes.c_int32),
        ("class_counts", ctypes.c_int32 * 3),
        ("flagged", ctypes.c_int32),
        ("prompt_tokens", ctypes.c_int32),
        *[
            (n, ctypes.c_double)
            for n in ("preprocess_s", "vision_s", "prefill_s", "decode_s", "detokenize_s", "total_s")
        ],
        ("decode_step_min_s", ctypes.c_double),
        ("decode_step_max_s", ctypes.c_double),
        # ABI 0.4
        *[(n, ctypes.c_int32) for n in COUNTERS],
    ]


_P = ctypes.c_void_p
_FRAME = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p]
_SIGNATURES = {
    "nora_edge_last_error": (ctypes.c_char_p, []),
    "nora_policy_options_init": (None, [ctypes.POINTER(_Options)]),
    "nora_policy_create": (ctypes.c_int, [ctypes.c_char_p, ctypes.POINTER(_Options), ctypes.POINTER(_P)]),
    "nora_policy_destroy": (None, [_P]),
    "nora_policy_get_info": (ctypes.c_int, [_P, ctypes.POINTER(_Info)]),
    "nora_policy_step": (
        ctypes.c_int,
        [
            _P,
            *_FRAME,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.POINTER(_ChunkInfo),
        ],
    ),  # fmt: skip
    "nora_policy_select_action": (
        ctypes.c_int,
        [_P, *_FRAME, ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int32)],
    ),
    "nora_policy_reset": (ctypes.c_int, [_P]),
}


def wheel_onnxruntime() -> Path:
    """The onnxruntime pip wheel's shared library (what libnora_edge dlopens by default here)."""
    import onnxruntime

    libs = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.1*"))
    if not libs:
        raise EdgeRuntimeError("the onnxruntime wheel ships no capi/libonnxruntime.so.1.*")
    return libs[-1]


def load_library(path: str | Path | None = None) -> ctypes.CDLL:
    """libnora_edge.so with its policy signatures declared (``path`` None: the dev tree's build)."""
    p = Path(path) if path is not None else REPO_LIB
    try:
        lib = ctypes.CDLL(str(p))
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    except (OSError, AttributeError) as e:
        raise EdgeRuntimeError(f"{p}: not a loadable libnora_edge with the policy object ({e})") from e
    return lib


@dataclass(frozen=True)
class EdgeChunk:
    """One ``nora_policy_step``.

    Attributes:
        actions: (T, D) float64 in robot units.
        ids: (N,) int64 generated Qwen ids.
        token_classes: (N,) names from ``nora_edge.generate.TOKEN_CLASSES``.
        flagged: a token was not the model's own choice.
        timings: seconds per stage (preprocess, vision, prefill, decode, detokenize, total, decode_step_min/max).
        counters: the decode loop's counts (nora_chunk_info, ABI 0.4): decoder_calls (after the prefill),
            verify_calls, proposed, accepted (multi-token drafts) and fallback (bool: a near tie re-decoded the
            chunk plainly), as :class:`nora_edge.multitoken.MultiTokenStats` names them.
    """

    actions: np.ndarray
    ids: np.ndarray
    token_classes: tuple[str, ...]
    flagged: bool
    timings: dict
    counters: dict = field(default_factory=dict)


class EdgePolicy:
    """A bundle run by libnora_edge (``nora_policy_*``); close() (or ``with``) destroys it."""

    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p) -> None:
        self.lib, self._h = lib, handle
        info = _Info(struct_size=ctypes.sizeof(_Info))
        self._check(lib.nora_policy_get_info(handle, ctypes.byref(info)))
        self.time_horizon, self.action_dim = info.time_horizon, info.action_dim
        self.max_tokens, self.prefix_tokens, self.max_len = info.max_tokens, info.prefix_tokens, info.max_len
        self.onnxruntime_version = info.onnxruntime_version.decode()

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        *,
        library: str | Path | None = None,
        onnxruntime: str | Path | None = None,
        threads: int = 0,
        verify: bool = False,
        forced_tokens: str = "raise",
        max_repaired: int = 0,
        provider: str = "cpu",
        device_id: int = 0,
        trt_cache_dir: str | Path | None = None,
        trt_fp16: bool = False,
        decoding: str = "plain",
        max_draft: int = 6,
        tie_margin: float | None = 1e-3,
        gate_rate: float = 0.0,
        adaptive_draft: bool = False,
        bundle_drafts: bool = True,
    ) -> EdgePolicy:
        """nora_policy_create; ``forced_tokens`` "raise" / "flag" as :class:`nora_edge.policy.NoraPolicy`;
        ``provider`` "cpu" / "cuda" / "tensorrt" (an onnxruntime without it: EdgeRuntimeError, status
        "unsupported", naming the providers it has); ``decoding`` "plain" / "multi-token" with ``max_draft``
        (1 .. 32), ``tie_margin`` (None: guard off), ``gate_rate`` ([0, 1], 0: no gate), ``adaptive_draft`` and
        ``bundle_drafts`` (seed the draft table from the bundle's ``drafts.json`` when it ships one) as
        :class:`nora_edge.multitoken.MultiTokenConfig` (ranges checked by the library; a bundle without
        ``logits_all`` or with a malformed ``drafts.json``: BundleError)."""
        if forced_tokens not in ("raise", "flag"):
            raise InputError(f"forced_tokens must be 'raise' or 'flag', got {forced_tokens!r}")
        if provider not in PROVIDERS:
            raise InputError(f"provider must be one of {PROVIDERS}, got {provider!r}")
        if decoding not in DECODINGS:
            raise InputError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        if isinstance(max_draft, bool) or not isinstance(max_draft, int) or not -(2**31) <= max_draft < 2**31:
            raise InputError(f"max_draft must be an int in [1, 32], got {max_draft!r}")
        t = tie_margin
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < math.inf):
            raise InputError(f"tie_margin must be None or a finite number >= 0, got {t!r}")
        if isinstance(gate_rate, bool) or not isinstance(gate_rate, int | float):
            raise InputError(f"gate_rate must be a number in [0, 1], got {gate_rate!r}")
        lib = load_library(library)
        opts = _Options()
        lib.nora_policy_options_init(ctypes.byref(opts))
        opts.onnxruntime_path = str(onnxruntime or wheel_onnxruntime()).encode()
        opts.threads, opts.verify_hashes = threads, int(verify)
        opts.forced_tokens, opts.max_repaired = int(forced_tokens == "flag"), max_repaired
        opts.provider, opts.device_id, opts.trt_fp16 = PROVIDERS.index(provider), device_id, int(trt_fp16)
        opts.trt_cache_dir = str(trt_cache_dir).encode() if trt_cache_dir is not None else None
        opts.decoding, opts.max_draft = DECODINGS.index(decoding), max_draft
        opts.tie_margin = -1.0 if tie_margin is None else float(tie_margin)  # negative: guard off
        opts.gate_rate, opts.adaptive_draft = float(gate_rate), int(bool(adaptive_draft))
        opts.bundle_drafts = int(bool(bundle_drafts))
        h = ctypes.c_void_p()
        _raise(lib, lib.nora_policy_create(str(bundle).encode(), ctypes.byref(opts), ctypes.byref(h)))
        return cls(lib, h)

    def _check(self, rc: int) -> None:
        _raise(self.lib, rc)

    def _handle(self) -> ctypes.c_void_p:
        if not self._h:
            raise InputError("this EdgePolicy was closed")
        return self._h

    def step(self, image: np.ndarray, instruction: str, unnorm_key: str | None = None) -> EdgeChunk:
        """One chunk (``NoraPolicy.run_chunk``); image (H, W, 3) uint8, rows may be strided."""
        img, args = _frame(image, instruction, unnorm_key)
        acts = np.empty((self.time_horizon, self.action_dim), np.float64)
        ids = np.zeros(self.max_tokens, np.int64)
        cls = np.zeros(self.max_tokens, np.int32)
        info = _ChunkInfo(struct_size=ctypes.sizeof(_ChunkInfo))
        rc = self.lib.nora_policy_step(
            self._handle(), *args, acts.ctypes.data, acts.size, ids.ctypes.data, cls.ctypes.data, ids.size,
            ctypes.byref(info),
        )  # fmt: skip
        del img
        self._check(rc)
        n = info.num_tokens
        timings = {k: getattr(info, k) for k, _ in _ChunkInfo._fields_ if k.endswith("_s")}
        counters = {k: int(getattr(info, k)) for k in COUNTERS}
        counters["fallback"] = bool(counters["fallback"])
        return EdgeChunk(
            acts,
            ids[:n].copy(),
            tuple(TOKEN_CLASSES[c] for c in cls[:n]),
            bool(info.flagged),
            timings,
            counters,
        )

    def select_action(self, image: np.ndarray, instruction: str, unnorm_key: str | None = None) -> np.ndarray:
        """Next (D,) action from the queue (``NoraPolicy.select_action``)."""
        img, args = _frame(image, instruction, unnorm_key)
        out = np.empty(self.action_dim, np.float64)
        new = ctypes.c_int32(0)
        rc = self.lib.nora_policy_select_action(
            self._handle(), *args, out.ctypes.data, out.size, ctypes.byref(new)
        )
        del img
        self._check(rc)
        return out

    def reset(self) -> None:
        self._check(self.lib.nora_policy_reset(self._handle()))

    def close(self) -> None:
        if self._h:
            self.lib.nora_policy_destroy(self._h)
            self._h = ctypes.c_void_p()

    def __enter__(self) -> EdgePolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _frame(image: np.ndarray, instruction: str, unnorm_key: str | None) -> tuple[np.ndarray, list]:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(f"image must be (H, W, 3) uint8, got {img.dtype} {img.shape}")
    if img.strides[2] != 1 or img.strides[1] != 3 or img.strides[0] < 3 * img.shape[1]:
        img = np.ascontiguousarray(img)
    key = None if unnorm_key is None else unnorm_key.encode()
    return img, [img.ctypes.data, img.shape[0], img.shape[1], img.strides[0], instruction.encode(), key]


def _raise(lib: ctypes.CDLL, rc: int) -> None:
    if rc == 0:
        return
    msg = lib.nora_edge_last_error().decode(errors="replace")
    status = STATUS[rc] if 0 <= rc < len(STATUS) else f"status {rc}"
    if status == "input":
        raise InputError(msg)
    if status == "bundle":
        raise BundleError(msg)
    if status == "detokenize":
        raise DetokenizationError(msg)
    if status == "forced":
        raise ForcedTokenError(msg, ids=None, token_classes=(), step=-1, output=None)
    raise EdgeRuntimeError(f"libnora_edge: {status}: {msg}", status)
