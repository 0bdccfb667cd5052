"""asyncio WebSocket transport of the policy server (openpi's protocol), health and metrics on the same port.

Data flow: TCP connection --HTTP request--> :meth:`PolicyServer._process_request`: ``GET /healthz`` -> 200 "OK";
wrong/missing ``Authorization: Api-Key <key>`` (when a key is set) -> 401; ``GET /metrics`` -> Prometheus text;
more than ``max_connections`` open -> 503; else the WebSocket handshake --> :meth:`PolicyServer._connection`: the
packed metadata, then per message (at most ``max_message_bytes``; websockets closes a bigger one with 1009)
``PolicyHandler.handle_message`` in a worker thread (the event loop keeps serving health checks, pings and other
connections while a chunk runs) --> the reply (bytes, or an error text frame, then a close when the handler says).

Conventions from openpi's ``src/openpi/serving/websocket_policy_server.py``: metadata on connect, ``/healthz``,
compression off, an error as a text frame (its client raises it), close code 1011 after an internal error.
Differences: loopback by default, API-key check before the handshake, bounded messages and connections, and a bad
observation keeps the connection open.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import ipaddress
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from websockets.asyncio.server import Request, Response, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from nora_edge.serve.handler import PolicyHandler, ServeConfig
from nora_edge.serve.protocol import pack

log = logging.getLogger(__name__)

__all__ = ["PolicyServer", "ServerThread", "load_and_serve"]

CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455 registry: over the connection limit after the handshake raced
CLOSE_MESSAGE_TOO_BIG = 1009
MAX_QUEUE = 2  # frames websockets buffers per connection before it stops reading (bounds memory per client)


class PolicyServer:
    """One listening socket serving a :class:`PolicyHandler`.

    Args:
        handler: the transport-agnostic handler (its config holds the limits and the API key).
        host: bind address (default loopback).
        port: TCP port; 0 picks a free one (see :attr:`port` once started).
    """

    def __init__(self, handler: PolicyHandler, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.handler = handler
        self.config: ServeConfig = handler.config
        self.host = host
        self.port = port
        self._active = 0
        self._metadata = pack(handler.metadata())
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ HTTP side
    def _authorized(self, request: Request) -> bool:
        key = self.config.api_key
        if key is None:
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode("utf-8", "replace"), f"Api-Key {key}".encode())

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        metrics = self.handler.metrics
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if not self._authorized(request):
            metrics.error("unauthorized")
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
            response.headers["WWW-Authenticate"] = "Api-Key"
            return response
        if path == "/metrics":
            response = connection.respond(http.HTTPStatus.OK, metrics.render())
            del response.headers["Content-Type"]  # websockets' Headers appends on assignment
            response.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
            return response
        if self._active >= self.config.max_connections:
            metrics.error("too_many_connections")
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"too many connections (max_connections {self.config.max_connections})\n",
            )
        return None

    # ------------------------------------------------------------------ WebSocket side
    async def _connection(self, ws: ServerConnection) -> None:
        metrics = self.handler.metrics
        if self._active >= self.config.max_connections:  # handshakes that passed the HTTP check together
            metrics.error("too_many_connections")
            await ws.close(CLOSE_TRY_AGAIN_LATER, "too many connections")
            return
        self._active += 1
        metrics.connection_opened()
        loop = asyncio.get_running_loop()
        try:
            await ws.send(self._metadata)
            while True:
                try:
                    message = await ws.recv()
                except ConnectionClosedError as e:
                    if e.sent is not None and e.sent.code == CLOSE_MESSAGE_TOO_BIG:
                        metrics.error("message_too_big")
                        log.info("%s: message over max_message_bytes, closed", ws.remote_address)
                    break
                reply, close = await loop.run_in_executor(self._pool, self.handler.handle_message, message)
                await ws.send(reply)
                if close:
                    await ws.close(close, str(reply)[:120].encode("utf-8")[:120].decode("utf-8", "ignore"))
                    break
        except ConnectionClosed:
            pass
        finally:
            self._active -= 1
            metrics.connection_closed()

    async def serve(
        self,
        started: threading.Event | None = None,
        stop: asyncio.Future | None = None,
        announce: bool = False,
    ) -> None:
        """Serve until ``stop`` resolves (forever when None); sets :attr:`port` (printed when ``announce``), then
        ``started``."""
        self._pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="nora-serve")
        try:
            async with serve(
                self._connection,
                self.host,
                self.port,
                process_request=self._process_request,
                compression=None,
                max_size=self.config.max_message_bytes,
                max_queue=MAX_QUEUE,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                if announce:
                    print(
                        f"nora-edge serve: listening on ws://{self.host}:{self.port} (/healthz, /metrics)",
                        flush=True,
                    )
                if started is not None:
                    started.set()
                await (stop if stop is not None else asyncio.get_running_loop().create_future())
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def serve_forever(self, announce: bool = True) -> None:
        """Block serving (Ctrl-C stops)."""
        try:
            asyncio.run(self.serve(announce=announce))
        except KeyboardInterrupt:
            pass


class ServerThread:
    """A :class:`PolicyServer` on its own event loop in a daemon thread (tests, notebooks, embedding).

    Use as a context manager: ``with ServerThread(handler) as s: url = f"ws://127.0.0.1:{s.port}"``.
    """

    def __init__(self, handler: PolicyHandler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = PolicyServer(handler, host, port)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nora-serve-loop", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = self._loop.create_future()
            await self.server.serve(self._started, self._stop)

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._started.set()

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the policy server did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load_and_serve(
    bundle: str | Path,
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    threads: int | None = None,
    providers: str = "auto",
    forced_tokens: str = "raise",
    max_repaired: int = 0,
    kernels: str = "auto",
    decoding: str = "plain",
) -> None:
    """``nora-edge serve``: load the bundle once, then serve it until interrupted (``decoding``: as
    ``NoraPolicy.load``; a multi-token policy's draft table learns from every client's chunks).

    Raises:
        BundleError, InputError: as ``NoraPolicy.load``.
    """
    from nora_edge.policy import NoraPolicy

    if not _is_loopback(host) and config.api_key is None:
        log.warning(
            "serving on %s without an API key: anyone who reaches this port can drive the policy", host
        )
    policy = NoraPolicy.load(
        bundle, providers=providers, threads=threads, forced_tokens=forced_tokens, max_repaired=max_repaired,
        kernels=kernels, decoding=decoding,
    )  # fmt: skip
    with policy:
        PolicyServer(PolicyHandler(policy, config), host, port).serve_forever()
