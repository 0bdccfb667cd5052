"""One inference's output and the rule that decides whether a chunk the model did not fully choose is handed out.

Data flow: generation result (ids, per-token classes from :func:`nora_edge.generate.greedy`) + FAST decode +
unnormalize -> :class:`ChunkOutput` -> :func:`check_forced_tokens` with the policy's :class:`ForcedTokenRule`:
returned as is, or refused with :class:`~nora_edge.errors.ForcedTokenError` naming the first offending step.

Why: constrained decoding always yields a decodable chunk, but a token the automaton forced (the model wanted to
end, or its choice would have broken the chunk) is an action the model did not produce. The default rule refuses
any forced_continue token and any repaired token (``max_repaired=0``); ``forced_tokens="flag"`` hands such chunks
out with ``flagged`` set so the caller decides (benchmarks and fidelity studies count them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nora_edge.errors import ForcedTokenError, InputError
from nora_edge.generate import TOKEN_FORCED, TOKEN_MODEL, TOKEN_REPAIRED, class_counts

FORCED_TOKEN_MODES = ("raise", "flag")


@dataclass(frozen=True)
class ChunkOutput:
    """Everything one inference produced (for parity studies and logs).

    Attributes:
        actions: (T, D) float64 robot actions: ``normalized`` through the bundle's post-processing chain.
        normalized: (T, D) float64 FAST-decoded actions in [-1, 1] space.
        ids: (N,) int64 generated Qwen ids.
        fast_ids: (K,) int64 FAST ids that were decoded.
        stopped: why generation stopped ("complete", "eos", "max_new_tokens").
        unnorm_key: the q01/q99 norm-stats key used, or the fixed statistics' source (e.g.
            ``meta/stats.json[action]``) when the chain carries its own.
        token_classes: (N,) "model" / "repaired" / "forced_continue" per id (see ``nora_edge.generate``).
        top_ids: (N,) int64 the model's own top choice at each step.
        mode: "constrained" (automaton) or "hf-parity" (unconstrained greedy over a full head).
    """

    actions: np.ndarray
    normalized: np.ndarray
    ids: np.ndarray
    fast_ids: np.ndarray
    stopped: str
    unnorm_key: str
    token_classes: tuple[str, ...] = ()
    top_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mode: str = "constrained"

    @property
    def class_counts(self) -> dict[str, int]:
        """Tokens per class; every class key present."""
        return class_counts(self.token_classes)

    @property
    def repaired(self) -> int:
        """Tokens the automaton substituted for a forbidden top choice."""
        return self.class_counts[TOKEN_REPAIRED]

    @property
    def forced(self) -> int:
        """Tokens emitted although the model's top choice was to end (forced_continue)."""
        return self.class_counts[TOKEN_FORCED]

    @property
    def flagged(self) -> bool:
        """True when any token was not the model's own choice."""
        return any(c != TOKEN_MODEL for c in self.token_classes)


@dataclass(frozen=True)
class ForcedTokenRule:
    """When a chunk with tokens the model did not choose is refused.

    Attributes:
        mode: "raise" (default): refuse a chunk with any forced_continue token or more than ``max_repaired``
            repaired tokens; "flag": hand every chunk out, classes in :class:`ChunkOutput`.
        max_repaired: repaired tokens a chunk may hold under "raise" (default 0).
    """

    mode: str = "raise"
    max_repaired: int = 0

    def __post_init__(self) -> None:
        if self.mode not in FORCED_TOKEN_MODES:
            raise InputError(f"forced_tokens must be one of {FORCED_TOKEN_MODES}, got {self.mode!r}")
        m = self.max_repaired
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise InputError(f"max_repaired must be an int >= 0, got {m!r}")


def first_violation(classes: tuple[str, ...], max_repaired: int) -> tuple[int, str] | None:
    """(step, reason) of the first token that breaks the "raise" rule, or None."""
    repaired = 0
    for step, c in enumerate(classes):
        if c == TOKEN_FORCED:
            return step, "the model chose to end the chunk here (forced_continue)"
        if c == TOKEN_REPAIRED:
            repaired += 1
            if repaired > max_repaired:
                return step, f"repaired token number {repaired} (max_repaired={max_repaired})"
    return None


def check_forced_tokens(out: ChunkOutput, rule: ForcedTokenRule) -> ChunkOutput:
    """Return ``out``, or raise when ``rule`` refuses it.

    Raises:
        ForcedTokenError: carrying ids, classes, the first offending step and the refused output.
    """
    if rule.mode == "flag":
        return out
    bad = first_violation(out.token_classes, rule.max_repaired)
    if bad is None:
        return out
    step, why = bad
    counts = out.class_counts
    raise ForcedTokenError(
        f"chunk refused at step {step} of {len(out.ids)}: {why}; token classes {counts}; the model's top choice "
        f"there was id {int(out.top_ids[step])}, the automaton emitted {int(out.ids[step])} "
        "(load the policy with forced_tokens='flag' to receive such chunks flagged)",
        ids=out.ids,
        token_classes=out.token_classes,
        step=step,
        output=out,
    )
