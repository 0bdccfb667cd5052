"""Load test for a policy server that speaks openpi's WebSocket protocol (``nora-edge serve``, ``--ray``).

Data flow: one known observation (an image + prompt the bundle answers, see :func:`find_observation`) and its
expected (T, D) actions, computed once here by ``NoraPolicy.predict_action_chunk`` -> M client threads, each
with its own unmodified ``openpi_client.websocket_client_policy.WebsocketClientPolicy`` (openpi-client
package, packages/openpi-client/src/openpi_client in github.com/Physical-Intelligence/openpi) -> each thread
sends the observation, waits for the reply, checks ``reply["actions"]`` against the expectation and records
(send time, latency, outcome) until ``seconds`` have passed -> :func:`summarize` (throughput, p50/p99 latency,
errors by type, lost in-flight requests, a per-second timeline) -> ``report.json`` + ``report.md`` written
atomically (:mod:`nora_edge.atomic`).

Bounds: at most :data:`MAX_CLIENTS` clients and :data:`MAX_SECONDS` seconds; a request still unanswered
``request_timeout_s`` after it was sent is aborted by a watchdog (its socket is shut down) and counted as a
``timeout``; nothing runs past ``seconds + request_timeout_s`` plus the client's own 10 s open timeout.

Outcomes per request (``requests == ok + wrong + sum(errors.values())`` always holds):
  ok                 a reply whose actions match the expectation (shape equal, ``|a - e| <= atol + rtol*|e|``)
  wrong              a reply without ``actions`` or with other actions
  server_error       the server answered with a text frame (openpi's server sends its traceback as text, then
                     closes the connection); the client raises RuntimeError
  connection_closed  the connection dropped before the reply (the request was lost in flight)
  timeout            no reply within ``request_timeout_s``
  <ExceptionName>    anything else the client raised
``lost`` = connection_closed + timeout. After any error the thread reconnects (a new client), with a short
backoff while connecting fails; failed connects are counted separately (``connect_errors``), not as requests.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nora_edge.atomic import write_json_atomic, write_text_atomic
from nora_edge.errors import InputError

MAX_CLIENTS = 256
MAX_SECONDS = 3600.0
LOST_TYPES = ("connection_closed", "timeout")


@dataclass(frozen=True)
class LoadConfig:
    """What one load test does.

    Attributes:
        clients: concurrent client threads (1..MAX_CLIENTS), each with its own connection.
        seconds: how long clients keep sending new requests (0 < seconds <= MAX_SECONDS).
        request_timeout_s: a request unanswered this long is aborted and counted as ``timeout``.
        rtol, atol: reply check, ``|a - e| <= atol + rtol * |e|`` elementwise (a float32 round trip passes,
            one different action token does not).
        api_key: sent as ``Authorization: Api-Key ...`` by the openpi client when set.
    """

    clients: int
    seconds: float
    request_timeout_s: float = 60.0
    rtol: float = 1e-6
    atol: float = 1e-9
    api_key: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise InputError(f"--clients must be in 1..{MAX_CLIENTS}, got {self.clients}")
        if not 0 < self.seconds <= MAX_SECONDS:
            raise InputError(f"--seconds must be in (0, {MAX_SECONDS:g}], got {self.seconds}")
        if not self.request_timeout_s > 0:
            raise InputError(f"request timeout must be positive, got {self.request_timeout_s}")


@dataclass
class _Client:
    """One client thread's state; ``inflight_since`` and ``aborted`` are shared with the watchdog."""

    index: int
    records: list[tuple[float, float, str]] = field(default_factory=list)  # (t_send, latency_s, outcome)
    connect_errors: Counter = field(default_factory=Counter)
    connects: int = 0
    metadata: dict | None = None
    inflight_since: float | None = None
    conn: object | None = None  # the websockets connection under the openpi client (for the watchdog)
    aborted: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def normalize_url(url: str) -> str:
    """``host:port`` or ``ws://host:port`` -> ``ws://host:port`` (the openpi client's own rule)."""
    if not isinstance(url, str) or not url:
        raise InputError(f"server URL must be a non-empty string, got {url!r}")
    return url if url.startswith("ws") else f"ws://{url}"


def check_reply(reply: object, expected: np.ndarray, rtol: float, atol: float) -> bool:
    """True when ``reply["actions"]`` is ``expected`` (T, D) within the tolerances."""
    if not isinstance(reply, dict) or "actions" not in reply:
        return False
    got = np.asarray(reply["actions"])
    if got.shape != expected.shape or got.dtype.kind not in "fiu":
        return False
    return bool(np.all(np.abs(got.astype(np.float64) - expected) <= atol + rtol * np.abs(expected)))


