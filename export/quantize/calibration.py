"""Calibration data: (image, instruction) samples -> the feeds each bundle graph sees at inference.

Data flow: a folder (images + ``instructions.jsonl``, one ``{"image": "<file>", "instruction": "<text>"}``
per line) or :func:`synthetic_samples` (seeded, structured frames: gradients, boxes, discs, noise)
-> :class:`CalibrationSample` list -> :func:`record_feeds`: the fp32 bundle runs in :class:`NoraPolicy`
with recording sessions -> per graph the exact input dicts it was run with: ``vision`` (pixel_values, plus
index tensors for a dynamic graph) and ``decoder`` (the prompt prefill with the cached prefix KV, and decode
steps with their growing KV; for a static-KV decoder, whose K/V buffers are IO-bound and updated in place, the
buffers' contents as each step reads them), i.e. decoder inputs come from running the fp32 graphs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nora_edge import names
from nora_edge.errors import InputError

from .progress import progress_iter

INSTRUCTIONS_FILE = "instructions.jsonl"
_OBJECTS = ("red block", "blue cup", "green bowl", "yellow sponge", "black marker", "white plate", "drawer")
_VERBS = (
    "pick up the {}",
    "push the {} to the left",
    "put the {} in the bin",
    "open the {}",
    "move the {} up",
)


@dataclass(frozen=True)
class CalibrationSample:
    """One observation: image (H, W, 3) uint8 RGB and the instruction."""

    image: np.ndarray
    instruction: str


def load_calibration_dir(path: str | os.PathLike[str]) -> list[CalibrationSample]:
    """Read ``instructions.jsonl`` and the images it names (relative to ``path``).

    Raises:
        InputError: missing file, a malformed line (file and line number named), an unreadable image.
    """
    from nora_edge.image_io import load_image

    root = Path(path)
    index = root / INSTRUCTIONS_FILE
    if not index.is_file():
        raise InputError(f"calibration folder {root}: missing {INSTRUCTIONS_FILE}")
    samples = []
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{index}:{n}: not valid JSON ({e})") from e
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise InputError(f"{index}:{n}: expected an object with a string 'image'")
        text = entry.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{index}:{n}: 'instruction' must be a non-empty string, got {text!r}")
        samples.append(CalibrationSample(load_image(root / entry["image"]), text))
    if not samples:
        raise InputError(f"{index}: no samples")
    return samples


def synthetic_frame(rng: np.random.Generator, size: int = names.IMAGE_SIZE) -> np.ndarray:
    """A structured random frame: a lit gradient 'table', a few boxes and discs, sensor noise. (size, size, 3)."""
    yy, xx = np.mgrid[0:size, 0:size] / size  # (S, S)
    base = rng.uniform(40, 200, 3)
    tilt = rng.uniform(-60, 60, (2, 3))
    img = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]  # (S, S, 3)
    for _ in range(rng.integers(2, 6)):
        color = rng.uniform(0, 255, 3)
        cy, cx = rng.uniform(0.1, 0.9, 2)
        h, w = rng.uniform(0.05, 0.3, 2)
        if rng.random() < 0.5:
            mask = (np.abs(yy - cy) < h / 2) & (np.abs(xx - cx) < w / 2)
        else:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (h / 2) ** 2
        img[mask] = 0.3 * img[mask] + 0.7 * color
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def synthetic_samples(n: int, seed: int = 0, size: int = names.IMAGE_SIZE) -> list[CalibrationSample]:
    """``n`` deterministic (frame, instruction) samples for a seed.

    Raises:
        InputError: ``n`` < 1.
    """
    if not isinstance(n, int) or n < 1:
        raise InputError(f"synthetic_samples: n must be a positive int, got {n!r}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        verb = _VERBS[rng.integers(len(_VERBS))]
        obj = _OBJECTS[rng.integers(len(_OBJECTS))]
        out.append(CalibrationSample(synthetic_frame(rng, size), verb.format(obj)))
    return out


def _to_numpy(value) -> np.ndarray:
    return np.array(value.numpy() if hasattr(value, "numpy") else value, copy=True)


class RecordingSession:
    """Wraps a runtime GraphSession: every ``run`` stores a copy of its feeds (and chosen outputs).

    Runs that bypass ``run`` and drive the onnxruntime session through IO binding (the static-KV decoder,
    ``nora_edge.static_kv.StaticDecoder.forward``, whose K/V buffers are bound as inputs and as outputs, i.e.
    updated in place) are recorded too: ``session`` hands out :class:`_RecordingOrtSession`, which copies every
    bound input just before the run (the buffers' contents as the graph reads them) and the chosen outputs
    after it.
    """

    def __init__(self, inner, record_outputs: Sequence[str] = ()) -> None:
        self.inner = inner
        self.name = inner.name
        self.input_names = inner.input_names
        self.output_names = inner.output_names
        self.record_outputs = tuple(record_outputs)
        self.feeds: list[dict[str, np.ndarray]] = []
        self.outputs: list[dict[str, np.ndarray]] = []
        self.record_feeds = True

    def __getattr__(self, name: str):
        # anything else the runtime reads from a session (providers, ...) is the wrapped session's
        return getattr(self.__dict__["inner"], name)

    @property
    def session(self) -> _RecordingOrtSession:
        """The wrapped onnxruntime session, recording IO-bound runs into this recorder."""
        return _RecordingOrtSession(self.inner.session, self)

    def run(self, feeds, fetch=None, keep=frozenset()):
        out = self.inner.run(feeds, fetch, keep)
        self._record(feeds, out)
        return out

    def _record(self, feeds: dict, out: dict) -> None:
        if self.record_feeds:
            self.feeds.append({k: _to_numpy(v) for k, v in feeds.items()})
        if self.record_outputs:
            self.outputs.append({k: _to_numpy(out[k]) for k in self.record_outputs if k in out})


class _RecordingBinding:
    """An onnxruntime IOBinding that remembers what was bound (input values, output names in bind order)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.inputs: dict[str, object] = {}  # name -> numpy array or OrtValue, read at run time
        self.output_names: list[str] = []

    def bind_cpu_input(self, name: str, value) -> None:
        self.inputs[name] = value
        self.inner.bind_cpu_input(name, value)

    def bind_ortvalue_input(self, name: str, value) -> None:
        self.inputs[name] = value
        self.inner.bind_ortvalue_input(name, value)

    def bind_output(self, name: str, *args, **kwargs) -> None:
        self.output_names.append(name)
        self.inner.bind_output(name, *args, **kwargs)

    def bind_ortvalue_output(self, name: str, value) -> None:
        self.output_names.append(name)
        self.inner.bind_ortvalue_output(name, value)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)  # get_outputs, clear_binding_*, ...


