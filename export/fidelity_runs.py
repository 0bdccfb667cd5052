"""How the fidelity report runs a policy: one :class:`PolicyRun` per (policy, sample).

Data flow: a bundle -> :func:`recording_policy` (CPU NoraPolicy, ``forced_tokens="flag"``, vision and decoder
sessions wrapped in ``RecordingSession`` so the image embeddings and every step's logits are kept) ->
:func:`run_nora` (optionally on given image embeddings through :class:`FixedVision`: the decoder alone) ->
:class:`PolicyRun`. The PyTorch ``ReferencePolicy`` runs through :func:`run_reference` (no logits, no embeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nora_edge.errors import DetokenizationError


@dataclass(frozen=True)
class PolicyRun:
    """One inference as the report sees it.

    Attributes:
        ids: (N,) int64 generated ids.
        step_logits: per generated token the (rows,) logits it was chosen from, or None when unavailable.
        actions: (T, D) float64 robot-unit actions, None when the decode was malformed.
        normalized: (T, D) float64 actions in [-1, 1] space, None when malformed.
        error: why the decode was malformed (None when it decoded).
        classes: one ``nora_edge.generate.TOKEN_CLASSES`` entry per id, None when unknown (PyTorch reference).
        image_embeds: (merged, H) float32 vision output, None when unavailable.
    """

    ids: np.ndarray
    step_logits: list[np.ndarray] | None
    actions: np.ndarray | None
    normalized: np.ndarray | None
    error: str | None
    classes: tuple[str, ...] | None = None
    image_embeds: np.ndarray | None = None


class FixedVision:
    """Stands in for a policy's vision session and returns given image embeddings (decoder-only runs)."""

    def __init__(self, inner, image_embeds: np.ndarray) -> None:
        self.inner = inner
        self.name = inner.name
        self.input_names = inner.input_names
        self.output_names = inner.output_names
        self.image_embeds = np.asarray(image_embeds, np.float32)  # (merged, H)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)  # providers, ...: the replaced session's

    def run(self, feeds, fetch=None, keep=frozenset()):
        from nora_edge import bundle as B

        return {B.IMAGE_EMBEDS: self.image_embeds}


def run_nora(
    policy,
    image: np.ndarray,
    instruction: str,
    unnorm_key: str | None = None,
    *,
    image_embeds: np.ndarray | None = None,
) -> PolicyRun:
    """Run a :func:`recording_policy` once.

    Args:
        image_embeds: (merged, H) embeddings to use instead of the policy's own vision graph (decoder-only).

    A DetokenizationError (unconstrained mode, or non-finite actions) becomes a malformed run; other errors
    propagate.
    """
    from nora_edge import bundle as B

    recorder, vision = policy.decoder.session, policy.vision
    start, v_start = len(recorder.outputs), len(vision.outputs)
    if image_embeds is not None:
        policy.vision = FixedVision(vision, image_embeds)
    try:
        out = policy.run_chunk(image, instruction, unnorm_key)
    except DetokenizationError as e:
        logits = [np.asarray(o[B.LOGITS])[0] for o in recorder.outputs[start:]]
        ids = getattr(e, "ids", None)
        ids = policy.last_ids if ids is None else ids
        classes = getattr(e, "token_classes", None)
        return PolicyRun(
            np.zeros(0, np.int64) if ids is None else np.asarray(ids, np.int64),
            logits,
            None,
            None,
            str(e),
            None if classes is None else tuple(classes),
            _embeds(vision, v_start, image_embeds),
        )
    finally:
        policy.vision = vision
    logits = [np.asarray(o[B.LOGITS])[0] for o in recorder.outputs[start:]]  # (rows,) per step
    return PolicyRun(
        np.asarray(out.ids, np.int64),
        logits[: len(out.ids)],
        out.actions,
        out.normalized,
        None,
        tuple(out.token_classes),
        _embeds(vision, v_start, image_embeds),
    )


def _embeds(vision, start: int, given: np.ndarray | None) -> np.ndarray | None:
    from nora_edge import bundle as B

    if given is not None:
        return np.asarray(given, np.float32)
    runs = vision.outputs[start:]
    return np.asarray(runs[-1][B.IMAGE_EMBEDS], np.float32) if runs else None


def run_reference(reference, image: np.ndarray, instruction: str, unnorm_key: str | None = None) -> PolicyRun:
    """Run the PyTorch ``ReferencePolicy`` (no step logits; a malformed decode is reported, not zeroed)."""
    r = reference.predict_action_chunk(image, instruction, unnorm_key)
    if not r.well_formed:
        return PolicyRun(np.asarray(r.ids, np.int64), None, None, None, r.reason or "malformed")
    return PolicyRun(np.asarray(r.ids, np.int64), None, np.asarray(r.actions), np.asarray(r.normalized), None)


def recording_policy(bundle, *, constrained: bool = True, threads: int | None = None):
    """A CPU NoraPolicy for ``bundle`` whose vision and decoder sessions record image embeddings and logits.

    A bundle path loads with ``forced_tokens="flag"`` (chunks come back with their token classes); a policy
    passed in keeps its own setting (with "raise", a flagged chunk is counted as malformed).
    """
    from nora_edge import bundle as B
    from nora_edge.policy import NoraPolicy

    from .quantize.calibration import RecordingSession

    policy = (
        bundle
        if isinstance(bundle, NoraPolicy)
        else NoraPolicy.load(
            bundle,
            providers="cpu",
            threads=threads,
            constrained=constrained,
            forced_tokens="flag",
            verify=False,
        )
    )
    if not isinstance(policy.decoder.session, RecordingSession):
        policy.decoder.session = RecordingSession(policy.decoder.session, (B.LOGITS,))
    if not isinstance(policy.vision, RecordingSession):
        policy.vision = RecordingSession(policy.vision, (B.IMAGE_EMBEDS,))
    policy.decoder.session.record_feeds = policy.vision.record_feeds = False
    return policy
