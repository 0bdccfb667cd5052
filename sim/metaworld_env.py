"""MetaWorld tasks as the policy sees them: one RGB frame from a fixed camera, a language instruction, 4-D actions.

Data flow: task name --:func:`make_env`--> :class:`SimEnv` (one MuJoCo env + one offscreen GL context, kept alive
for the life of the process) --``reset(seed)``--> fresh, reproducible object/goal positions (not MetaWorld MT1's
50 fixed goals) --``frame()``--> (H, W, 3) uint8 RGB from the ``corner`` camera, rotated 180 degrees
--``step(action)``--> success flag; ``expert_action()`` is MetaWorld's own scripted policy for the task.

Sources: MetaWorld 3.1 (Farama-Foundation/Metaworld): ``metaworld/env_dict.py`` (``ALL_V3_ENVIRONMENTS``; the
MT1 wrapper freezes ``_last_rand_vec`` to one of 50 goals, we unfreeze it and seed the env instead),
``metaworld/policies/*`` (scripted experts), ``metaworld/sawyer_xyz_env.py`` (action: xyz delta + gripper
effort in [-1, 1], +1 closes; ``info["success"]``; ``max_path_length`` 500). Rendering: MuJoCo's
``mjRND_SHADOW`` / ``mjRND_REFLECTION`` scene flags and ``model.vis.quality.offsamples`` (MuJoCo XML
reference, ``visual/quality``) cut a 224x224 frame from ~55-100 ms to ~8.5 ms on a CPU (osmesa) with nearly
identical images. The ``corner`` camera's image comes out upside down: ``img[::-1, ::-1]``.

GL pitfall: when one rendering env is garbage-collected while another's GL context is current, the other renders
black frames from then on. :func:`make_env` therefore caches one env per (task, camera, size) per process and
never frees it; :meth:`SimEnv.frame` refuses an all-black frame with :class:`SimError`.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import numpy as np

from nora_edge.errors import InputError, NoraEdgeError

# task -> instruction. Tasks whose scripted expert succeeds on >= 95% of fresh seeded resets within ~100 steps
# (measured here with metaworld 3.1.1: button-press-topdown, drawer-close, drawer-open, door-open,
# window-open, handle-press 5/5 each; reach, push, pick-place 0/5 under fresh goals within 200 steps).
TASKS: dict[str, str] = {
    "button-press-topdown-v3": "press the button from the top",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "door-open-v3": "open the door",
    "window-open-v3": "slide the window open",
    "handle-press-v3": "press the handle down",
}
ACTION_DIM = 4  # dx, dy, dz, gripper effort (+1 closes)
CAMERA = "corner"
FRAME_SIZE = 224  # NORA resizes every frame to 224x224; render at that size so no resize is needed
MAX_STEPS = 150  # experts finish these tasks in 26-95 steps; 150 leaves room for a slower policy
GL_BACKENDS = ("osmesa", "egl", "glfw")


class SimError(NoraEdgeError):
    """The simulator could not be set up or produced an unusable frame."""


def configure_gl() -> str:
    """Pick the offscreen GL backend before mujoco is imported: ``MUJOCO_GL`` if set, else osmesa.

    ``PYOPENGL_PLATFORM`` must agree with ``MUJOCO_GL`` (PyOpenGL reads it at import).

    Returns:
        the backend name.

    Raises:
        SimError: ``MUJOCO_GL`` names an unknown backend.
    """
    backend = os.environ.setdefault("MUJOCO_GL", "osmesa")
    if backend not in GL_BACKENDS:
        raise SimError(f"MUJOCO_GL={backend!r} is not one of {GL_BACKENDS}")
    if backend != "glfw":
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


def check_task(task: str) -> str:
    """``task`` if it is one of :data:`TASKS`, else InputError naming the choices."""
    if task not in TASKS:
        raise InputError(f"unknown MetaWorld task {task!r}; choose from {sorted(TASKS)}")
    return task


def expert_class(task: str) -> type:
    """MetaWorld's scripted policy class for ``task`` (``drawer-close-v3`` -> ``SawyerDrawerCloseV3Policy``)."""
    from metaworld import policies

    name = "Sawyer" + "".join(p.capitalize() for p in task.removesuffix("-v3").split("-")) + "V3Policy"
    cls = dict(inspect.getmembers(policies, inspect.isclass)).get(name)
    if cls is None:
        raise SimError(f"metaworld.policies has no {name} for task {task!r}")
    return cls


