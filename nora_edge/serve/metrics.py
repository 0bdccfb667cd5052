"""Prometheus-style counters, a gauge and per-stage latency histograms for the policy server (thread-safe).

Data flow: the handler and the transport call :meth:`Metrics.request`, :meth:`Metrics.error`,
:meth:`Metrics.observe` and the connection methods from any thread -> one lock-protected registry ->
:meth:`Metrics.render` writes the Prometheus text exposition format 0.0.4 (prometheus.io/docs/instrumenting/
exposition_formats), served at ``GET /metrics``.

Series (prefix ``nora_edge_serve_``):
  requests_total{outcome="ok"|"error"}            inference requests answered
  errors_total{type="<error class>"}               errors by type (ServeInputError, ServeProtocolError,
                                                   ForcedTokenError, DetokenizationError, InternalError,
                                                   unauthorized, too_many_connections, message_too_big)
  connections_total                                 WebSocket connections accepted
  connections_active                                open WebSocket connections (gauge)
  stage_seconds{stage=...}  histogram               per-stage latency: unpack, wait, preprocess, vision,
                                                   prefill, decode, detokenize, policy, pack, request
"""

from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["BUCKETS", "Metrics"]

PREFIX = "nora_edge_serve_"
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
        self.counts[i] += 1
        self.sum += seconds
        self.count += 1


class Metrics:
    """Registry of the server's series; every method may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, int] = {"ok": 0, "error": 0}
        self._errors: dict[str, int] = defaultdict(int)
        self._stages: dict[str, _Histogram] = {}
        self._connections_total = 0
        self._connections_active = 0

    def request(self, ok: bool) -> None:
        """Count one answered inference request."""
        with self._lock:
            self._requests["ok" if ok else "error"] += 1

    def error(self, kind: str) -> None:
        """Count one error of ``kind`` (an error class name or a connection-level reason)."""
        with self._lock:
            self._errors[kind] += 1

    def observe(self, stage: str, seconds: float) -> None:
        """Add one latency sample (seconds) to ``stage``'s histogram."""
        with self._lock:
            self._stages.setdefault(stage, _Histogram()).observe(float(seconds))

    def connection_opened(self) -> None:
        with self._lock:
            self._connections_total += 1
            self._connections_active += 1

    def connection_closed(self) -> None:
        with self._lock:
            self._connections_active -= 1

    def snapshot(self) -> dict:
        """Plain-dict copy: requests, errors, connections_total, connections_active, stage counts."""
        with self._lock:
            return {
                "requests": dict(self._requests),
                "errors": dict(self._errors),
                "connections_total": self._connections_total,
                "connections_active": self._connections_active,
                "stages": {k: h.count for k, h in self._stages.items()},
            }

    def render(self) -> str:
        """The registry in Prometheus text format 0.0.4."""
        p = PREFIX
        with self._lock:
            out = [
                f"# HELP {p}requests_total Inference requests answered.",
                f"# TYPE {p}requests_total counter",
            ]
            out += [f'{p}requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self._requests.items())]
            out += [f"# HELP {p}errors_total Errors by type.", f"# TYPE {p}errors_total counter"]
            out += [f'{p}errors_total{{type="{_label(k)}"}} {v}' for k, v in sorted(self._errors.items())]
            out += [f"# HELP {p}connections_total WebSocket connections accepted."]
            out += [f"# TYPE {p}connections_total counter", f"{p}connections_total {self._connections_total}"]
            out += [f"# HELP {p}connections_active Open WebSocket connections."]
            out += [
                f"# TYPE {p}connections_active gauge",
                f"{p}connections_active {self._connections_active}",
            ]
            out += [f"# HELP {p}stage_seconds Latency per stage.", f"# TYPE {p}stage_seconds histogram"]
            for stage, h in sorted(self._stages.items()):
                s = _label(stage)
                cum = 0
                for b, c in zip((*BUCKETS, "+Inf"), h.counts, strict=True):
                    cum += c
                    out.append(f'{p}stage_seconds_bucket{{stage="{s}",le="{b}"}} {cum}')
                out.append(f'{p}stage_seconds_sum{{stage="{s}"}} {h.sum!r}')
                out.append(f'{p}stage_seconds_count{{stage="{s}"}} {h.count}')
        return "\n".join(out) + "\n"
