"""Transport-agnostic request handler of the policy server: observation dict -> validated -> NoraPolicy -> reply.

Data flow (one request):
  message bytes --:func:`nora_edge.serve.protocol.unpack` (msgpack-numpy, no pickle)--> observation dict
  --:meth:`PolicyHandler.infer`: frame under ``config.image_key`` checked ((H, W, 3) uint8, <= max_frame_pixels),
  instruction under ``config.prompt_key`` (str, non-blank, <= max_instruction_chars), optional ``unnorm_key``
  checked against the bundle--> ``NoraPolicy.run_chunk`` (one chunk at a time, under the handler's lock, so the
  chunk and its ``last_timings`` belong together)--> reply dict (actions (T, D) float64 + token classes + timings)
  --:func:`nora_edge.serve.protocol.pack`--> reply bytes.

API (what a transport builds on: the asyncio WebSocket server in ``nora_edge.serve.server``, a Ray deployment):
  ``ServeConfig(...)``               frozen, validated limits and keys (InputError naming the bad value)
  ``PolicyHandler(policy, config)``  one handler per policy; thread-safe
  ``.metadata() -> dict``            sent (packed) to every client on connect
  ``.infer(obs) -> dict``            validate + run; raises ServeInputError (bad observation), ForcedTokenError /
                                     DetokenizationError (the model's chunk is refused), other errors are bugs
  ``.handle_message(data) -> (reply, close)``  bytes in; reply is packed bytes, or an error text
                                     ``"<ErrorType>: <message>"`` (openpi's client raises a text frame as
                                     RuntimeError); ``close`` is None (keep serving this connection) or a WebSocket
                                     close code to send after the text: 1003 for a message that is not openpi
                                     msgpack-numpy, 1011 for an internal error (openpi's server closes with 1011)
  ``.metrics``                       :class:`nora_edge.serve.metrics.Metrics` (``render()`` -> Prometheus text)
  ``.error_text(exc)``               the reply text for an exception

Forced tokens: the policy's own rule decides (``NoraPolicy.load(forced_tokens=...)``). Under "raise" a chunk holding
a token the model did not choose is refused and the client gets ``"ForcedTokenError: ..."``; under "flag" it is
sent with ``flagged: true`` and its per-token classes, so a robot never receives such a chunk without being told.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from nora_edge import __version__
from nora_edge.errors import DetokenizationError, InputError, NoraEdgeError
from nora_edge.serve.metrics import Metrics
from nora_edge.serve.protocol import ServeInputError, ServeProtocolError, pack, unpack

log = logging.getLogger(__name__)

__all__ = [
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_UNSUPPORTED_DATA",
    "PolicyHandler",
    "ServeConfig",
    "ServeInputError",
    "ServeProtocolError",
]

CLOSE_UNSUPPORTED_DATA = 1003  # RFC 6455 7.4.1: a message the endpoint cannot accept
CLOSE_INTERNAL_ERROR = 1011  # RFC 6455 7.4.1 (as openpi's server after an exception)
UNNORM_KEY = "unnorm_key"
POLICY_STAGES = ("preprocess", "vision", "prefill", "decode", "detokenize")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"ServeConfig.{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class ServeConfig:
    """Keys and limits of the policy server (all validated on construction).

    Attributes:
        image_key: observation key of the (H, W, 3) uint8 frame; "a/b" also finds obs["a"]["b"].
        prompt_key: observation key of the instruction (openpi: "prompt").
        max_message_bytes: largest WebSocket message accepted (16 MiB; a bigger one closes with 1009).
        max_frame_pixels: largest H * W of the frame (1920 * 1080).
        max_instruction_chars: longest instruction in characters (2000; the bundle's token limit also applies).
        max_connections: simultaneous WebSocket connections (16; more are refused with HTTP 503).
        workers: threads that decode, run and encode requests (4; the policy itself runs one chunk at a time).
        api_key: when set, clients must send ``Authorization: Api-Key <key>`` (openpi's client does with
            ``api_key=``); never printed.
    """

    image_key: str = "image"
    prompt_key: str = "prompt"
    max_message_bytes: int = 16 * 2**20
    max_frame_pixels: int = 1920 * 1080
    max_instruction_chars: int = 2000
    max_connections: int = 16
    workers: int = 4
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("image_key", "prompt_key"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or v == UNNORM_KEY:
                raise InputError(
                    f"ServeConfig.{name} must be a non-empty str other than 'unnorm_key', got {v!r}"
                )
        if self.image_key == self.prompt_key:
            raise InputError(f"ServeConfig: image_key and prompt_key are both {self.image_key!r}")
        for name in (
            "max_message_bytes",
            "max_frame_pixels",
            "max_instruction_chars",
            "max_connections",
            "workers",
        ):
            _positive_int(name, getattr(self, name))
        k = self.api_key
        if k is not None and (
            not isinstance(k, str) or not k or not k.isprintable() or k != k.strip() or " " in k
        ):
            what = f"a str of {len(k)} chars" if isinstance(k, str) else type(k).__name__
            raise InputError(
                f"ServeConfig.api_key must be a non-empty printable str without spaces (it goes in an HTTP "
                f"header), got {what}"
            )


def error_kind(exc: BaseException) -> str:
    """Metrics label and reply prefix: the class name of nora-edge errors, else "InternalError"."""
    return type(exc).__name__ if isinstance(exc, NoraEdgeError) else "InternalError"


class PolicyHandler:
    """Serves one :class:`~nora_edge.policy.NoraPolicy` (see the module docstring for the API).

    Args:
        policy: a loaded NoraPolicy (anything with ``run_chunk``, ``last_timings``, ``bundle``, ``time_horizon``,
            ``action_dim``, ``mode`` and ``forced_tokens``). The handler owns it: other callers of the same
            object would interleave with ``last_timings``.
        config: keys and limits.
        metrics: a registry to share (default: a new one).
    """

    def __init__(self, policy, config: ServeConfig | None = None, metrics: Metrics | None = None) -> None:
        self.policy = policy
        self.config = config or ServeConfig()
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ connect
    def metadata(self) -> dict:
        """What a client receives on connect (openpi: ``WebsocketClientPolicy.get_server_metadata()``)."""
        p, c = self.policy, self.config
        rule = p.forced_tokens
        return {
            "server": "nora-edge",
            "version": __version__,
            "protocol": "openpi-websocket-msgpack-numpy",
            "image_key": c.image_key,
            "prompt_key": c.prompt_key,
            "unnorm_keys": sorted(p.bundle.norm_stats),
            "action_horizon": int(p.time_horizon),
            "action_dim": int(p.action_dim),
            "mode": p.mode,
            "forced_tokens": rule.mode,
            "max_repaired": int(rule.max_repaired),
            "limits": {
                "max_message_bytes": c.max_message_bytes,
                "max_frame_pixels": c.max_frame_pixels,
                "max_instruction_chars": c.max_instruction_chars,
                "max_connections": c.max_connections,
            },
        }

    # ------------------------------------------------------------------ validation
    def _frame(self, obs: dict) -> np.ndarray:
        key = self.config.image_key
        if key in obs:
            image = obs[key]
        else:
            node: object = obs
            for part in key.split("/"):
                if not isinstance(node, dict) or part not in node:
                    raise ServeInputError(
                        f"observation lacks the frame key {key!r}; it has keys {sorted(map(str, obs))[:20]}"
                    )
                node = node[part]
            image = node
        if not isinstance(image, np.ndarray):
            raise ServeInputError(
                f"{key!r} must be a numpy array (H, W, 3) uint8, got {type(image).__name__}"
            )
        if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ServeInputError(
                f"{key!r} must have shape (H, W, 3) (RGB, channels last), got {image.shape}"
            )
        if image.dtype != np.uint8:
            raise ServeInputError(f"{key!r} must be uint8, got {image.dtype} (shape {image.shape})")
        pixels = image.shape[0] * image.shape[1]
        if pixels > self.config.max_frame_pixels:
            raise ServeInputError(
                f"{key!r} has {pixels} pixels {image.shape[:2]}, more than max_frame_pixels "
                f"{self.config.max_frame_pixels}; resize on the client"
            )
        return image

    def _instruction(self, obs: dict) -> str:
        key = self.config.prompt_key
        if key not in obs:
            raise ServeInputError(
                f"observation lacks the instruction key {key!r}; it has keys {sorted(map(str, obs))[:20]}"
            )
        text = obs[key]
        if not isinstance(text, str):
            raise ServeInputError(f"{key!r} must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ServeInputError(f"{key!r} is empty: {text!r}")
        if len(text) > self.config.max_instruction_chars:
            raise ServeInputError(
                f"{key!r} is too long: {len(text)} chars > max_instruction_chars "
                f"{self.config.max_instruction_chars} ({text[:60]!r}...)"
            )
        return text

    def _unnorm_key(self, obs: dict) -> str | None:
        key = obs.get(UNNORM_KEY)
        if key is not None and not isinstance(key, str):
            raise ServeInputError(f"'unnorm_key' must be a str or absent, got {type(key).__name__}")
        bundle = self.policy.bundle
        try:
            bundle.postprocess.stats_for(bundle.norm_stats, key)  # the check run_chunk makes, before queueing
        except InputError as e:
            raise ServeInputError(str(e)) from e
        return key

    # ------------------------------------------------------------------ inference
    def infer(self, obs: dict) -> dict:
        """Validate one observation and run the policy on it; counted in :attr:`metrics`.

        Args:
            obs: openpi observation dict: ``config.image_key`` -> (H, W, 3) uint8, ``config.prompt_key`` -> str,
                optional "unnorm_key" -> str; other keys are ignored.

        Returns:
            reply dict: "actions" (T, D) float64, "token_classes" (N,) list of str, "token_class_counts",
            "flagged", "stopped", "unnorm_key", "mode", "new_tokens", "timings" (seconds per stage),
            "server_timing" ({"infer_ms": float}, as openpi's server adds).

        Raises:
            ServeInputError: a bad observation (the message names the key and the problem).
            ForcedTokenError, DetokenizationError: the model's chunk is refused (policy rule / undecodable).
        """
        try:
            reply = self._infer(obs)
        except Exception as e:
            self.metrics.request(False)
            self.metrics.error(error_kind(e))
            raise
        self.metrics.request(True)
        return reply

    def _infer(self, obs: dict) -> dict:
        t0 = time.perf_counter()
        if not isinstance(obs, dict):
            raise ServeInputError(f"the observation must be a dict, got {type(obs).__name__}")
        image = self._frame(obs)
        instruction = self._instruction(obs)
        unnorm_key = self._unnorm_key(obs)
        t_queued = time.perf_counter()
        with self._lock:
            t1 = time.perf_counter()
            try:
                out = self.policy.run_chunk(image, instruction, unnorm_key)
            except (ServeInputError, DetokenizationError):
                raise
            except InputError as e:  # e.g. the bundle's instruction token limit
                raise ServeInputError(str(e)) from e
            stages = dict(self.policy.last_timings)
        t2 = time.perf_counter()
        timings = {s: float(stages[s]) for s in POLICY_STAGES if s in stages}
        timings.update(wait=t1 - t_queued, policy=float(stages.get("total", t2 - t1)), infer=t2 - t0)
        for stage in (*POLICY_STAGES, "wait", "policy"):
            if stage in timings:
                self.metrics.observe(stage, timings[stage])
        return {
            "actions": out.actions,
            "token_classes": list(out.token_classes),
            "token_class_counts": out.class_counts,
            "flagged": bool(out.flagged),
            "stopped": out.stopped,
            "unnorm_key": out.unnorm_key,
            "mode": out.mode,
            "new_tokens": int(out.ids.size),
            "timings": timings,
            "server_timing": {"infer_ms": (t2 - t0) * 1000.0},
        }

    @staticmethod
    def error_text(exc: BaseException) -> str:
        """``"<ErrorType>: <message>"`` (internal errors: ``"InternalError: <class>: <message>"``)."""
        kind = error_kind(exc)
        return f"{kind}: {exc}" if kind != "InternalError" else f"InternalError: {type(exc).__name__}: {exc}"

    def handle_message(self, data: bytes | str) -> tuple[bytes | str, int | None]:
        """One request frame -> (packed reply, None) or (error text, None | close code); never raises.

        A bad observation or a refused chunk keeps the connection (close None); a message that is not openpi
        msgpack-numpy closes it with 1003 after the text, an internal error with 1011.
        """
        t0 = time.perf_counter()
        try:
            obs = unpack(data)
        except ServeProtocolError as e:
            self.metrics.request(False)
            self.metrics.error(error_kind(e))
            return self.error_text(e), CLOSE_UNSUPPORTED_DATA
        t1 = time.perf_counter()
        self.metrics.observe("unpack", t1 - t0)
        try:
            reply = self.infer(obs)  # counts itself
        except (InputError, DetokenizationError) as e:
            return self.error_text(e), None
        except Exception as e:
            log.exception("inference failed")
            return self.error_text(e), CLOSE_INTERNAL_ERROR
        t2 = time.perf_counter()
        try:
            packed = pack(reply)
        except Exception as e:  # a bug: the reply holds something the wire format does not carry
            log.exception("cannot encode the reply")
            self.metrics.error(error_kind(e))
            return self.error_text(e), CLOSE_INTERNAL_ERROR
        t3 = time.perf_counter()
        self.metrics.observe("pack", t3 - t2)
        self.metrics.observe("request", t3 - t0)
        return packed, None
