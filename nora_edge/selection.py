"""Token selection: one generated token from one logits row, exactly as the sequential greedy loop chooses it.

Data flow: raw logits (rows,) of the decoder head --:func:`apply_repetition_penalty` (the ids seen so far)-->
scores --constrained: the FAST automaton's allowed ids (:func:`select_step_numpy`, or one libnora_fast call,
``_select_c``) | unconstrained: :func:`argmax_lowest_id` over every row--> the chosen row, the model's own top row,
the token's class --:class:`GreedySelector` (state: seen marks, automaton state, stop rules)--> the token.
:func:`nora_edge.generate.greedy` (one decoder step per token) and :mod:`nora_edge.multitoken` (several positions
per decoder call) both choose through :class:`GreedySelector`.

Two selection modes:
  constrained   argmax over the action rows allowed by :class:`~nora_edge.actions.FastAutomaton`; stops the
                moment the chunk holds exactly T*D coefficients, so every output decodes.
  unconstrained HF greedy parity: argmax over all head rows, stop on an eos id or after max_new_tokens.
Forced-token accounting (constrained mode): every step also takes the model's own top choice over all head
rows (same penalised scores) and classifies the token it emitted (:data:`TOKEN_CLASSES`):
  model            the model's top choice was allowed and taken;
  repaired         the top choice was forbidden (an action id that would break the chunk, or with a full head a
                   non-action id); the best allowed action id was taken instead;
  forced_continue  the top choice was an end id although the chunk was not complete.
The step after completion is never run, so whether the model would have ended there is not checked.
Unconstrained tokens are all "model".
With ``GreedyConfig.kernels`` (a :class:`nora_edge.kernels.FastKernels`), one C call per constrained step does the
penalty, the model's top row, the masked argmax and the automaton advance; ids, classes and errors are those of
the numpy path (a failed C step re-runs the numpy step, which raises the same DetokenizationError).
Both apply the checkpoint's repetition penalty exactly as transformers' ``RepetitionPenaltyLogitsProcessor``
does: every id already in the sequence (prompt included) has its logit divided by the penalty if positive,
multiplied if negative (float32). Ties go to the smallest Qwen id (torch.argmax's first index over the vocab).
Exact HF parity in unconstrained mode needs a "full" head; with the sliced action head the argmax is over
its rows only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nora_edge.actions.automaton import AutomatonState, FastAutomaton
from nora_edge.errors import BundleError, DetokenizationError
from nora_edge.kernels import SEL_STATUS

if TYPE_CHECKING:
    from nora_edge.generate import Decoder


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float | None) -> np.ndarray:
    """HF ``RepetitionPenaltyLogitsProcessor`` on the head rows (float32, as torch computes it).

    Args:
        logits: (rows,) float32.
        seen: (rows,) bool, True where the row's id occurs in the sequence so far.
        penalty: the checkpoint's repetition_penalty (None or 1.0: no-op).
    """
    if penalty is None or penalty == 1.0:
        return logits
    p = np.float32(penalty)
    penalised = np.where(logits < 0, logits * p, logits / p).astype(np.float32)
    return np.where(seen, penalised, logits)


def argmax_lowest_id(scores: np.ndarray, head_rows: np.ndarray) -> int:
    """Row of the maximum; among ties the row with the smallest Qwen id (torch.argmax over the full vocab)."""
    best = scores.max()
    if not np.isfinite(best):
        raise DetokenizationError(f"no finite logit to choose from (max = {best})")
    cand = np.flatnonzero(scores == best)
    return int(cand[np.argmin(head_rows[cand])]) if cand.size > 1 else int(cand[0])


TOKEN_MODEL, TOKEN_REPAIRED, TOKEN_FORCED = "model", "repaired", "forced_continue"
TOKEN_CLASSES = (TOKEN_MODEL, TOKEN_REPAIRED, TOKEN_FORCED)
# transformers' default max_length (configuration_utils.py, ``_get_default_generation_params``): with no length
# field in generation_config.json, generate() makes this many NEW tokens (utils.py, ``_prepare_generated_length``).
HF_DEFAULT_NEW_TOKENS = 20


@dataclass
class GenerationResult:
    """Output of :func:`greedy`.

    Attributes:
        ids: (N,) int64 generated Qwen ids (the final eos included in unconstrained mode, as HF returns it).
        stopped: "complete" (constrained), "eos" or "max_new_tokens".
        step_seconds: wall time of every decoder step after the prefill.
        classes: (N,) one of :data:`TOKEN_CLASSES` per id (module docstring).
        top_ids: (N,) int64 the model's own top choice at each step (equal to ``ids`` where "model").
    """

    ids: np.ndarray
    stopped: str
    step_seconds: list[float] = field(default_factory=list)
    classes: tuple[str, ...] = ()
    top_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def class_counts(classes: tuple[str, ...]) -> dict[str, int]:
    """Count of each of :data:`TOKEN_CLASSES` (every key present)."""
    return {c: sum(1 for x in classes if x == c) for c in TOKEN_CLASSES}


def new_token_limit(config: GreedyConfig, prompt_len: int) -> int:
    """HF's length rule: ``max_new_tokens`` if set, else ``max_length - prompt_len`` if set, else HF's default
    of :data:`HF_DEFAULT_NEW_TOKENS` new tokens (what ``generate`` does with Qwen2.5-VL-3B-Instruct's
    generation_config.json, which has no length field).

    Raises:
        BundleError: the limit leaves no room for a token.
    """
    if config.max_new_tokens is not None:
        limit = int(config.max_new_tokens)
    elif config.max_length is not None:
        limit = int(config.max_length) - prompt_len
    else:
        limit = HF_DEFAULT_NEW_TOKENS
    if limit < 1:
        raise BundleError(
            f"manifest.json: generation length limit leaves {limit} new tokens for a {prompt_len}-token prompt"
        )
    return limit


@dataclass(frozen=True)
class GreedyConfig:
    """Selection rules of :func:`greedy`.

    Attributes:
        automaton: the FAST automaton (constrained mode) or None (unconstrained).
        action_base: Qwen id of FAST id 0.
        eos_ids: unconstrained stop ids.
        max_new_tokens: unconstrained length limit (HF ``max_new_tokens``), or None to use ``max_length``.
        max_length: HF ``max_length`` (prompt + new tokens), used only when ``max_new_tokens`` is None.
        repetition_penalty: the checkpoint's penalty (None = off).
        kernels: a ``nora_edge.kernels.FastKernels`` built from the same bundle: the constrained selection runs
            in C (identical results); None (default) = numpy.
    """

    automaton: FastAutomaton | None
    action_base: int
    eos_ids: tuple[int, ...]
    max_new_tokens: int | None
    max_length: int | None
    repetition_penalty: float | None
    kernels: object | None = None


def select_step_numpy(
    scores: np.ndarray,
    rows: np.ndarray,
    auto: FastAutomaton,
    state: AutomatonState,
    action_rows: np.ndarray,
    n_out: int,
) -> tuple[int, int, AutomatonState]:
    """One constrained numpy step on penalised scores (rows,): (chosen row, top row, next state)."""
    top = argmax_lowest_id(scores, rows)  # the model's own choice over every head row
    allowed = auto.allowed(state)  # (V,)
    if not allowed.any():
        raise DetokenizationError(f"constrained decoding: no allowed action id after {n_out} tokens")
    masked = np.full(auto.vocab_size, -np.inf, dtype=np.float32)
    masked[allowed] = scores[action_rows[allowed]]
    fast_id = argmax_lowest_id(masked, action_rows)
    return int(action_rows[fast_id]), top, auto.advance(state, fast_id)


def _check_kernels(kernels, rows: np.ndarray, auto: FastAutomaton) -> None:
    info = kernels.info
    got = (info["n_rows"], info["vocab_size"], info["time_horizon"], info["action_dim"])
    want = (rows.size, auto.vocab_size, auto.time_horizon, auto.action_dim)
    if got != want:
        raise BundleError(
            f"codec kernels context (n_rows, V, T, D) = {got} disagrees with the decoder/automaton {want}"
        )


def _select_c(
    kernels,
    logits: np.ndarray,
    seen: np.ndarray,
    penalty: float | None,
    rows: np.ndarray,
    auto: FastAutomaton,
    state: AutomatonState,
    action_rows: np.ndarray,
    n_out: int,
) -> tuple[int, int, AutomatonState]:
    """:func:`select_step_numpy` in one C call on raw logits (rows,); ``seen`` (rows,) bool may be marked.

    A non-OK status re-runs the numpy step, which raises the numpy path's exact DetokenizationError.
    """
    penalise = penalty is not None and penalty != 1.0
    fast_id, done, pending, top, status = kernels.select_step(
        np.ascontiguousarray(logits, dtype=np.float32),  # (rows,); float16 -> float32 is exact
        state.done,
        state.pending,
        seen.view(np.uint8) if penalise else None,
        float(penalty) if penalise else 1.0,
    )
    if status != 0:
        scores = apply_repetition_penalty(logits, seen, penalty)
        select_step_numpy(scores, rows, auto, state, action_rows, n_out)  # raises
        raise DetokenizationError(
            f"codec kernels: selection status '{SEL_STATUS[status]}' where the numpy step succeeds"
        )
    return int(action_rows[fast_id]), top, AutomatonState(done, pending)


class GreedySelector:
    """The per-position selection of :func:`greedy`, one token at a time (shared with :mod:`nora_edge.multitoken`).

    :meth:`choose` applies the repetition penalty, the automaton mask (or the unconstrained argmax), the tie
    rule, the token classification and the stop rules exactly as the sequential loop does, and marks the chosen
    id as seen. Every call emits one generated token; nothing is ever taken back.

    Attributes:
        rows: (rows,) Qwen id of each logits row.
        seen: (rows,) bool, ids in the sequence so far (prompt included).
        automaton, state, action_rows: constrained mode (None / start state / (V,) FAST id -> row otherwise).
        stopped: None while generating, else "complete", "eos" or "max_new_tokens".
        out, classes, tops: generated ids, their classes and the model's top ids so far.

    Raises:
        BundleError: ``config.kernels`` was built for another head or codec (n_rows, V, T, D differ).
    """

    def __init__(self, decoder: Decoder, prompt_ids: np.ndarray, config: GreedyConfig) -> None:
        self.config = config
        self.rows = rows = decoder.head_rows
        self.seen = np.isin(rows, prompt_ids)  # (rows,)
        self.automaton = auto = config.automaton
        self.action_rows = self.state = None
        if auto is not None:
            # (V,) FAST id -> head row
            self.action_rows = decoder.rows_of(config.action_base, auto.vocab_size)
            self.state = auto.start()
            self.limit = 4 * auto.total + 1  # every id holds >= 1 byte, every coefficient char <= 3 bytes
        else:
            self.limit = new_token_limit(config, int(prompt_ids.size))
        self.eos = set(config.eos_ids)
        self.kernels = config.kernels if auto is not None else None
        if self.kernels is not None:
            _check_kernels(self.kernels, rows, auto)
        self.out: list[int] = []
        self.classes: list[str] = []
        self.tops: list[int] = []
        self.stopped: str | None = None

    def choose(self, logits: np.ndarray) -> int:
        """Select the next token from raw logits (rows,); sets :attr:`stopped` when a stop rule fires.

        Raises:
            DetokenizationError: constrained mode found no allowed action id or overran its length bound.
        """
        rows, auto, seen, penalty = self.rows, self.automaton, self.seen, self.config.repetition_penalty
        if self.kernels is not None:
            row, top, self.state = _select_c(
                self.kernels, logits, seen, penalty, rows, auto, self.state, self.action_rows, len(self.out)
            )
        elif auto is not None:
            scores = apply_repetition_penalty(logits, seen, penalty)
            row, top, self.state = select_step_numpy(
                scores, rows, auto, self.state, self.action_rows, len(self.out)
            )
        else:
            scores = apply_repetition_penalty(logits, seen, penalty)
            row = top = argmax_lowest_id(scores, rows)  # the model's own choice over every head row
        token = int(rows[row])
        self.out.append(token)
        self.tops.append(int(rows[top]))
        if row == top:
            self.classes.append(TOKEN_MODEL)
        else:
            self.classes.append(TOKEN_FORCED if int(rows[top]) in self.eos else TOKEN_REPAIRED)
        seen[row] = True
        if auto is not None and auto.is_complete(self.state):
            self.stopped = "complete"
        elif auto is None and token in self.eos:
            self.stopped = "eos"
        elif len(self.out) >= self.limit:
            if auto is not None:
                raise DetokenizationError(f"constrained decoding did not complete within {self.limit} tokens")
            self.stopped = "max_new_tokens"
        return token

    def result(self, step_seconds: list[float]) -> GenerationResult:
        """The :class:`GenerationResult` of the tokens chosen so far."""
        return GenerationResult(
            np.asarray(self.out, dtype=np.int64),
            self.stopped or "",
            step_seconds,
            tuple(self.classes),
            np.asarray(self.tops, dtype=np.int64),
        )