def _classify(exc: BaseException, aborted: bool) -> str:
    from websockets.exceptions import ConnectionClosed

    if aborted:
        return "timeout"
    if isinstance(exc, ConnectionClosed | ConnectionResetError | BrokenPipeError | EOFError):
        return "connection_closed"
    if isinstance(exc, RuntimeError) and str(exc).startswith("Error in inference server"):
        return "server_error"
    return type(exc).__name__


def _worker(st: _Client, url: str, obs: dict, expected: np.ndarray, cfg: LoadConfig, t0: float, end: float):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    client = None
    backoff = 0.05
    while time.monotonic() < end:
        if client is None:
            try:
                client = WebsocketClientPolicy(url, api_key=cfg.api_key)
            except Exception as e:  # noqa: BLE001 - refused, HTTP status, open timeout: counted, retried
                st.connect_errors[type(e).__name__] += 1
                time.sleep(min(backoff, max(0.0, end - time.monotonic())))
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            st.connects += 1
            if st.metadata is None:
                st.metadata = client.get_server_metadata()
            with st.lock:
                st.conn, st.aborted = client._ws, False  # the client's connection; only the watchdog uses it
        t_send = time.monotonic()
        with st.lock:
            st.inflight_since = t_send
        try:
            reply = client.infer(obs)
            outcome = "ok" if check_reply(reply, expected, cfg.rtol, cfg.atol) else "wrong"
        except Exception as e:  # noqa: BLE001 - every failure is an outcome to count
            with st.lock:
                outcome = _classify(e, st.aborted)
        latency = time.monotonic() - t_send
        with st.lock:
            st.inflight_since = None
        st.records.append((t_send - t0, latency, outcome))
        if outcome not in ("ok", "wrong"):
            _close(client)
            client = None
    if client is not None:
        _close(client)


def _close(client) -> None:
    try:
        client._ws.close()
    except Exception:  # noqa: BLE001, S110 - already broken; nothing to report
        pass


def _abort(st: _Client) -> None:
    """Shut the socket of ``st``'s connection down: its blocked ``recv`` raises at once."""
    with st.lock:
        st.aborted = True
        conn = st.conn
    try:
        conn.socket.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass


def run_load(url: str, observation: dict, expected: np.ndarray, cfg: LoadConfig) -> dict:
    """Run ``cfg.clients`` clients against ``url`` for ``cfg.seconds``; the raw result for :func:`summarize`.

    Args:
        url: ``ws://host:port`` (or ``host:port``).
        observation: the dict each request sends (numpy arrays allowed).
        expected: (T, D) actions a correct reply carries.

    Returns:
        {"url", "config", "t0_unix", "elapsed_s", "clients": [_Client, ...]} (records relative to the start).
    """
    url = normalize_url(url)
    expected = np.asarray(expected, dtype=np.float64)
    states = [_Client(i) for i in range(cfg.clients)]
    t0_unix, t0 = time.time(), time.monotonic()
    end = t0 + cfg.seconds
    threads = [
        threading.Thread(target=_worker, args=(st, url, observation, expected, cfg, t0, end), daemon=True)
        for st in states
    ]
    for t in threads:
        t.start()
    hard_end = end + cfg.request_timeout_s + 15.0  # + the client's 10 s open timeout and close time
    while any(t.is_alive() for t in threads):
        now = time.monotonic()
        for st in states:
            with st.lock:
                since = st.inflight_since
            if since is not None and (now - since > cfg.request_timeout_s or now > hard_end):
                _abort(st)
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    return {"url": url, "config": cfg, "t0_unix": t0_unix, "elapsed_s": elapsed, "clients": states}


