"""``nora-edge serve --ray`` (Ray Serve replicas) and ``nora-edge loadtest``, driven by the unmodified openpi client.

Reference: every reply's actions are compared with ``NoraPolicy.predict_action_chunk`` run here in-process on the
same bundle with the same load options (the plain path, no server); the load tester's counts are checked against
each other and against what the server was made to do (wrong expectation -> all wrong; bad observation -> all
server errors).
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

pytest.importorskip("openpi_client", reason="the openpi client drives the server (pip install openpi-client)")
pytest.importorskip("websockets")

from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402

from nora_edge.errors import InputError  # noqa: E402
from nora_edge.policy import NoraPolicy  # noqa: E402
from nora_edge.serve import loadtest as lt  # noqa: E402
from nora_edge.serve.handler import PolicyHandler, ServeConfig  # noqa: E402
from nora_edge.serve.server import ServerThread  # noqa: E402

LOAD = {
    "forced_tokens": "flag"
}  # the untrained fixture: every chunk answered (flagged), server and reference alike
API_KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tiny_bundle_h5, make_rgb_image):
    """Two observations and their actions from NoraPolicy.predict_action_chunk (threads=1, as the servers)."""
    obs = [(make_rgb_image(seed=s), p) for s, p in ((0, "pick up the red block"), (1, "push the cup"))]
    with NoraPolicy.load(tiny_bundle_h5, threads=1, **LOAD) as policy:
        return [(img, p, policy.predict_action_chunk(img, p)) for img, p in obs]


@pytest.fixture(scope="module")
def ray_url(tiny_bundle_h5):
    pytest.importorskip("ray", reason="--ray needs ray[serve]")
    pytest.importorskip("fastapi", reason="--ray needs ray[serve]")
    from nora_edge.serve import ray_app

    try:
        url = ray_app.serve_ray(
            tiny_bundle_h5, replicas=2, port=_free_port(), config=ServeConfig(api_key=API_KEY),
            load_kwargs=LOAD, ready_timeout_s=180,
        )  # fmt: skip
        yield url
    finally:
        ray_app.shutdown()


@pytest.fixture(scope="module")
def single_url(tiny_bundle_h5):
    with NoraPolicy.load(tiny_bundle_h5, threads=1, **LOAD) as policy:
        with ServerThread(PolicyHandler(policy, ServeConfig())) as server:
            yield f"ws://127.0.0.1:{server.port}"


@pytest.mark.timeout(300)
def test_ray_replicas_answer_the_openpi_client(ray_url, reference):
    from websockets.exceptions import InvalidStatus

    from nora_edge.serve import ray_app

    replicas = ray_app.replica_actors()
    assert len(replicas) == 2
    ids = {name.rsplit("#", 1)[1] for name in replicas}
    clients = [WebsocketClientPolicy(ray_url, api_key=API_KEY) for _ in range(4)]
    compared = 0
    try:
        for c in clients:
            meta = c.get_server_metadata()
            assert meta["serve"]["backend"] == "ray" and meta["serve"]["replica"] in ids  # pinned replica
            assert meta["image_key"] == "image" and meta["forced_tokens"] == "flag"
            for img, prompt, want in reference:
                got = c.infer({"image": img, "prompt": prompt})["actions"]
                assert got.dtype == np.float64 and np.array_equal(got, want)
                compared += 1
        # a bad observation: the error text as openpi's server sends it; the connection stays usable
        with pytest.raises(RuntimeError, match="ServeInputError: observation lacks the instruction key"):
            clients[0].infer({"image": reference[0][0]})
        img, prompt, want = reference[0]
        assert np.array_equal(clients[0].infer({"image": img, "prompt": prompt})["actions"], want)
        compared += 1
    finally:
        for c in clients:
            lt._close(c)
    assert compared == 4 * len(reference) + 1
    with pytest.raises(InvalidStatus) as e:  # no API key: the handshake is refused
        WebsocketClientPolicy(ray_url)
    assert e.value.response.status_code in (401, 403)


@pytest.mark.timeout(120)
def test_loadtest_counts_against_one_server(single_url, reference, tmp_path):
    img, prompt, want = reference[0]
    obs = {"image": img, "prompt": prompt}
    cfg = lt.LoadConfig(clients=2, seconds=3.0, request_timeout_s=30.0)
    res = lt.summarize(lt.run_load(single_url, obs, want, cfg))
    assert res["requests"] == res["ok"] + res["wrong"] + sum(res["errors"].values())
    assert res["ok"] > 0 and res["wrong"] == 0 and res["errors"] == {} and res["lost_in_flight"] == 0
    assert sum(res["per_client_ok"]) == res["ok"] and all(n > 0 for n in res["per_client_ok"])
    assert res["latency_ms"]["n"] == res["ok"] and res["latency_ms"]["p50"] <= res["latency_ms"]["p99"]
    assert sum(b["ok"] for b in res["timeline"]) == res["ok"]
    assert res["connects"] == 2 and res["server_metadata"]["server"] == "nora-edge"
    paths = lt.write_report(res, tmp_path / "report")
    back = json.loads(paths["json"].read_text())
    assert back["ok"] == res["ok"] and "p99" in paths["markdown"].read_text()

    # the check catches a wrong reply: the same server, an expectation off by one
    bad = lt.summarize(lt.run_load(single_url, obs, want + 1.0, lt.LoadConfig(clients=1, seconds=1.0)))
    assert bad["requests"] > 0 and bad["wrong"] == bad["requests"] and bad["ok"] == 0

    # server errors are counted by type, each followed by a reconnect
    err = lt.summarize(lt.run_load(single_url, {"image": img}, want, lt.LoadConfig(clients=1, seconds=1.0)))
    assert err["requests"] > 0 and err["errors"] == {"server_error": err["requests"]} and err["ok"] == 0
    assert err["connects"] == err["requests"] or err["connects"] == err["requests"] + 1


@pytest.mark.timeout(120)
def test_loadtest_end_to_end_with_bundle_reference(single_url, tiny_bundle_h5, reference, tmp_path):
    img, prompt, want = reference[0]
    cfg = lt.LoadConfig(clients=2, seconds=2.0)
    res = lt.loadtest(
        single_url, cfg, tmp_path, bundle=tiny_bundle_h5, candidates=[(img, prompt)], load_kwargs=LOAD
    )
    assert res["ok"] > 0 and res["wrong"] == 0 and res["errors"] == {}
    assert res["reference"]["actions_shape"] == list(want.shape)
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file()


def test_load_config_bounds():
    with pytest.raises(InputError, match="clients"):
        lt.LoadConfig(clients=0, seconds=1)
    with pytest.raises(InputError, match="clients"):
        lt.LoadConfig(clients=lt.MAX_CLIENTS + 1, seconds=1)
    with pytest.raises(InputError, match="seconds"):
        lt.LoadConfig(clients=1, seconds=lt.MAX_SECONDS + 1)
    with pytest.raises(InputError, match="URL"):
        lt.normalize_url("")


@pytest.mark.timeout(300)
def test_ray_replica_killed_mid_load_loses_only_in_flight(ray_url, reference):
    """Runs last in this module: it kills one replica of the shared app (Serve starts a replacement)."""
    import threading

    from nora_edge.serve import ray_app

    img, prompt, want = reference[0]
    cfg = lt.LoadConfig(clients=4, seconds=12.0, request_timeout_s=30.0, api_key=API_KEY)
    box = {}
    runner = threading.Thread(target=lambda: box.setdefault("raw", lt.run_load(ray_url, {"image": img, "prompt": prompt}, want, cfg)))  # fmt: skip
    runner.start()
    time.sleep(4.0)
    victim = ray_app.replica_actors()[0]
    t_kill = time.time()
    ray_app.kill_replica(victim)
    runner.join(timeout=120)
    assert not runner.is_alive()
    raw = box["raw"]
    res = lt.summarize(raw, {"kill": t_kill - raw["t0_unix"]})
    m = res["marks"]["kill"]
    failed = sum(res["errors"].values())
    assert res["wrong"] == 0 and res["requests"] == res["ok"] + failed
    # lost = the request in flight on each connection to the killed replica: at most one per client, none before
    assert failed == res["lost_in_flight"] and m["failed_before"] == 0 and m["max_failed_per_client"] <= 1
    assert set(res["errors"]) <= {"connection_closed"}
    assert m["ok_after"] > 0  # service resumed
    recs = [(c.index, *r) for c in raw["clients"] for r in c.records]
    assert {i for i, ts, _, out in recs if out == "ok" and ts >= m["t"]} == set(range(cfg.clients))


@pytest.mark.timeout(60)
def test_loadtest_times_out_a_server_that_never_replies(reference):
    """A server that sends metadata and then never answers: every request ends as a bounded ``timeout``."""
    import asyncio
    import threading

    from websockets.asyncio.server import serve

    from nora_edge.serve.protocol import pack

    async def stall(ws):
        await ws.send(pack({"server": "stall"}))
        async for _ in ws:  # read, never answer
            pass

    started, box = threading.Event(), {}

    async def main():
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()
        async with serve(stall, "127.0.0.1", 0) as server:
            box["port"] = server.sockets[0].getsockname()[1]
            started.set()
            await box["stop"]

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        img, prompt, want = reference[0]
        cfg = lt.LoadConfig(clients=2, seconds=1.5, request_timeout_s=1.0)
        t = time.monotonic()
        res = lt.summarize(
            lt.run_load(f"127.0.0.1:{box['port']}", {"image": img, "prompt": prompt}, want, cfg)
        )
        assert time.monotonic() - t < cfg.seconds + cfg.request_timeout_s + 5
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set_result, None)
        thread.join(10)
    assert res["requests"] >= 2 and res["errors"] == {"timeout": res["requests"]} and res["ok"] == 0
    assert res["lost_in_flight"] == res["requests"] and res["latency_ms"] == {"n": 0}
