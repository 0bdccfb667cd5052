"""AsyncChunkPolicy on a real NoraPolicy (the tiny horizon-5 bundle), with injected slow inference: every action
handed out is the action the policy computes for the frame its chunk was submitted with; a chunk older than
max_age_s is never handed out (StaleChunkError); a task change drops the queue; background errors keep their type."""

from __future__ import annotations

import time

import numpy as np
import pytest

from nora_edge.async_chunks import AsyncChunkPolicy, AsyncConfig, StaleChunkError
from nora_edge.errors import DetokenizationError, InputError
from nora_edge.policy import NoraPolicy

TEXT = "pick up the black bowl"


class Slow:
    """The wrapped policy with an injected delay before each prediction (and an optional failure)."""

    def __init__(self, policy, delay_s: float, fail_on_call: int | None = None) -> None:
        self.policy, self.delay_s, self.fail_on_call, self.calls = policy, delay_s, fail_on_call, 0

    def predict_action_chunk(self, image, instruction, unnorm_key=None):
        self.calls += 1
        time.sleep(self.delay_s)
        if self.calls == self.fail_on_call:
            raise DetokenizationError(f"injected failure on call {self.calls}")
        return self.policy.predict_action_chunk(image, instruction, unnorm_key)


@pytest.fixture(scope="module")
def policy(tiny_bundle_h5):
    return NoraPolicy.load(tiny_bundle_h5, threads=1, forced_tokens="flag")


@pytest.fixture(scope="module")
def frames(make_rgb_image):
    return [make_rgb_image(seed=100 + i, height=120, width=160) for i in range(16)]


def test_actions_are_the_chunks_of_the_submitted_frames(policy, frames):
    T = policy.time_horizon
    assert T == 5
    with AsyncChunkPolicy(Slow(policy, 0.02), AsyncConfig(refill_below=2, max_age_s=30.0)) as ap:
        got = [ap.select_action(frames[i], TEXT) for i in range(16)]
    # the schedule restated: a tick with an empty queue takes the submitted chunk (or predicts its own frame);
    # a tick leaving <= refill_below actions queued submits its own frame when nothing is in flight
    queue, job, expected, chunk_index, chunks = [], None, [], -1, set()
    for i in range(16):
        if not queue:
            source, job = (job if job is not None else i), None
            chunk = policy.predict_action_chunk(frames[source], TEXT)
            queue, chunk_index = list(chunk), chunk_index + 1
            chunks.add(chunk.tobytes())
        expected.append((queue.pop(0), chunk_index))
        if len(queue) <= 2 and job is None:
            job = i
    compared = 0
    for i, (g, (want, chunk_index)) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_array_equal(g.action, want, err_msg=f"tick {i}")
        assert g.chunk == chunk_index and g.age_s >= 0, (i, g.chunk, chunk_index)
        compared += 1
    assert (
        compared == 16 and len(chunks) == chunk_index + 1 == 4
    )  # the frames' chunks differ: a wrong source fails
    assert [g.waited for g in got].count(True) == 1  # only the first tick ran the model itself


def test_a_chunk_older_than_the_limit_is_never_handed_out(policy, frames):
    """Inference 0.2 s, limit 0.6 s, a robot ticking every 0.3 s: the background chunk (submitted at tick 2) is
    collected at tick 5, 0.9 s after its frame: refused; the next tick predicts afresh."""
    ap = AsyncChunkPolicy(Slow(policy, 0.2), AsyncConfig(refill_below=2, max_age_s=0.6))
    out = []
    for i in range(5):
        out.append(ap.select_action(frames[i], TEXT))
        time.sleep(0.3)
    assert all(a.chunk == 0 for a in out) and out[0].age_s < 0.6
    with pytest.raises(StaleChunkError, match="max_age_s 0.6") as e:
        ap.select_action(frames[5], TEXT)
    assert e.value.age_s > 0.6 and e.value.max_age_s == 0.6
    fresh = ap.select_action(frames[6], TEXT)
    assert fresh.waited and fresh.chunk == 1
    np.testing.assert_array_equal(fresh.action, policy.predict_action_chunk(frames[6], TEXT)[0])
    ap.close()


def test_a_blocking_prediction_slower_than_the_limit_is_refused(policy, frames):
    ap = AsyncChunkPolicy(Slow(policy, 0.3), AsyncConfig(max_age_s=0.1))
    with pytest.raises(StaleChunkError):
        ap.select_action(frames[0], TEXT)
    ap.close()


def test_a_task_change_drops_the_queue_and_the_chunk_in_flight(policy, frames):
    ap = AsyncChunkPolicy(Slow(policy, 0.01), AsyncConfig(refill_below=2, max_age_s=30.0))
    for i in range(3):
        ap.select_action(frames[i], TEXT)  # the third submits frame 2 for TEXT
    other = "open the drawer"
    a = ap.select_action(frames[3], other)
    assert a.waited
    np.testing.assert_array_equal(a.action, policy.predict_action_chunk(frames[3], other)[0])
    ap.reset()
    b = ap.select_action(frames[4], other)
    assert b.waited
    np.testing.assert_array_equal(b.action, policy.predict_action_chunk(frames[4], other)[0])
    ap.close()


def test_a_background_error_is_raised_with_its_type(policy, frames):
    ap = AsyncChunkPolicy(Slow(policy, 0.0, fail_on_call=2), AsyncConfig(refill_below=2, max_age_s=30.0))
    for i in range(5):
        ap.select_action(frames[i], TEXT)
    with pytest.raises(DetokenizationError, match="injected failure on call 2"):
        ap.select_action(frames[5], TEXT)
    assert ap.select_action(frames[6], TEXT).waited  # usable afterwards
    ap.close()
    with pytest.raises(InputError, match="closed"):
        ap.select_action(frames[7], TEXT)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"refill_below": -1}, "refill_below"), ({"refill_below": 1.5}, "refill_below"),
     ({"max_age_s": 0}, "max_age_s"), ({"max_age_s": float("nan")}, "max_age_s")],
)  # fmt: skip
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(InputError, match=field):
        AsyncConfig(**kwargs)