class _RecordingOrtSession:
    """An ``ort.InferenceSession`` stand-in whose ``io_binding`` runs land in a :class:`RecordingSession`."""

    def __init__(self, inner, recorder: RecordingSession) -> None:
        self.inner = inner
        self.recorder = recorder

    def io_binding(self) -> _RecordingBinding:
        return _RecordingBinding(self.inner.io_binding())

    def run_with_iobinding(self, binding, *args, **kwargs):
        if not isinstance(binding, _RecordingBinding):
            return self.inner.run_with_iobinding(binding, *args, **kwargs)
        feeds = {k: _to_numpy(v) for k, v in binding.inputs.items()}  # before the run: in-place K/V
        result = self.inner.run_with_iobinding(binding.inner, *args, **kwargs)
        wanted = set(self.recorder.record_outputs)
        values = binding.inner.get_outputs() if wanted else []
        out = {n: v for n, v in zip(binding.output_names, values, strict=False) if n in wanted}
        self.recorder._record(feeds, out)
        return result

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)  # get_inputs, get_providers, ...


def attach_recorders(policy, record_outputs: Sequence[str] = ()) -> tuple[RecordingSession, RecordingSession]:
    """Swap a NoraPolicy's vision session and decoder session for recorders; returns (vision, decoder)."""
    vision = RecordingSession(policy.vision)
    decoder = RecordingSession(policy.decoder.session, record_outputs)
    policy.vision = vision
    policy.decoder.session = decoder
    return vision, decoder


def thin(feeds: list[dict], limit: int) -> list[dict]:
    """At most ``limit`` feeds, evenly spaced, first and last kept."""
    if len(feeds) <= limit:
        return feeds
    keep = np.unique(np.linspace(0, len(feeds) - 1, limit).round().astype(int))
    return [feeds[i] for i in keep]


def record_feeds(
    bundle_path: str | os.PathLike[str],
    samples: Iterable[CalibrationSample],
    *,
    max_decoder_feeds: int = 64,
    unnorm_key: str | None = None,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run the (fp32) bundle on ``samples`` on CPU and return the feeds of each graph.

    Returns:
        {"vision": [feeds...], "decoder": [feeds...]} (decoder thinned to ``max_decoder_feeds``; every
        prefill is kept, decode steps fill the rest evenly).

    Raises:
        InputError: no samples.
    """
    from nora_edge.policy import NoraPolicy

    samples = list(samples)
    if not samples:
        raise InputError("record_feeds: no calibration samples")
    # "flag": calibration records what the graphs see, including chunks the runtime's default would refuse
    policy = NoraPolicy.load(bundle_path, providers="cpu", verify=False, forced_tokens="flag")
    vision, decoder = attach_recorders(policy)
    if unnorm_key is not None or not policy.bundle.postprocess.takes_unnorm_key:
        key = unnorm_key  # fixed statistics in the chain take no key
    else:
        key = sorted(policy.bundle.norm_stats)[0]
    prefills, steps = [], []
    for s in progress_iter(samples, "calibration: running the fp32 bundle", len(samples)):
        start = len(decoder.feeds)
        policy.run_chunk(s.image, s.instruction, key)
        prefills.append(decoder.feeds[start])
        steps.extend(decoder.feeds[start + 1 :])
    room = max(max_decoder_feeds - len(prefills), 0)
    return {"vision": vision.feeds, "decoder": prefills + (thin(steps, room) if room else [])}