@dataclass
class StepResult:
    """What one env step returned (success is MetaWorld's ``info["success"]``)."""

    success: bool
    reward: float
    truncated: bool


class SimEnv:
    """One MetaWorld task with fresh seeded goals, a fast offscreen renderer and the task's scripted expert.

    Use :func:`make_env` (it caches envs per process; see the GL pitfall in the module doc).
    """

    def __init__(self, task: str, camera: str = CAMERA, size: int = FRAME_SIZE) -> None:
        configure_gl()
        check_task(task)
        try:
            import mujoco
            from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        except ImportError as err:  # pragma: no cover - depends on the machine
            raise SimError(
                "MetaWorld is not installed: pip install 'metaworld>=3.1,<3.2' packaging "
                "(and apt-get install libosmesa6 for CPU rendering); `make setup` does both"
            ) from err
        self.task, self.camera, self.size = task, camera, size
        self.instruction = TASKS[task]
        env = ALL_V3_ENVIRONMENTS[task](render_mode="rgb_array", camera_name=camera, width=size, height=size)
        env._partially_observable = False  # the expert reads the goal from the state; the policy never does
        env._freeze_rand_vec = False  # fresh object/goal positions on every reset (MT1 freezes 50 of them)
        env.seeded_rand_vec = True  # draw them from env.seed()'s generator, not numpy's global one
        env._set_task_called = True
        env.max_path_length = 10_000  # we stop episodes ourselves (MAX_STEPS); MetaWorld's 500 would truncate
        env.model.vis.quality.offsamples = 0
        viewer = env.mujoco_renderer._get_viewer("rgb_array")
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self.env = env
        self.expert = expert_class(task)()
        self._obs: np.ndarray | None = None
        self.steps = 0

    def reset(self, seed: int) -> np.ndarray:
        """Start an episode with object/goal positions drawn from ``seed``; returns the first frame."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"episode seed must be a non-negative int, got {seed!r}")
        self.env.seed(int(seed))
        self._obs, _ = self.env.reset()
        self.steps = 0
        return self.frame()

    def frame(self) -> np.ndarray:
        """(size, size, 3) uint8 RGB of the current state, upright.

        Raises:
            SimError: the renderer returned an all-black frame (lost GL context).
        """
        img = np.ascontiguousarray(self.env.render()[::-1, ::-1])
        if not img.any():
            raise SimError(f"{self.task}: the renderer returned a black frame (GL context lost?)")
        return img

    def expert_action(self) -> np.ndarray:
        """(4,) float64 action of MetaWorld's scripted expert for the current state, clipped to [-1, 1]."""
        if self._obs is None:
            raise SimError("expert_action() before reset()")
        return np.clip(np.asarray(self.expert.get_action(self._obs), dtype=np.float64), -1.0, 1.0)

    def step(self, action: np.ndarray) -> StepResult:
        """Apply one (4,) action; returns success/reward.

        Raises:
            InputError: the action is not (4,) finite numbers.
        """
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (ACTION_DIM,) or not np.isfinite(a).all():
            raise InputError(f"MetaWorld action must be ({ACTION_DIM},) finite numbers, got {a!r}")
        if self._obs is None:
            raise SimError("step() before reset()")
        self._obs, reward, _, truncated, info = self.env.step(np.clip(a, -1.0, 1.0).astype(np.float32))
        self.steps += 1
        return StepResult(bool(info["success"] > 0), float(reward), bool(truncated))


_ENVS: dict[tuple[str, str, int], SimEnv] = {}


def make_env(task: str, camera: str = CAMERA, size: int = FRAME_SIZE) -> SimEnv:
    """The process's :class:`SimEnv` for (task, camera, size), created once and kept alive (GL pitfall)."""
    key = (check_task(task), camera, size)
    if key not in _ENVS:
        _ENVS[key] = SimEnv(task, camera, size)
    return _ENVS[key]
