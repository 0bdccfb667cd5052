"""``nora-edge serve --ray``: openpi's WebSocket protocol served by N policy replicas on Ray Serve.

Data flow: client (openpi ``WebsocketClientPolicy``) --ws://host:port/--> Ray Serve HTTP proxy (one per head
node, uvicorn) --the whole WebSocket connection, as one streaming ASGI call--> one replica of
:class:`NoraReplica` (a Ray actor process holding one ``NoraPolicy`` + :class:`~nora_edge.serve.handler.PolicyHandler`)
--> on connect: packed ``handler.metadata()`` (plus ``serve``: backend, replica id, pid); then per binary
message: ``handler.handle_message`` (msgpack-numpy decode, validate, one chunk, encode) on the replica's worker
threads --> the packed reply, or an error text frame followed by a close when the handler asks for one (1003 not
openpi msgpack-numpy, 1011 internal error, as openpi's server).

Sessions: a WebSocket connection is pinned to the replica the proxy picked when it opened (Ray Serve's proxy
forwards one ASGI websocket scope to one replica for its whole life; ray/serve/_private/proxy.py,
``proxy_request``). Each request is stateless: it carries the whole observation and gets one action chunk
(``NoraPolicy.run_chunk``; no action queue, no per-client memory), so a client that reconnects after its replica
died loses only the request in flight and continues on any replica. Each connection occupies one of the
replica's ``max_ongoing_requests`` slots (= ``ServeConfig.max_connections``) for its life; connections beyond
all replicas' slots wait in Ray Serve's queue until one closes. New connections go to the replica with fewer
open ones (Serve's power-of-two-choices router). The API key, when set, is checked before the WebSocket is
accepted (refused with HTTP 401, as the single server; measured through Ray 2.60's proxy).

Ray: a local instance by default (:func:`start_ray`: ``num_cpus`` = replicas, loopback only, no dashboard,
as ``nora-edge eval --ray``), or an existing cluster by ``address``. One policy per replica, one intra-op
thread each (``threads``), ``OMP_NUM_THREADS=1`` in the replica processes. A dead replica is replaced by
Serve's controller (health checks every ``HEALTH_CHECK_PERIOD_S``).
"""

# no `from __future__ import annotations`: FastAPI must resolve the route annotations (WebSocket) it sees

import asyncio
import hmac
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from nora_edge.errors import InputError, NoraEdgeError
from nora_edge.serve.handler import PolicyHandler, ServeConfig

APP_NAME = "nora"
DEPLOYMENT_NAME = "NoraReplica"
MAX_REPLICAS = 64
HEALTH_CHECK_PERIOD_S = 2.0
CLOSE_MESSAGE_TOO_BIG = 1009  # RFC 6455 7.4.1
SHUTDOWN_TIMEOUT_S = 20.0


_STATE = {"local": True}  # did start_ray start the Ray instance (shutdown stops it) or join a cluster?


class ServeRayError(NoraEdgeError):
    """Ray or Ray Serve is missing, or the deployment did not come up."""


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ServeRayError("--ray needs Ray Serve: pip install 'ray[serve]'") from e
    return ray, serve


def start_ray(address: str | None, num_cpus: int) -> None:
    """Connect to Ray: the cluster at ``address``, or a new local instance bound to 127.0.0.1.

    Args:
        address: "ray://...", "host:port", "auto", or None / "local" for a local instance with ``num_cpus``
            logical CPUs, no dashboard, driver logs off (the conventions of ``nora_edge.sim.evaluate.run_ray``).
    """
    local = address in (None, "local")
    _STATE["local"] = local
    if local:
        # loopback only: Ray then resolves the node IP to 127.0.0.1 and binds there
        # (ray/_private/services.py get_node_ip_address, ray_constants.ENABLE_RAY_CLUSTER); children inherit it
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if "ray" in sys.modules:
            sys.modules["ray"]._private.ray_constants.ENABLE_RAY_CLUSTER = False
    ray, _ = _import_ray()
    if ray.is_initialized():
        return
    if local:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)  # fmt: skip
    else:
        ray.init(address=address, log_to_driver=False)


