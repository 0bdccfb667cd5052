"""Asynchronous chunks: predict the next chunk in the background while the robot executes the current one.

Data flow (one control tick, :meth:`AsyncChunkPolicy.select_action`):
  frame + instruction --(queue empty and nothing ready)--> predict now, blocking (the first tick, after a reset,
  after a dropped or stale chunk) --> queue of T actions stamped with the frame's capture time
  --(queue at or below ``refill_below`` actions and no prediction in flight)--> the current frame goes to the
  background worker (one thread, one prediction at a time) --> when the queue runs out, the finished chunk becomes
  the queue if its observation is at most ``max_age_s`` old; otherwise :class:`StaleChunkError` (the chunk is
  dropped, the next tick predicts afresh; a blocking prediction slower than ``max_age_s`` is refused the same way) --> :class:`TimedAction` (the action, its chunk's observation age, the
  chunk index, whether this tick waited for the model).

The age is measured from the moment the frame was handed to ``select_action`` (its capture time when the caller
passes ``captured_at``) to the moment the chunk's first action is handed out; a chunk computed from an old frame
is never executed silently. A changed instruction or unnorm key drops the queue and ignores the chunk in flight.
An error raised by a background prediction is raised, with its own type, by the tick that would have used it.

The wrapped policy is any object with ``predict_action_chunk(image, instruction, unnorm_key) -> (T, D)``
(``NoraPolicy``, ``EdgePolicy``-like wrappers); ``NoraPolicy`` is thread-safe, so the caller may keep using it.
This is the "asynchronous inference" pattern of LeRobot's async client (lerobot ``async_inference``) reduced to one
process and one worker.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from nora_edge.errors import InputError, NoraEdgeError


class StaleChunkError(NoraEdgeError):
    """A chunk finished in the background was computed from an observation older than ``max_age_s``.

    Attributes:
        age_s: the observation's age when the chunk would have been handed out.
        max_age_s: the limit.
    """

    def __init__(self, message: str, *, age_s: float, max_age_s: float) -> None:
        super().__init__(message)
        self.age_s = age_s
        self.max_age_s = max_age_s


@dataclass(frozen=True)
class AsyncConfig:
    """Settings of :class:`AsyncChunkPolicy`.

    Attributes:
        refill_below: start the next prediction when at most this many actions are left in the queue (>= 0).
        max_age_s: the oldest observation a handed-out chunk may come from, seconds (> 0).
    """

    refill_below: int = 2
    max_age_s: float = 0.5

    def __post_init__(self) -> None:
        r = self.refill_below
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise InputError(f"refill_below must be an int >= 0, got {r!r}")
        m = self.max_age_s
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0 or m != m:
            raise InputError(f"max_age_s must be a number > 0, got {m!r}")


@dataclass(frozen=True)
class TimedAction:
    """One tick's action.

    Attributes:
        action: (D,) float64.
        age_s: age of the observation its chunk was computed from, at this tick (at most ``max_age_s`` when the
            chunk's first action was handed out; later actions of the chunk are older by the ticks in between).
        chunk: index of the chunk it belongs to (0, 1, ...; counts every chunk handed out).
        waited: True when this tick ran the model itself (nothing was ready).
    """

    action: np.ndarray
    age_s: float
    chunk: int
    waited: bool


@dataclass
class _Job:
    future: Future
    key: tuple
    captured_at: float


class AsyncChunkPolicy:
    """Wrap a policy so the next chunk is predicted while the current one executes (module docstring).

    Args:
        policy: object with ``predict_action_chunk(image, instruction, unnorm_key) -> (T, D)``.
        config: :class:`AsyncConfig`.
        clock: monotonic seconds (default ``time.monotonic``).
    """

    def __init__(
        self, policy, config: AsyncConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not callable(getattr(policy, "predict_action_chunk", None)):
            raise InputError(f"policy must have predict_action_chunk(), got {type(policy).__name__}")
        self.policy = policy
        self.config = config or AsyncConfig()
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nora-async-chunk")
        self._lock = threading.Lock()
        self._queue: deque[np.ndarray] = deque()
        self._queue_obs = 0.0  # capture time of the queue's chunk
        self._key: tuple | None = None
        self._job: _Job | None = None
        self._chunks = 0
        self._closed = False

    def _predict(self, image: np.ndarray, key: tuple) -> np.ndarray:
        chunk = np.asarray(self.policy.predict_action_chunk(image, key[0], key[1]), dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] < 1:
            raise InputError(f"policy returned a chunk of shape {chunk.shape}, expected (T, D)")
        return chunk

    def _take(self, chunk: np.ndarray, captured_at: float, now: float) -> None:
        age = now - captured_at
        if age > self.config.max_age_s:
            raise StaleChunkError(
                f"the chunk came from an observation {age:.3f} s old (max_age_s {self.config.max_age_s}); "
                "dropped, the next tick predicts from its own frame",
                age_s=age,
                max_age_s=self.config.max_age_s,
            )
        self._queue = deque(np.array(row) for row in chunk)
        self._queue_obs = captured_at
        self._chunks += 1

    def select_action(
        self,
        image: np.ndarray,
        instruction: str,
        unnorm_key: str | None = None,
        captured_at: float | None = None,
    ) -> TimedAction:
        """The next action; starts or collects background predictions (module docstring).

        Args:
            image: (H, W, 3) uint8 frame of this tick.
            instruction / unnorm_key: as the wrapped policy takes them.
            captured_at: the frame's capture time on ``clock`` (default: now).

        Raises:
            StaleChunkError: the finished background chunk's observation is older than ``max_age_s``.
            Whatever the wrapped policy raises (from this tick's prediction or the background one it collects).
        """
        with self._lock:
            if self._closed:
                raise InputError("this AsyncChunkPolicy was closed")
            now = self._clock()
            t_obs = now if captured_at is None else float(captured_at)
            key = (instruction, unnorm_key)
            if key != self._key:  # new task: nothing computed for the old one may be executed
                self._queue.clear()
                self._job = None
                self._key = key
            waited = False
            if not self._queue:
                job, self._job = self._job, None
                if job is not None and job.key == key:
                    chunk = job.future.result()  # waits if still running; re-raises its error
                    self._take(chunk, job.captured_at, self._clock())
                else:
                    chunk = self._predict(image, key)
                    waited = True
                    self._take(chunk, t_obs, self._clock())
            action = self._queue.popleft()
            if len(self._queue) <= self.config.refill_below and self._job is None:
                frame = np.array(image, copy=True)  # the caller may reuse its buffer
                self._job = _Job(self._pool.submit(self._predict, frame, key), key, t_obs)
            return TimedAction(action, self._clock() - self._queue_obs, self._chunks - 1, waited)

    def reset(self) -> None:
        """Drop the queue and ignore the prediction in flight (episode start)."""
        with self._lock:
            self._queue.clear()
            self._job = None
            self._key = None

    def close(self) -> None:
        """Stop the worker (waits for a prediction in flight); idempotent."""
        with self._lock:
            self._closed = True
            self._job = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> AsyncChunkPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
