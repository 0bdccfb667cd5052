"""Every bad input of issue 18 part 2 against a live server: a typed error reply (or a clean close / HTTP refusal
for auth, size and connection count), and afterwards the server still answers a valid request on another
connection with exactly NoraPolicy's actions."""

from __future__ import annotations

import pickle
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy as openpi_codec
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from nora_edge.serve import ServeConfig

pytestmark = pytest.mark.timeout(600)

KEY = "test-key-0123"
LIMITS = dict(
    max_message_bytes=2**20, max_frame_pixels=300 * 300, max_instruction_chars=100, max_connections=3
)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(ServeConfig(api_key=KEY, **LIMITS))


def _connect(port: int, key: str | None = KEY):
    headers = {"Authorization": f"Api-Key {key}"} if key else None
    ws = connect(f"ws://127.0.0.1:{port}", additional_headers=headers, max_size=None, open_timeout=20,
                 close_timeout=10, compression=None)  # fmt: skip
    assert openpi_codec.unpackb(ws.recv(timeout=20))["server"] == "nora-edge"  # metadata first
    return ws


def _close(client: WebsocketClientPolicy) -> None:
    """openpi's client has no close(); its connection would hold one of the server's 3 slots until exit."""
    client._ws.close()


def _errors(server) -> dict:
    return server.server.handler.metrics.snapshot()["errors"]


def assert_serves(server, reference, good_pair, ws=None) -> None:
    """A valid request (on ``ws``, else on a new openpi client connection) gets NoraPolicy's exact actions."""
    frame, instruction = good_pair
    want = reference.predict_action_chunk(frame, instruction)
    if ws is None:
        client = WebsocketClientPolicy("127.0.0.1", server.port, api_key=KEY)
        try:
            reply = client.infer({"image": frame, "prompt": instruction})
        finally:
            _close(client)
    else:
        ws.send(openpi_codec.packb({"image": frame, "prompt": instruction}))
        reply = openpi_codec.unpackb(ws.recv(timeout=120))
    assert np.array_equal(reply["actions"], want)


def _frame(shape, dtype=np.uint8):
    return np.random.default_rng(1).integers(0, 256, shape).astype(dtype)


OK = _frame((224, 224, 3))
BAD_OBS = {
    "frame wrong rank": (
        {"image": _frame((224, 224)), "prompt": "push the red cup"},
        "must have shape (H, W, 3)",
    ),
    "frame channels first": (
        {"image": _frame((3, 224, 224)), "prompt": "push the red cup"},
        "got (3, 224, 224)",
    ),
    "frame empty": ({"image": _frame((0, 224, 3)), "prompt": "push the red cup"}, "got (0, 224, 3)"),
    "frame float32": (
        {"image": _frame((224, 224, 3), np.float32), "prompt": "push"},
        "must be uint8, got float32",
    ),
    "frame int64": ({"image": _frame((100, 100, 3), np.int64), "prompt": "push"}, "must be uint8, got int64"),
    "frame a list": (
        {"image": [[1, 2, 3]], "prompt": "push"},
        "must be a numpy array (H, W, 3) uint8, got list",
    ),
    "frame too many pixels": ({"image": _frame((301, 300, 3)), "prompt": "push"}, "90300 pixels"),
    "missing frame": ({"prompt": "push the red cup"}, "lacks the frame key 'image'"),
    "missing prompt": ({"image": OK}, "lacks the instruction key 'prompt'"),
    "prompt not a str": ({"image": OK, "prompt": 7}, "'prompt' must be a str, got int"),
    "prompt blank": ({"image": OK, "prompt": "  "}, "'prompt' is empty"),
    "prompt too long": ({"image": OK, "prompt": "push " * 21}, "105 chars > max_instruction_chars 100"),
    "unknown unnorm key": ({"image": OK, "prompt": "push", "unnorm_key": "no_such_robot"}, "'no_such_robot'"),
    "unnorm key not a str": ({"image": OK, "prompt": "push", "unnorm_key": 3}, "must be a str or absent"),
}


@pytest.mark.parametrize("case", list(BAD_OBS))
def test_bad_observation_gets_a_typed_reply(case, server, reference, good_pair):
    obs, needle = BAD_OBS[case]
    before = _errors(server).get("ServeInputError", 0)
    with _connect(server.port) as ws:
        ws.send(openpi_codec.packb(obs))
        reply = ws.recv(timeout=60)
        assert isinstance(reply, str) and reply.startswith("ServeInputError: ") and needle in reply, reply
        assert_serves(server, reference, good_pair, ws)  # the same connection stays usable
    assert_serves(server, reference, good_pair)  # and so does a new one
    assert _errors(server)["ServeInputError"] == before + 1