def _build_deployment():
    """The Serve deployment class (built lazily: importing this module must not need Ray or FastAPI)."""
    _, serve = _import_ray()
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import PlainTextResponse

    api = FastAPI()

    @serve.ingress(api)
    class NoraReplica:
        """One replica: one NoraPolicy behind a PolicyHandler, reached through the WebSocket route ``/``."""

        def __init__(self, bundle: str, config: dict, threads: int, load_kwargs: dict) -> None:
            from nora_edge.policy import NoraPolicy

            self.config = ServeConfig(**config)
            self.policy = NoraPolicy.load(bundle, threads=threads, **load_kwargs)
            self.handler = PolicyHandler(self.policy, self.config)
            self.pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="nora-serve")
            ctx = serve.get_replica_context()
            self.serve_info = {"backend": "ray", "replica": ctx.replica_id.unique_id, "pid": os.getpid()}

        def check_health(self) -> None:
            if self.policy is None or self.policy._closed:
                raise RuntimeError("the replica's policy is closed")

        def __del__(self) -> None:
            self.pool.shutdown(wait=False, cancel_futures=True)

        def _authorized(self, websocket: WebSocket) -> bool:
            key = self.config.api_key
            if key is None:
                return True
            got = websocket.headers.get("authorization", "")
            return hmac.compare_digest(got.encode(), f"Api-Key {key}".encode())

        @api.websocket("/")
        async def policy(self, websocket: WebSocket) -> None:
            h, m = self.handler, self.handler.metrics
            if not self._authorized(websocket):
                m.error("unauthorized")
                await _refuse(websocket)
                return
            await websocket.accept()
            m.connection_opened()
            loop = asyncio.get_running_loop()
            try:
                await websocket.send_bytes(_pack({**h.metadata(), "serve": self.serve_info}))
                while True:
                    msg = await websocket.receive()
                    if msg["type"] == "websocket.disconnect":
                        return
                    data = msg.get("bytes")
                    data = data if data is not None else msg.get("text", "")
                    if len(data) > self.config.max_message_bytes:
                        m.error("message_too_big")
                        await websocket.close(code=CLOSE_MESSAGE_TOO_BIG)
                        return
                    reply, close = await loop.run_in_executor(self.pool, h.handle_message, data)
                    if isinstance(reply, bytes):
                        await websocket.send_bytes(reply)
                    else:
                        await websocket.send_text(reply)
                    if close is not None:  # the reason as the server's: the text's head, <= 120 bytes
                        await websocket.close(code=close, reason=_reason(reply))
                        return
            finally:
                m.connection_closed()

        @api.get("/healthz")
        def healthz(self) -> PlainTextResponse:
            return PlainTextResponse("OK\n")

        @api.get("/metrics")
        def metrics(self) -> PlainTextResponse:
            """This replica's series (each replica counts its own; scrape through the proxy samples one)."""
            return PlainTextResponse(self.handler.metrics.render(), media_type="text/plain; version=0.0.4")

    return NoraReplica


async def _refuse(websocket) -> None:
    """Refuse the handshake with HTTP 401 (as ``nora_edge.serve.server``) where the ASGI server supports denial
    responses (the "websocket.http.response" extension), else with a close before accept (HTTP 403)."""
    from fastapi.responses import PlainTextResponse

    try:
        await websocket.send_denial_response(
            PlainTextResponse(
                "missing or wrong API key\n", status_code=401, headers={"WWW-Authenticate": "Api-Key"}
            )
        )
    except RuntimeError:  # the extension is not offered
        await websocket.close(code=1008)


def _reason(text: str | bytes) -> str:
    return str(text)[:120].encode("utf-8")[:120].decode("utf-8", "ignore")


def _pack(obj: object) -> bytes:
    from nora_edge.serve.protocol import pack

    return pack(obj)


