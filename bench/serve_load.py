"""``make serve-load``: the policy server under load, one process vs Ray Serve replicas, with a replica killed.

Data flow: BUNDLE -> one known observation + its expected actions (``loadtest.reference_actions``:
``NoraPolicy.predict_action_chunk`` here) -> (1) ``nora-edge serve BUNDLE`` as a subprocess on 127.0.0.1, M openpi
clients for S seconds (``loadtest.run_load``), the server stopped -> (2) ``ray_app.serve_ray`` (local Ray, N
replicas) in this process, the same load, and at ``kill_at * S`` seconds one replica actor killed
(``ray.kill``, no graceful drain: a crash as far as its connections know) -> per run ``report.json`` + ``report.md``
under ``OUT/single`` and ``OUT/ray``, and the combined ``OUT/report.json`` + ``OUT/report.md`` with the acceptance
checks: zero wrong replies; no error on the single server; on Ray, every failed request was in flight when the
replica died (counted as lost), ok replies resumed after the kill on every client, and Serve replaced the replica.

Run: ``python -m nora_edge.bench.serve_load BUNDLE --out out/serve-load [--clients 8 --seconds 60 --replicas 2]``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nora_edge.atomic import write_json_atomic, write_text_atomic
from nora_edge.errors import InputError, NoraEdgeError
from nora_edge.serve import loadtest as lt

SERVER_CMD = "{exe} serve {bundle} --host 127.0.0.1 --port {port} --threads 1"  # 1 thread, as each replica


def _wait_for_server(url: str, proc: subprocess.Popen | None, timeout_s: float) -> dict:
    """Connect an openpi client until the server answers with its metadata (or the process exits)."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise NoraEdgeError(f"the server exited with code {proc.returncode} before answering on {url}")
        try:
            client = WebsocketClientPolicy(url)
            meta = client.get_server_metadata()
            lt._close(client)
            return meta
        except Exception as e:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise NoraEdgeError(
                    f"no server on {url} after {timeout_s:g} s ({type(e).__name__}: {e})"
                ) from e
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def run_single(
    bundle: Path, obs: dict, expected, cfg: lt.LoadConfig, port: int, out: Path, server_cmd: str
) -> dict:
    """The load against one ``nora-edge serve`` process."""
    exe = Path(sys.executable).with_name("nora-edge")
    cmd = shlex.split(server_cmd.format(exe=exe, bundle=bundle, port=port))
    log = open(out / "server.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"ws://127.0.0.1:{port}"
    try:
        meta = _wait_for_server(url, proc, 120.0)
        res = lt.summarize(lt.run_load(url, obs, expected, cfg))
    finally:
        code = _stop(proc)
        log.close()
    res.update(server_cmd=cmd, server_exit_code=code, server_metadata=res["server_metadata"] or meta)
    lt.write_report(res, out, "Load test: one `nora-edge serve` process")
    return res


def run_ray(bundle: Path, obs: dict, expected, cfg: lt.LoadConfig, port: int, out: Path, replicas: int,
            kill_at: float | None) -> dict:  # fmt: skip
    """The load against ``replicas`` Ray Serve replicas; one killed at ``kill_at * cfg.seconds``."""
    from nora_edge.serve import ray_app

    t_start = time.monotonic()
    url = ray_app.serve_ray(bundle, replicas=replicas, port=port)
    try:
        startup_s = time.monotonic() - t_start
        before = ray_app.replica_actors()
        _wait_for_server(url, None, 60.0)
        box: dict = {}
        runner = threading.Thread(target=lambda: box.setdefault("raw", lt.run_load(url, obs, expected, cfg)))
        t0_unix = time.time()
        runner.start()
        kill = None
        if kill_at is not None:
            time.sleep(kill_at * cfg.seconds)
            victim = before[0]
            t_kill_unix = time.time()
            ray_app.kill_replica(victim)
            kill = {"replica": victim, "t_unix": t_kill_unix}
        runner.join()
        raw = box["raw"]
        marks = {"replica_killed": kill["t_unix"] - raw["t0_unix"]} if kill else None
        res = lt.summarize(raw, marks)
        after = _replicas_after(ray_app, replicas, 60.0)
    finally:
        ray_app.shutdown()
    res.update(replicas=replicas, startup_s=startup_s, replicas_before=before, replicas_after=after, kill=kill,
               load_started_after_s=t0_unix - t_start)  # fmt: skip
    if kill:
        m = res["marks"]["replica_killed"]
        recs = [(c.index, *r) for c in raw["clients"] for r in c.records]
        m["clients_ok_after"] = len({i for i, ts, _, out in recs if out == "ok" and ts >= m["t"]})
        m["replaced"] = kill["replica"] not in after and len(after) == replicas
    lt.write_report(res, out, f"Load test: Ray Serve, {replicas} replicas")
    return res


def _replicas_after(ray_app, replicas: int, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        names = ray_app.replica_actors()
        if len(names) >= replicas or time.monotonic() > deadline:
            return names
        time.sleep(0.5)


def acceptance(single: dict | None, ray: dict | None, clients: int) -> dict:
    """The issue's acceptance checks, each True/False with the numbers behind it."""
    checks: dict = {}
    if single is not None:
        checks["single: zero wrong replies"] = single["wrong"] == 0
        checks["single: zero errors"] = not single["errors"]
        checks["single: p99 reported"] = "p99" in single["latency_ms"]
    if ray is not None:
        checks["ray: zero wrong replies"] = ray["wrong"] == 0
        checks["ray: p99 reported"] = "p99" in ray["latency_ms"]
        m = ray.get("marks", {}).get("replica_killed")
        if m is not None:
            failed = sum(ray["errors"].values())
            # in flight = on a connection to the killed replica: at most one per client, none before the kill
            checks["ray: only in-flight requests lost"] = (
                m["failed_before"] == 0
                and m["max_failed_per_client"] <= 1
                and failed == ray["lost_in_flight"]
            )
            checks["ray: lost requests counted"] = ray["lost_in_flight"] == failed and failed <= clients
            checks["ray: service resumed on every client"] = m["clients_ok_after"] == clients
            checks["ray: replica replaced"] = bool(m["replaced"])
        else:
            checks["ray: zero errors"] = not ray["errors"]
    return checks


def _row(name: str, r: dict) -> str:
    lat = r["latency_ms"]
    return (f"| {name} | {r['requests']} | {r['ok']} | {r['wrong']} | {sum(r['errors'].values())} | "
            f"{r['lost_in_flight']} | {r['throughput_rps']:.2f} | {lat.get('p50', float('nan')):.1f} | "
            f"{lat.get('p99', float('nan')):.1f} |")  # fmt: skip


def markdown(res: dict) -> str:
    lines = [
        "# Policy server load: one process vs Ray Serve replicas",
        "",
        f"Bundle `{res['bundle']}`; {res['clients']} openpi clients x {res['seconds']:g} s on 127.0.0.1 per run; "
        f"each request checked against NoraPolicy.predict_action_chunk (prompt {res['prompt']!r}).",
        "",
        "| run | requests | ok | wrong | errors | lost in flight | ok/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if res.get("single"):
        lines.append(_row("single process", res["single"]))
    if res.get("ray"):
        lines.append(_row(f"Ray Serve x{res['ray']['replicas']}", res["ray"]))
    lines.append("")
    for run in ("single", "ray"):
        r = res.get(run)
        if r and r["errors"]:
            lines.append(f"- {run}: errors by type {r['errors']}; failed connects {r['connect_errors']}")
    m = (res.get("ray") or {}).get("marks", {}).get("replica_killed")
    if m:
        first = "none" if m["first_ok_after_s"] is None else f"{m['first_ok_after_s']:.2f} s after it"
        lines.append(
            f"- replica `{res['ray']['kill']['replica']}` killed at t={m['t']:.1f} s: {m['in_flight']} requests in "
            f"flight, {m['in_flight_failed']} of them lost; {m['failed_after']} later requests failed; first ok "
            f"reply {first}; {m['clients_ok_after']}/{res['clients']} clients got ok replies afterwards; "
            f"replica replaced: {'yes' if m['replaced'] else 'no'} (now {res['ray']['replicas_after']})"
        )
    lines += ["", "## Acceptance", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in res["acceptance"].items()]
    return "\n".join(lines) + "\n"


def run(bundle: Path, out: Path, clients: int, seconds: float, replicas: int, kill_at: float | None,
        port: int, server_cmd: str, which: tuple[str, ...] = ("single", "ray")) -> dict:  # fmt: skip
    """Both runs and the combined report; returns it (with "paths")."""
    bundle = Path(bundle).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = lt.LoadConfig(clients=clients, seconds=seconds)
    image, prompt, expected = lt.reference_actions(bundle, lt.default_candidates())
    obs = {"image": image, "prompt": prompt}  # ServeConfig's default keys (both servers run with them)
    res: dict = {"bundle": str(bundle), "clients": clients, "seconds": seconds, "prompt": prompt}
    if "single" in which:
        (out / "single").mkdir(exist_ok=True)
        res["single"] = run_single(bundle, obs, expected, cfg, port, out / "single", server_cmd)
    if "ray" in which:
        (out / "ray").mkdir(exist_ok=True)
        res["ray"] = run_ray(bundle, obs, expected, cfg, port + 1, out / "ray", replicas, kill_at)
    res["acceptance"] = acceptance(res.get("single"), res.get("ray"), clients)
    res["paths"] = {"json": str(out / "report.json"), "markdown": str(out / "report.md")}
    write_json_atomic(out / "report.json", res)
    write_text_atomic(out / "report.md", markdown(res))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="serve_load", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--out", type=Path, default=Path("out/serve-load"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of the run; negative: no kill")
    ap.add_argument("--port", type=int, default=8770, help="single server's port; Ray Serve uses port + 1")
    ap.add_argument("--server-cmd", default=SERVER_CMD, help="single-server command ({exe} {bundle} {port})")
    ap.add_argument("--only", choices=("single", "ray"), default=None)
    a = ap.parse_args(argv)
    try:
        res = run(a.bundle, a.out, a.clients, a.seconds, a.replicas, a.kill_at if a.kill_at >= 0 else None,
                  a.port, a.server_cmd, (a.only,) if a.only else ("single", "ray"))  # fmt: skip
    except (NoraEdgeError, InputError) as e:
        print(f"serve_load: {e}", file=sys.stderr)
        return 2
    print(markdown(res))
    print(f"report: {res['paths']['markdown']}")
    return 0 if all(res["acceptance"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