def test_openpi_client_raises_the_typed_reply(server, reference, good_pair):
    client = WebsocketClientPolicy("127.0.0.1", server.port, api_key=KEY)
    with pytest.raises(
        RuntimeError, match=r"Error in inference server:\nServeInputError: unknown unnorm_key 'x'"
    ):
        client.infer({"image": OK, "prompt": "push the red cup", "unnorm_key": "x"})
    _close(client)
    assert_serves(server, reference, good_pair)


class _Touch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _protocol_cases(marker: Path) -> dict:
    payload = pickle.dumps(_Touch(marker))
    obj = {b"__ndarray__": True, b"data": payload, b"dtype": "|O", b"shape": [1]}
    return {
        "not msgpack": (b"\xc1 not msgpack", "not valid msgpack"),
        "a pickle": (payload, "not valid msgpack"),
        "object array of a pickle": (msgpack.packb({"image": obj, "prompt": "push"}), "dtype '|O'"),
        "a text frame": ('{"prompt": "push"}', "got a text frame"),
        "a msgpack list": (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
    }


@pytest.mark.parametrize("case", list(_protocol_cases(Path("x"))))
def test_non_protocol_message_gets_a_reply_then_close_1003(case, server, reference, good_pair, tmp_path):
    marker = tmp_path / "unpickled"
    data, needle = _protocol_cases(marker)[case]
    before = _errors(server).get("ServeProtocolError", 0)
    with _connect(server.port) as ws:
        ws.send(data)
        reply = ws.recv(timeout=60)
        assert isinstance(reply, str) and reply.startswith("ServeProtocolError: ") and needle in reply, reply
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=30)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1003
    assert not marker.exists()  # nothing was unpickled
    assert _errors(server)["ServeProtocolError"] == before + 1
    assert_serves(server, reference, good_pair)


def test_oversized_message_closes_1009(server, reference, good_pair):
    before = _errors(server).get("message_too_big", 0)
    big = openpi_codec.packb({"image": _frame((600, 600, 3)), "prompt": "push"})  # 1.08 MB > 1 MiB
    assert len(big) > LIMITS["max_message_bytes"]
    with _connect(server.port) as ws:
        ws.send(big)
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=30)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1009  # no reply, a clean close
    assert_serves(server, reference, good_pair)
    assert _errors(server)["message_too_big"] == before + 1


@pytest.mark.parametrize("key", [None, "wrong-key", KEY + "x", f"{KEY[:-1]}"])
def test_wrong_api_key_is_refused_before_the_handshake(key, server, reference, good_pair):
    before = _errors(server).get("unauthorized", 0)
    with pytest.raises(InvalidStatus) as e:
        _connect(server.port, key)
    assert e.value.response.status_code == 401
    with pytest.raises(InvalidStatus):  # the published client fails the same way
        WebsocketClientPolicy("127.0.0.1", server.port, api_key=key)
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics")
    if key:
        req.add_header("Authorization", f"Api-Key {key}")
    with pytest.raises(urllib.error.HTTPError) as h:  # metrics need the key too
        urllib.request.urlopen(req, timeout=10)
    assert h.value.code == 401
    h.value.close()  # an open HTTPError holds the socket, which websockets lets linger for close_timeout
    assert _errors(server)["unauthorized"] == before + 3
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
        assert r.status == 200  # health needs no key (openpi's /healthz)
    assert_serves(server, reference, good_pair)


def test_connection_limit(server, reference, good_pair):
    before = _errors(server).get("too_many_connections", 0)
    open_ = [_connect(server.port) for _ in range(LIMITS["max_connections"])]
    try:
        with pytest.raises(InvalidStatus) as e:
            _connect(server.port)
        assert e.value.response.status_code == 503
        assert b"max_connections 3" in e.value.response.body
        assert_serves(server, reference, good_pair, open_[0])  # the open ones keep working
    finally:
        open_.pop().close()
    deadline = time.monotonic() + 20
    while server.server.handler.metrics.snapshot()["connections_active"] >= LIMITS["max_connections"]:
        assert time.monotonic() < deadline, "a closed connection was never released"
        time.sleep(0.05)
    assert_serves(server, reference, good_pair)  # a freed slot is usable again
    for ws in open_:
        ws.close()
    assert _errors(server)["too_many_connections"] == before + 1


def test_one_bad_connection_does_not_disturb_another(server, reference, good_pair):
    """A client mid-conversation keeps working while another sends garbage and gets closed."""
    with _connect(server.port) as good, _connect(server.port) as bad:
        bad.send(b"\xc1")
        assert bad.recv(timeout=30).startswith("ServeProtocolError: ")
        assert_serves(server, reference, good_pair, good)
        with pytest.raises(ConnectionClosed):
            bad.recv(timeout=30)
        assert_serves(server, reference, good_pair, good)