def build_app(
    bundle: str | Path,
    config: ServeConfig | None = None,
    replicas: int = 2,
    threads: int = 1,
    load_kwargs: dict | None = None,
):
    """The bound Serve application: ``replicas`` x :class:`NoraReplica` serving ``bundle``.

    Args:
        bundle: bundle directory (every replica loads it; on a cluster it must exist on every node).
        config: keys and limits (``max_connections`` per replica; ``api_key`` checked on connect).
        replicas: 1..MAX_REPLICAS.
        threads: onnxruntime intra-op threads per replica.
        load_kwargs: extra ``NoraPolicy.load`` options (e.g. {"forced_tokens": "flag"}).
    """
    config = config or ServeConfig()
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= MAX_REPLICAS:
        raise InputError(f"--replicas must be an int in 1..{MAX_REPLICAS}, got {replicas!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be an int >= 1, got {threads!r}")
    bundle = Path(bundle).resolve()
    if not (bundle / "manifest.json").is_file():
        raise InputError(f"{bundle}: not a bundle (no manifest.json)")
    _, serve = _import_ray()
    deployment = serve.deployment(
        _build_deployment(),
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        max_ongoing_requests=config.max_connections,  # one slot per open WebSocket connection
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=10.0,
        graceful_shutdown_timeout_s=5.0,
        ray_actor_options={
            "num_cpus": threads,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
        },
    )
    return deployment.bind(str(bundle), asdict(config), threads, dict(load_kwargs or {}))


def serve_ray(
    bundle: str | Path,
    *,
    replicas: int = 2,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    config: ServeConfig | None = None,
    threads: int = 1,
    load_kwargs: dict | None = None,
    ready_timeout_s: float = 300.0,
) -> str:
    """Start Ray (see :func:`start_ray`) and Serve on ``host:port``, deploy, wait until every replica is up.

    Returns:
        the WebSocket URL, ``ws://host:port``. Stop with :func:`shutdown`.

    Raises:
        ServeRayError: Ray missing, or the application not RUNNING within ``ready_timeout_s``.
    """
    app = build_app(bundle, config, replicas, threads, load_kwargs)
    start_ray(address, num_cpus=replicas * threads)
    try:
        return _deploy(app, bundle, host, port, ready_timeout_s)
    except BaseException:
        shutdown()
        raise


def _deploy(app, bundle, host: str, port: int, ready_timeout_s: float) -> str:
    _, serve = _import_ray()
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + ready_timeout_s
    while True:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and str(status.status).endswith("RUNNING"):
            return f"ws://{host}:{port}"
        if status is not None and str(status.status).endswith("DEPLOY_FAILED"):
            raise ServeRayError(f"Ray Serve could not deploy {bundle}: {status.message}")
        if time.monotonic() > deadline:
            raise ServeRayError(f"Ray Serve app not RUNNING after {ready_timeout_s:g} s: {status}")
        time.sleep(0.5)


def replica_actors() -> list[str]:
    """Names of the live replica actors of the app (namespace "serve"), for fault injection and inspection."""
    ray, _ = _import_ray()
    names = ray.util.list_named_actors(all_namespaces=True)
    prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
    return sorted(a["name"] for a in names if a["namespace"] == "serve" and a["name"].startswith(prefix))


def kill_replica(name: str) -> None:
    """Kill one replica actor (as a crash: no graceful drain); Serve's controller starts a replacement."""
    ray, _ = _import_ray()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def shutdown() -> None:
    """Local Ray: stop Serve and Ray. A cluster: delete this app only, then disconnect. Safe to call twice."""
    if "ray" not in sys.modules:
        return
    ray, serve = _import_ray()
    if not ray.is_initialized():
        return
    # bounded: if a signal also reached Ray's own processes (a process-group Ctrl-C), Serve's graceful shutdown
    # retries forever; ray.shutdown() then still stops the local instance
    stop = threading.Thread(
        target=serve.shutdown if _STATE["local"] else lambda: serve.delete(APP_NAME), daemon=True
    )
    stop.start()
    stop.join(SHUTDOWN_TIMEOUT_S)
    ray.shutdown()


def run_forever(url: str, echo=print) -> None:
    """Block until Ctrl-C / SIGTERM, then :func:`shutdown` (the body of ``nora-edge serve --ray``)."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    echo(f"serving on {url} (Ray Serve, {len(replica_actors())} replicas); Ctrl-C to stop")
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
