"""``nora-edge serve``: a NORA policy behind openpi's WebSocket protocol (runtime only: never imports torch).

Data flow: client (e.g. the unmodified ``openpi-client`` package, ``WebsocketClientPolicy``) --WebSocket
handshake (``Authorization: Api-Key <key>`` when the server has one; refused with HTTP 401 otherwise)-->
server sends the metadata map --client sends one msgpack-numpy observation map per request--> the handler
validates it and runs ``NoraPolicy.run_chunk`` in a worker thread --> one msgpack-numpy reply map per request,
or a text frame naming the error (openpi's client raises it as ``RuntimeError("Error in inference server: ...")``).
Modules: ``protocol`` (codec), ``handler`` (transport-agnostic validation + inference), ``metrics`` (Prometheus
text), ``server`` (asyncio ``websockets`` transport, health and metrics on the same port: ``PolicyServer``,
``ServerThread`` to embed one in a process, ``load_and_serve`` behind the CLI).

Wire format (openpi's ``openpi_client.msgpack_numpy``): msgpack; a numpy array travels as the map
``{b"__ndarray__": True, b"data": <raw bytes>, b"dtype": <dtype.str, e.g. "|u1">, b"shape": [..]}``; only bool,
int, uint and float dtypes are accepted; nothing is unpickled or evaluated.

Request, reply and metadata keys, errors, limits and defaults: README.md, section "Serving robots over the network".

HTTP on the same port: ``GET /healthz`` -> 200 "OK" (openpi's path; no key needed); ``GET /metrics`` -> Prometheus
text (needs the API key when one is set): ``nora_edge_serve_requests_total{outcome}``,
``nora_edge_serve_errors_total{type}``, ``nora_edge_serve_connections_total``,
``nora_edge_serve_connections_active``, ``nora_edge_serve_stage_seconds`` histogram per ``stage`` (unpack, wait,
preprocess, vision, prefill, decode, detokenize, policy, pack, request).
"""

from nora_edge.serve.handler import PolicyHandler, ServeConfig
from nora_edge.serve.metrics import Metrics
from nora_edge.serve.protocol import ServeInputError, ServeProtocolError

__all__ = ["Metrics", "PolicyHandler", "ServeConfig", "ServeInputError", "ServeProtocolError"]