def _percentiles(lat_s: list[float]) -> dict:
    if not lat_s:
        return {"n": 0}
    x = np.asarray(lat_s) * 1e3
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"n": int(x.size), "mean": float(x.mean()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": float(x.max()), "min": float(x.min())}  # fmt: skip


def summarize(raw: dict, marks: dict[str, float] | None = None) -> dict:
    """Counts, latency percentiles (ms, answered requests), throughput and a per-second timeline.

    Args:
        raw: :func:`run_load`'s result.
        marks: optional named times (seconds after the start), e.g. {"replica_killed": 30.0}; for each the
            summary adds the requests in flight at that time and the first ok reply sent after it.
    """
    cfg: LoadConfig = raw["config"]
    recs = [(c.index, *r) for c in raw["clients"] for r in c.records]
    outcomes = Counter(r[3] for r in recs)
    ok, wrong = outcomes.pop("ok", 0), outcomes.pop("wrong", 0)
    errors = dict(sorted(outcomes.items()))
    connect_errors = Counter()
    for c in raw["clients"]:
        connect_errors.update(c.connect_errors)
    seconds = int(np.ceil(raw["elapsed_s"]))
    timeline = [{"t": s, "ok": 0, "wrong": 0, "errors": 0} for s in range(seconds)]
    for _, ts, lat, out in recs:
        s = min(int(ts + lat), seconds - 1)
        timeline[s][out if out in ("ok", "wrong") else "errors"] += 1
    elapsed = raw["elapsed_s"]
    res = {
        "url": raw["url"],
        "clients": cfg.clients,
        "seconds": cfg.seconds,
        "request_timeout_s": cfg.request_timeout_s,
        "tolerance": {"rtol": cfg.rtol, "atol": cfg.atol},
        "started_unix": raw["t0_unix"],
        "elapsed_s": elapsed,
        "requests": len(recs),
        "ok": ok,
        "wrong": wrong,
        "errors": errors,
        "lost_in_flight": sum(errors.get(k, 0) for k in LOST_TYPES),
        "connects": sum(c.connects for c in raw["clients"]),
        "connect_errors": dict(sorted(connect_errors.items())),
        "throughput_rps": ok / elapsed if elapsed > 0 else 0.0,
        "latency_ms": _percentiles([r[2] for r in recs if r[3] in ("ok", "wrong")]),
        "per_client_ok": [sum(1 for r in c.records if r[2] == "ok") for c in raw["clients"]],
        "server_metadata": next((c.metadata for c in raw["clients"] if c.metadata is not None), None),
        "timeline": timeline,
        "failures": [{"client": i, "t_send": ts, "latency_s": lat, "type": out}
                     for i, ts, lat, out in sorted(recs, key=lambda r: r[1]) if out != "ok"][:200],
    }  # fmt: skip
    if res["ok"] + res["wrong"] + sum(errors.values()) != res["requests"]:
        raise AssertionError("load test bookkeeping: requests != ok + wrong + errors")
    for name, t in (marks or {}).items():
        inflight = [r for r in recs if r[1] <= t < r[1] + r[2]]
        after = [r[1] + r[2] for r in recs if r[3] == "ok" and r[1] >= t]
        res.setdefault("marks", {})[name] = {
            "t": t,
            "in_flight": len(inflight),
            "in_flight_failed": sum(1 for r in inflight if r[3] != "ok"),
            "failed_after": sum(1 for r in recs if r[1] >= t and r[3] != "ok"),
            "failed_before": sum(1 for r in recs if r[1] + r[2] < t and r[3] != "ok"),
            "max_failed_per_client": max(Counter(r[0] for r in recs if r[3] != "ok").values(), default=0),
            "ok_after": len(after),
            "first_ok_after_s": (min(after) - t) if after else None,
        }
    return res


def markdown(res: dict, title: str = "Policy server load test") -> str:
    """The report as Markdown."""
    lat = res["latency_ms"]
    err = ", ".join(f"{k} {v}" for k, v in res["errors"].items()) or "none"
    cerr = ", ".join(f"{k} {v}" for k, v in res["connect_errors"].items()) or "none"
    lines = [
        f"# {title}",
        "",
        f"{res['clients']} clients x {res['seconds']:g} s against `{res['url']}` (openpi-client "
        f"WebsocketClientPolicy, one connection per client); ran {res['elapsed_s']:.1f} s.",
        "",
        "| requests | ok | wrong | errors | lost in flight | throughput (ok/s) | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {res['requests']} | {res['ok']} | {res['wrong']} | {sum(res['errors'].values())} | "
        f"{res['lost_in_flight']} | {res['throughput_rps']:.2f} | {lat.get('p50', float('nan')):.1f} | "
        f"{lat.get('p99', float('nan')):.1f} | {lat.get('max', float('nan')):.1f} |",
        "",
        f"- errors by type: {err}",
        f"- connections: {res['connects']} opened; failed connects by type: {cerr}",
        f"- ok replies per client: {res['per_client_ok']}",
        f"- reply check: actions equal to NoraPolicy.predict_action_chunk within rtol {res['tolerance']['rtol']:g}"
        f", atol {res['tolerance']['atol']:g}",
    ]
    for name, m in res.get("marks", {}).items():
        first = "never" if m["first_ok_after_s"] is None else f"{m['first_ok_after_s']:.2f} s later"
        lines.append(
            f"- {name} at t={m['t']:.1f} s: {m['in_flight']} requests in flight ({m['in_flight_failed']} failed); "
            f"{m['failed_after']} requests sent after it failed, {m['ok_after']} succeeded; first ok reply {first}"
        )
    return "\n".join(lines) + "\n"


def write_report(res: dict, out: str | Path, title: str = "Policy server load test") -> dict[str, Path]:
    """``out/report.json`` + ``out/report.md``, atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "json": write_json_atomic(out / "report.json", res),
        "markdown": write_text_atomic(out / "report.md", markdown(res, title)),
    }


# ---------------------------------------------------------------------------------------------- observation
DEFAULT_PROMPTS = ("pick up the red block", "push the blue cup", "open the drawer", "close the drawer")


def default_candidates(prompt: str | None = None, seeds: int = 8) -> list[tuple[np.ndarray, str]]:
    """(image, prompt) pairs to try: seeded (224, 224, 3) uint8 noise frames x ``prompt`` (or DEFAULT_PROMPTS)."""
    prompts = (prompt,) if prompt else DEFAULT_PROMPTS
    images = [np.random.default_rng(s).integers(0, 256, (224, 224, 3), dtype=np.uint8) for s in range(seeds)]
    return [(img, p) for p in prompts for img in images]


def reference_actions(
    bundle: str | Path, candidates: list[tuple[np.ndarray, str]], unnorm_key: str | None = None, **load_kwargs
) -> tuple[np.ndarray, str, np.ndarray]:
    """The first candidate the bundle answers, and its (T, D) actions from ``NoraPolicy.predict_action_chunk``.

    A bundle refuses some inputs (a chunk needing repaired tokens raises ForcedTokenError under the default
    ``forced_tokens="raise"``); the load test needs one it answers, so that every correct reply is comparable.

    Args:
        bundle: bundle directory, loaded with ``threads=1`` and ``load_kwargs`` (use the server's options).
        candidates: (image (H, W, 3) uint8, prompt) pairs, tried in order.

    Raises:
        InputError: the bundle refuses every candidate (the last error is named).
    """
    from nora_edge.errors import NoraEdgeError
    from nora_edge.policy import NoraPolicy

    last = None
    with NoraPolicy.load(bundle, threads=1, **load_kwargs) as policy:
        for image, prompt in candidates:
            try:
                return image, prompt, policy.predict_action_chunk(image, prompt, unnorm_key)
            except NoraEdgeError as e:
                last = e
    raise InputError(
        f"{bundle}: no candidate observation gives a chunk ({len(candidates)} tried; last: {last}); "
        "pass --image/--prompt the policy answers"
    )


def loadtest(
    url: str,
    cfg: LoadConfig,
    out: str | Path,
    *,
    bundle: str | Path | None = None,
    candidates: list[tuple[np.ndarray, str]] | None = None,
    unnorm_key: str | None = None,
    load_kwargs: dict | None = None,
    marks: dict[str, float] | None = None,
    title: str = "Policy server load test",
) -> dict:
    """Pick the observation, compute the expectation, run the load, write the report (``nora-edge loadtest``).

    The observation keys are the server's (``image_key`` / ``prompt_key`` from its metadata; openpi's "image"
    and "prompt" when it does not say). With ``bundle`` the expectation is ``NoraPolicy.predict_action_chunk``
    here (load it with the server's ``load_kwargs``); without, the reply to one probe request is the
    reference and the report says so (a consistency check only).

    Returns:
        the summary (see :func:`summarize`) with "reference" and "paths" {"json", "markdown"}.
    """
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    url = normalize_url(url)
    candidates = candidates or default_candidates()
    try:
        probe = WebsocketClientPolicy(url, api_key=cfg.api_key)
    except Exception as e:  # noqa: BLE001 - refused, HTTP status, open timeout
        raise InputError(f"cannot connect to a policy server at {url} ({type(e).__name__}: {e})") from e
    try:
        meta = probe.get_server_metadata() or {}
        ikey, pkey = meta.get("image_key", "image"), meta.get("prompt_key", "prompt")
        if bundle is not None:
            image, prompt, expected = reference_actions(bundle, candidates, unnorm_key, **(load_kwargs or {}))
            reference = f"NoraPolicy.predict_action_chunk on {bundle}"
        else:
            image, prompt = candidates[0]
            expected = np.asarray(probe.infer(_observation(ikey, pkey, image, prompt, unnorm_key))["actions"])
            reference = "the reply to one probe request (no bundle: consistency check only)"
    finally:
        _close(probe)
    obs = _observation(ikey, pkey, image, prompt, unnorm_key)
    res = summarize(run_load(url, obs, expected, cfg), marks)
    res["reference"] = {"source": reference, "prompt": prompt, "actions_shape": list(expected.shape)}
    res["paths"] = {k: str(v) for k, v in write_report(res, out, title).items()}
    return res


def _observation(
    image_key: str, prompt_key: str, image: np.ndarray, prompt: str, unnorm_key: str | None
) -> dict:
    obs = {image_key: np.ascontiguousarray(image, dtype=np.uint8), prompt_key: prompt}
    if unnorm_key is not None:
        obs["unnorm_key"] = unnorm_key
    return obs
