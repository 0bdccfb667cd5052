"""The server driven by openpi's published client (``openpi-client`` from PyPI, unmodified) against NoraPolicy
called directly on the same inputs, in this process."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from nora_edge.serve import ServeConfig
from tests.serve.conftest import expected, load_policy

pytestmark = pytest.mark.timeout(600)

REPLY_KEYS = {
    "actions", "token_classes", "token_class_counts", "flagged", "stopped", "unnorm_key", "mode", "new_tokens",
    "timings", "server_timing",
}  # fmt: skip
TIMING_KEYS = {"preprocess", "vision", "prefill", "decode", "detokenize", "wait", "policy", "infer"}


def _check_reply(reply: dict, want) -> bool:
    """A reply equals the direct ChunkOutput ``want``: same actions bit for bit, same token classes."""
    assert set(reply) == REPLY_KEYS
    actions = reply["actions"]
    assert actions.dtype == np.float64 and actions.shape == want.actions.shape
    assert np.array_equal(actions, want.actions)
    assert tuple(reply["token_classes"]) == want.token_classes
    assert reply["token_class_counts"] == want.class_counts
    assert reply["flagged"] == want.flagged == any(c != "model" for c in want.token_classes)
    assert (reply["stopped"], reply["unnorm_key"], reply["mode"]) == (
        want.stopped,
        want.unnorm_key,
        want.mode,
    )
    assert reply["new_tokens"] == want.ids.size
    assert set(reply["timings"]) == TIMING_KEYS and all(v >= 0 for v in reply["timings"].values())
    assert reply["server_timing"]["infer_ms"] == pytest.approx(reply["timings"]["infer"] * 1e3)
    return reply["flagged"]


def _compare(client, reference, pairs, obs_of=None, unnorm_key=None) -> tuple[int, int, int]:
    """Send every pair; returns (chunks compared, refusals compared, flagged chunks among them)."""
    chunks = refusals = flagged = 0
    for frame, instruction in pairs:
        obs = obs_of(frame, instruction) if obs_of else {"image": frame, "prompt": instruction}
        kind, want = expected(reference, frame, instruction, unnorm_key)
        if kind == "ok":
            flagged += _check_reply(client.infer(obs), want)
            chunks += 1
        else:  # the policy refused this chunk: the client must be told exactly that
            with pytest.raises(RuntimeError) as e:
                client.infer(obs)
            assert str(e.value) == f"Error in inference server:\n{want}"
            refusals += 1
    return chunks, refusals, flagged


def _odd_inputs() -> list:
    """Inputs far from the synthetic task, on which the trained fixture emits tokens it did not choose."""
    black = np.zeros((224, 224, 3), np.uint8)
    noise = np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return [(black, "slide the yellow bowl"), (black, "x"), (noise, "what is the weather"), (noise[:97], "x")]


def test_openpi_client_gets_predict_action_chunk(start_server, reference, pairs):
    server = start_server()
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    meta = client.get_server_metadata()
    assert meta == server.server.handler.metadata()
    assert (meta["action_horizon"], meta["action_dim"]) == reference.predict_action_chunk(*pairs[0]).shape
    assert meta["unnorm_keys"] == sorted(reference.bundle.norm_stats) and meta["forced_tokens"] == "raise"
    chunks, refusals, flagged = _compare(client, reference, pairs)
    assert chunks + refusals == len(pairs) and chunks >= len(pairs) // 2 and flagged == 0  # trained: decodes
    odd = _compare(client, reference, _odd_inputs())
    assert odd[1] >= 1 and odd[2] == 0  # refused with "ForcedTokenError: ..." (never sent unflagged)
    refusals += odd[1]
    for frame, instruction in pairs[:2]:  # predict_action_chunk itself, on a fresh comparison
        kind, _ = expected(reference, frame, instruction)
        if kind == "ok":
            got = client.infer({"image": frame, "prompt": instruction})["actions"]
            assert np.array_equal(got, reference.predict_action_chunk(frame, instruction))
    snap = server.server.handler.metrics.snapshot()
    assert snap["requests"]["ok"] >= chunks and snap["requests"]["error"] == refusals
    assert snap["errors"] == {"ForcedTokenError": refusals}


def test_image_key_option_unnorm_key_and_extra_keys(start_server, reference, pairs):
    server = start_server(ServeConfig(image_key="observation/image"))
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    key = sorted(reference.bundle.norm_stats)[0]

    def flat(frame, instruction):  # openpi LIBERO-style keys, plus keys the server ignores
        return {
            "observation/image": frame,
            "observation/state": np.zeros(8),
            "prompt": instruction,
            "unnorm_key": key,
        }

    def nested(frame, instruction):  # openpi ALOHA-style nesting of the same path
        return {"observation": {"image": frame}, "prompt": instruction, "unnorm_key": key}

    n1 = _compare(client, reference, pairs[:3], flat, key)
    n2 = _compare(client, reference, pairs[:3], nested, key)
    assert sum(n1) == sum(n2) == 3


def test_flag_mode_tells_the_robot(start_server, serve_bundle, pairs):
    server = start_server(forced_tokens="flag")
    flag_ref = load_policy(serve_bundle, "flag")
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    assert client.get_server_metadata()["forced_tokens"] == "flag"
    chunks, refusals, flagged = _compare(client, flag_ref, pairs[:3] + _odd_inputs())
    assert refusals == 0 and chunks == 7 and flagged >= 1  # every chunk is sent, flagged ones marked
    flag_ref.close()


def test_concurrent_clients_share_one_policy(start_server, reference, pairs):
    server = start_server()
    results: dict[int, tuple[int, int]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            client = WebsocketClientPolicy("127.0.0.1", server.port)
            results[i] = _compare(client, reference, pairs[i::3])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert sum(sum(r) for r in results.values()) == len(pairs)
    assert server.server.handler.metrics.snapshot()["connections_total"] == 3


def test_health_and_metrics(start_server, good_pair):
    server = start_server()
    base = f"http://127.0.0.1:{server.port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
        assert (r.status, r.read()) == (200, b"OK\n")
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    client.infer({"image": good_pair[0], "prompt": good_pair[1]})
    with pytest.raises(RuntimeError):
        client.infer({"prompt": good_pair[1]})
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    p = "nora_edge_serve_"
    for line in (
        f'{p}requests_total{{outcome="ok"}} 1',
        f'{p}requests_total{{outcome="error"}} 1',
        f'{p}errors_total{{type="ServeInputError"}} 1',
        f"{p}connections_active 1",
        f'{p}stage_seconds_count{{stage="vision"}} 1',
        f'{p}stage_seconds_count{{stage="unpack"}} 2',
        f'{p}stage_seconds_bucket{{stage="request",le="+Inf"}} 1',
    ):
        assert line in text.splitlines(), line


def test_cli_serve_subprocess_without_torch(serve_bundle, reference, good_pair):
    """``nora-edge serve`` end to end: loopback by default, port 0, the openpi client, no torch in the process."""
    script = (
        "import sys, runpy, importlib.abc\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers') or name.startswith('nora_edge.export'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, B())\n"
        "sys.argv = ['nora-edge', 'serve', sys.argv[1], '--port', '0', '--threads', '1', '--kernels', 'auto']\n"
        "from nora_edge.cli import app\n"
        "app()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(serve_bundle)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # "nora-edge serve: listening on ws://127.0.0.1:PORT ..."
        assert "listening on ws://127.0.0.1:" in line, (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        port = int(line.split("ws://127.0.0.1:")[1].split()[0])
        client = WebsocketClientPolicy("127.0.0.1", port)
        got = client.infer({"image": good_pair[0], "prompt": good_pair[1]})["actions"]
        assert np.array_equal(got, reference.predict_action_chunk(*good_pair))
    finally:
        proc.terminate()
        proc.wait(30)


def test_internal_error_is_reported_then_closed_1011(start_server, reference, good_pair):
    """A policy that breaks mid-inference (its vision session gone): an "InternalError: ..." text, then close 1011
    as openpi's server does; the error is counted and the server keeps answering health checks."""
    from openpi_client import msgpack_numpy
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    server = start_server()
    server.server.handler.policy.vision = None  # the real policy, broken: run_chunk raises AttributeError
    with connect(f"ws://127.0.0.1:{server.port}", open_timeout=20, close_timeout=10, max_size=None) as ws:
        msgpack_numpy.unpackb(ws.recv(timeout=20))
        ws.send(msgpack_numpy.packb({"image": good_pair[0], "prompt": good_pair[1]}))
        reply = ws.recv(timeout=60)
        assert isinstance(reply, str) and reply.startswith("InternalError: AttributeError: "), reply
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=30)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1011
    assert server.server.handler.metrics.snapshot()["errors"] == {"InternalError": 1}
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
        assert r.status == 200


def test_bundle_token_limit_is_a_typed_reply(start_server, reference, good_pair):
    """An instruction under max_instruction_chars but over the bundle's token limit: the policy's own message,
    as a ServeInputError, and the connection keeps serving."""
    server = start_server()
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    long_prompt = "x " * 900  # 1800 chars < 2000, one token per "x " at least
    kind, want = expected(reference, good_pair[0], long_prompt)
    assert kind == "error" and want.startswith("InputError: instruction is too long")
    with pytest.raises(RuntimeError) as e:
        client.infer({"image": good_pair[0], "prompt": long_prompt})
    assert str(e.value) == "Error in inference server:\nServe" + want
    got = client.infer({"image": good_pair[0], "prompt": good_pair[1]})["actions"]
    assert np.array_equal(got, reference.predict_action_chunk(*good_pair))
