"""NoraPolicy shared by several threads, its lifetime (close / with), thread options and the lazy import."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter

import numpy as np
import pytest

from nora_edge.errors import InputError
from nora_edge.policy import NoraPolicy

from .test_policy import observations

THREADS = 8
CALLS = 50


def run_threads(target, n: int) -> list:
    """Run ``target(i)`` in ``n`` threads started together; re-raise the first exception."""
    results: list = [None] * n
    errors: list = []
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i)
        except BaseException as e:  # noqa: BLE001 - re-raised below in the main thread
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    if errors:
        raise errors[0]
    assert not any(w.is_alive() for w in workers), "a worker thread hung"
    return results


def test_threads_give_the_sequential_results(rt_bundle_action):
    """8 threads x 50 predict_action_chunk on one policy == the same calls made one after another."""
    obs = observations(THREADS, seed=21)
    policy = NoraPolicy.load(rt_bundle_action, providers="cpu", threads=1, forced_tokens="flag")
    expected = [policy.run_chunk(image, text) for image, text in obs]  # sequential, one per observation

    def calls(i: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        got = []
        for k in range(CALLS):
            j = (i + k) % len(obs)  # threads interleave different observations
            got.append((j, policy.predict_action_chunk(*obs[j]), policy.last_output))
        return got

    results = run_threads(calls, THREADS)
    compared = 0
    for per_thread in results:
        for j, actions, _ in per_thread:
            np.testing.assert_array_equal(actions, expected[j].actions)
            compared += 1
    assert compared == THREADS * CALLS


def test_select_action_hands_out_every_queued_row_once(rt_bundle_h5):
    """8 threads x 25 select_action on one NORA-Long policy (T=5): 200 rows from exactly 40 chunks, every row of
    every chunk handed out exactly once."""
    policy = NoraPolicy.load(rt_bundle_h5, providers="cpu", threads=1, forced_tokens="flag")
    image, text = observations(1, seed=22)[0]
    chunk = policy.predict_action_chunk(image, text)  # deterministic: every refill queues these rows
    policy.reset()
    chunks = []  # spy on the vision graph: one run per predicted chunk
    vision_run = policy.vision.run
    policy.vision.run = lambda *a, **k: chunks.append(1) or vision_run(*a, **k)
    handed: list[np.ndarray] = []
    lock = threading.Lock()

    def calls(i: int) -> None:
        for _ in range(25):
            row = policy.select_action(image, text)
            with lock:
                handed.append(row)

    run_threads(calls, THREADS)
    assert len(handed) == THREADS * 25 == 200
    assert len(chunks) == 40, f"{len(chunks)} chunks predicted for 200 rows of T=5"
    assert len({id(r) for r in handed}) == 200  # no row object handed out twice
    # 40 refills of the same chunk: the handed-out rows are exactly 40 copies of the chunk's rows
    want = Counter({k: 40 * v for k, v in Counter(tuple(r) for r in chunk.tolist()).items()})
    assert Counter(tuple(r) for r in np.stack(handed).tolist()) == want
    assert len(policy._queue) == 0


def test_close_and_context_manager(rt_bundle_action):
    image, text = observations(1, seed=23)[0]
    with NoraPolicy.load(rt_bundle_action, providers="cpu", threads=1, forced_tokens="flag") as policy:
        assert policy.predict_action_chunk(image, text).shape == (1, 7)
    with pytest.raises(InputError, match="closed"):
        policy.predict_action_chunk(image, text)
    with pytest.raises(InputError, match="closed"):
        policy.select_action(image, text)
    policy.close()  # idempotent


def test_unconstrained_action_head_is_refused(rt_bundle_action):
    with pytest.raises(InputError, match="head='full'.*not HF greedy parity"):
        NoraPolicy.load(rt_bundle_action, providers="cpu", constrained=False)


def test_spinning_and_shared_pool_options(rt_bundle_action):
    """Spinning is off unless asked for; the process-wide pool is opt-in (checked in a fresh process, since
    it can be created once per process)."""
    from nora_edge.sessions import session_options

    off = session_options(1)
    on = session_options(1, spinning=True)
    key = "session.intra_op.allow_spinning"
    assert off.get_session_config_entry(key) == "0" and on.get_session_config_entry(key) == "1"
    with pytest.raises(InputError, match="spinning must be a bool"):
        session_options(1, spinning="yes")
    code = (
        "import numpy as np\n"
        "from nora_edge.policy import NoraPolicy\n"
        "from nora_edge.errors import InputError\n"
        "from nora_edge.export.images import random_rgb_image\n"
        f"p = NoraPolicy.load({str(rt_bundle_action)!r}, providers='cpu', threads=1, shared_pool=True,"
        " forced_tokens='flag')\n"
        "a = p.predict_action_chunk(random_rgb_image(0, 224, 224), 'pick up the cup')\n"
        "assert p.vision.session.get_session_options().use_per_session_threads is False\n"
        "try:\n"
        f"    NoraPolicy.load({str(rt_bundle_action)!r}, providers='cpu', threads=2, shared_pool=True)\n"
        "    raise SystemExit('a second pool size was accepted')\n"
        "except InputError as e:\n"
        "    assert 'shared thread pool already has threads=1' in str(e), e\n"
        "print(a.shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("(1, 7)")


def test_import_nora_edge_does_not_import_onnxruntime():
    code = (
        "import sys\n"
        "import nora_edge\n"
        "assert 'onnxruntime' not in sys.modules, 'import nora_edge pulled in onnxruntime'\n"
        "from nora_edge import NoraPolicy, ChunkOutput\n"
        "assert NoraPolicy.__module__ == 'nora_edge.policy' and 'onnxruntime' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
