"""Lossless multi-token decoding: propose K tokens, verify them in ONE decoder call, keep the greedy prefix.

Data flow per chunk:
  prefill (the plain decoder graph, exactly as :class:`~nora_edge.policy.NoraPolicy`) -> logits -> the first
  token by :class:`~nora_edge.generate.GreedySelector` (the sequential loop's own selection: repetition penalty,
  automaton mask, lowest-id tie rule, classes, stop rules)
  -> loop: :class:`~nora_edge.drafts.DraftTable` proposes up to K tokens d_1..d_K after the tokens so far (an
  n-gram index of the earlier chunks: the longest matching suffix, same instruction first, then any chunk of this
  process), cut where the FAST automaton would refuse them
  -> ONE call of the same decoder graph on [pending, d_1..d_K] (S = K + 1 positions), reading its
  ``logits_all`` output (exported with ``nora-edge export --multi-token``) -> (S, rows)
  -> the selector chooses position by position: choice i == d_{i+1} accepts it and goes on; the first choice that
  differs (or the choice after d_K) is itself the next greedy token ("bonus"), so a call yields accepted + 1 tokens
  -> the KV cache is cut back to the kept tokens (pending + accepted drafts) and the loop goes on.
  No proposal: one plain ``decode_step`` (the sequential graph), i.e. the plain loop.

Guarantee. Every emitted token is the selector's choice on logits of exactly the token sequence plain greedy has
at that point, so the ids equal plain greedy's whenever those logits pick the same token as the sequential
loop's. The verify graph computes them with other GEMM shapes (S rows instead of 1) and its KV then feeds later
steps, so they may differ from the sequential ones in the last float bits. ``tie_margin`` closes that gap: once
any non-sequential logits were used, each choice must win by at least ``tie_margin`` (the chosen allowed id over
the runner-up allowed id, and the model's top id over its runner-up, on the penalised scores); a closer call
abandons the multi-token run and re-decodes the chunk with the plain sequential loop from the kept prefill.
So the ids are identical to plain greedy whenever batched and sequential logits differ by less than
``tie_margin / 2`` (measured differences: ``bench/multitoken_bench.py``); ``tie_margin=None`` drops the guard.

KV rollback per decoder flavor (``Decoder.truncate``): the portable decoder's immutable KV values are sliced to the
kept length; the fixed-buffer flavors (fused "shared", TensorRT "static") keep their buffers and only the held
length goes back: the rejected rows sit above it, are never attended to, and the next call overwrites them.
In a :class:`~nora_edge.policy.NoraPolicy` this is ``NoraPolicy.load(bundle, decoding="multi-token")``
(:class:`MultiTokenDecoding`); :class:`nora_edge.multitoken_runner.MultiTokenRunner` runs plain and multi-token side by side (benchmarks, the
export's validation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from nora_edge import bundle as B
from nora_edge.drafts import DraftTable, admissible, read_drafts
from nora_edge.errors import BundleError, InputError
from nora_edge.generate import (
    Decoder,
    GenerationResult,
    GreedyConfig,
    GreedySelector,
    KVCache,
    apply_repetition_penalty,
    decode_step,
    greedy,
)
from nora_edge.prompt import decode_position_ids

DEFAULT_MAX_DRAFT = 6  # S <= 7: on the CPU EP an S = 9 call measured ~1.5x an S = 1 call, S <= 5 ~1.0-1.1x
DEFAULT_TIE_MARGIN = 1e-3  # logit units; see the module docstring


class VerifyDecoder:
    """The decoder graph's ``logits_all`` output: S new tokens after a cache -> logits at every new position.

    Args:
        decoder: the policy's :class:`Decoder` (portable, or a fixed-buffer
            :class:`~nora_edge.static_kv.StaticDecoder`) of a bundle exported with ``--multi-token``.

    Raises:
        BundleError: the decoder graph has no ``logits_all`` output.
    """

    def __init__(self, decoder: Decoder) -> None:
        if B.LOGITS_ALL not in decoder.session.output_names:
            raise BundleError(
                f"the decoder graph has no output '{B.LOGITS_ALL}': multi-token decoding needs a bundle exported "
                "with `nora-edge export --multi-token` (export_bundle(..., multi_token=True))"
            )
        self.decoder = decoder

    def forward(
        self, ids: np.ndarray, index: int, rope_delta: int, cache: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        """Run ``ids`` (S,) at absolute indices ``index .. index+S-1`` after ``cache``.

        Returns:
            logits (S, rows) float32 and the cache extended by S tokens.
        """
        s = int(ids.size)
        embeds = self.decoder.embed(ids)  # (1, S, H)
        return self.decoder.forward(embeds, decode_position_ids(index, rope_delta, s), cache, every=True)


class NearTie(Exception):
    """A choice on non-sequential logits won by less than the tie margin (internal: triggers the fallback)."""


def _top2_gap(values: np.ndarray) -> float:
    if values.size < 2:
        return float("inf")
    a, b = np.partition(values, values.size - 2)[-2:]
    return float(abs(a - b))


def check_margin(sel: GreedySelector, logits: np.ndarray, tie_margin: float) -> float:
    """The smaller top-2 gap of the coming choice (model's top over all rows; allowed ids when constrained).

    Raises:
        NearTie: the gap is below ``tie_margin``.
    """
    scores = apply_repetition_penalty(logits, sel.seen, sel.config.repetition_penalty)
    gap = _top2_gap(scores)
    if sel.automaton is not None:
        allowed = sel.automaton.allowed(sel.state)
        gap = min(gap, _top2_gap(scores[sel.action_rows[allowed]]))
    if not gap >= tie_margin:
        raise NearTie(gap)
    return gap


@dataclass
class MultiTokenStats:
    """Counters of one chunk.

    Attributes:
        decoder_calls: decoder calls after the prefill (verify calls + plain steps).
        verify_calls: calls of the verify graph.
        proposed / accepted: drafts fed to verify calls / drafts equal to the greedy choice.
        fallback: True when a near tie made the chunk re-decode with the plain loop (counts include that run).
        min_gap: smallest top-2 gap checked on non-sequential logits (inf when none).
    """

    decoder_calls: int = 0
    verify_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    fallback: bool = False
    min_gap: float = float("inf")
    per_call_accepted: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        """The counters as JSON values (``min_gap`` None when no non-sequential logits were checked)."""
        return {
            "decoder_calls": self.decoder_calls,
            "verify_calls": self.verify_calls,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "fallback": self.fallback,
            "min_gap": None if self.min_gap == float("inf") else self.min_gap,
        }


def multitoken_greedy(
    decoder: Decoder,
    verify: VerifyDecoder,
    first_logits: np.ndarray,
    cache: KVCache,
    prompt_ids: np.ndarray,
    rope_delta: int,
    config: GreedyConfig,
    propose,
    *,
    max_draft: int = DEFAULT_MAX_DRAFT,
    tie_margin: float | None = DEFAULT_TIE_MARGIN,
    adaptive_draft: bool = False,
) -> tuple[GenerationResult, MultiTokenStats]:
    """:func:`nora_edge.generate.greedy` with proposals verified S at a time (module docstring).

    Args:
        decoder, first_logits, cache, prompt_ids, rope_delta, config: as :func:`~nora_edge.generate.greedy`.
        verify: the :class:`VerifyDecoder` of the same bundle.
        propose: callable (tokens so far: list[int], k) -> up to k proposed ids.
        max_draft: K, the most proposals per verify call.
        tie_margin: the guard of the module docstring (None: off).
        adaptive_draft: after a partly rejected call the next one asks for at most twice the accepted count
            (>= 1): shorter verify calls, which pays where a call's cost grows with its length (a compute-bound
            CPU), not where it is set by streaming the weights (a memory-bound Jetson / GPU decode).

    Returns:
        the :class:`GenerationResult` (ids, classes, top ids as greedy's; ``step_seconds`` per decoder call) and
        the :class:`MultiTokenStats`.
    """
    if max_draft < 1:
        raise InputError(f"max_draft must be >= 1, got {max_draft}")
    stats = MultiTokenStats()
    sel = GreedySelector(decoder, prompt_ids, config)
    steps: list[float] = []
    index, drifted, prefill_cache = int(prompt_ids.size), False, cache
    k = max_draft  # drafts asked for (adaptive: back to max_draft after a fully accepted call, else 2x accepted)
    try:
        token = sel.choose(first_logits)
        while sel.stopped is None:
            drafts = admissible(sel, list(propose(list(sel.out), k))[:k], config.action_base)
            t0 = time.perf_counter()
            if not drafts:
                logits, cache = decode_step(decoder, token, index, rope_delta, cache)
                steps.append(time.perf_counter() - t0)
                stats.decoder_calls += 1
                if drifted and tie_margin is not None:
                    stats.min_gap = min(stats.min_gap, check_margin(sel, logits, tie_margin))
                token = sel.choose(logits)
                index += 1
                continue
            feed = np.asarray([token, *drafts], dtype=np.int64)  # (S,)
            all_logits, grown = verify.forward(feed, index, rope_delta, cache)  # (S, rows)
            steps.append(time.perf_counter() - t0)
            stats.decoder_calls += 1
            stats.verify_calls += 1
            stats.proposed += len(drafts)
            drifted, accepted = True, 0
            for i in range(feed.size):
                if tie_margin is not None:
                    stats.min_gap = min(stats.min_gap, check_margin(sel, all_logits[i], tie_margin))
                token = sel.choose(all_logits[i])
                if i < len(drafts) and token == drafts[i]:
                    accepted += 1  # the draft was the greedy choice
                    if sel.stopped is None:
                        continue
                break  # the bonus token (a choice no draft matched), or the chunk is complete
            stats.accepted += accepted
            stats.per_call_accepted.append(accepted)
            if adaptive_draft:
                k = max_draft if accepted == len(drafts) else min(max_draft, max(1, 2 * accepted))
            cache = decoder.truncate(grown, cache.length + 1 + accepted)  # pending + accepted drafts
            index += 1 + accepted
    except NearTie:
        stats.fallback = True
        result = greedy(decoder, first_logits, prefill_cache, prompt_ids, rope_delta, config)
        stats.decoder_calls += len(result.step_seconds)
        return result, stats
    return sel.result(steps), stats


@dataclass(frozen=True)
class MultiTokenConfig:
    """Settings of the multi-token loop (``NoraPolicy.load(..., decoding="multi-token", multi_token=...)``).

    Attributes:
        max_draft: K, the most proposals per verify call (S = K + 1 positions).
        tie_margin: the guard of the module docstring in logit units (None: off, which drops the guarantee
            for near ties).
        learn: record every chunk in the draft table (False: drafts from what it holds, records nothing).
        gate_rate: stop drafting for an instruction whose recent drafts were accepted at a lower rate
            (:meth:`~nora_edge.drafts.DraftTable.enabled`; every few chunks still probe); 0 = never.
        adaptive_draft: shorten the next call after a partly rejected one (:func:`multitoken_greedy`).
        bundle_drafts: seed the draft table from the bundle's ``drafts.json`` when it ships one (the model's own
            ids on calibration frames: the first chunk of a process already has proposals). With
            ``learn=False`` the table then holds exactly the bundle's chunks, so a chunk's call count does not
            depend on what ran before it.

    The defaults (no gate, fixed K) minimise decoder calls: the cost that matters where decode streams the weights
    once per call (Jetson, GPU). On a compute-bound CPU host a call of K + 1 tokens costs more than one step, and
    ``gate_rate=0.2, adaptive_draft=True`` (:data:`CPU_HOST`) trades some calls for host milliseconds.
    """

    max_draft: int = DEFAULT_MAX_DRAFT
    tie_margin: float | None = DEFAULT_TIE_MARGIN
    learn: bool = True
    gate_rate: float = 0.0
    adaptive_draft: bool = False
    bundle_drafts: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_draft, bool) or not isinstance(self.max_draft, int) or self.max_draft < 1:
            raise InputError(f"MultiTokenConfig.max_draft must be an int >= 1, got {self.max_draft!r}")
        t = self.tie_margin
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < float("inf")
        ):
            raise InputError(f"MultiTokenConfig.tie_margin must be None or a finite number >= 0, got {t!r}")
        g = self.gate_rate
        if isinstance(g, bool) or not isinstance(g, int | float) or not 0 <= g <= 1:
            raise InputError(f"MultiTokenConfig.gate_rate must be a number in [0, 1], got {g!r}")


CPU_HOST = MultiTokenConfig(gate_rate=0.2, adaptive_draft=True)  # fewer, shorter verify calls on a CPU host


def bundle_drafts(bundle: B.Bundle, vocab_size: int) -> list[tuple[str, np.ndarray]]:
    """The chunks of the bundle's ``drafts.json`` (:func:`~nora_edge.drafts.read_drafts`); [] when it ships none.

    Raises:
        BundleError: the manifest's ``drafts`` section names another file, or the file is not a valid draft file.
    """
    section = bundle.manifest.get(B.DRAFTS_SECTION)
    if not section:
        return []
    if not isinstance(section, dict) or section.get("file") != B.DRAFTS:
        raise BundleError(f"{bundle.path}/manifest.json: 'drafts' section must name file {B.DRAFTS!r}")
    return read_drafts(bundle.file(B.DRAFTS), vocab_size)


class MultiTokenWarning(UserWarning):
    """Multi-token ids on this bundle equal the plain loop's by measurement, not by the tie-margin guard."""


def guarantee_of(bundle: B.Bundle, config: MultiTokenConfig) -> bool | None:
    """Whether the bundle's validation shows its batched and sequential logits within ``tie_margin / 2``.

    None when the bundle carries no such measurement (exported with validation off). Warns
    (:class:`MultiTokenWarning`) when the measured difference exceeds the margin's half: then ids equal the
    plain loop's on what was tried, and a near tie elsewhere could pick the other token.
    """
    entry = bundle.manifest.get("validation", {}).get("multi_token")
    if not entry or "batched_vs_sequential" not in entry:
        return None
    worst = float(entry["batched_vs_sequential"]["max_abs"])
    margin = config.tie_margin
    ok = margin is not None and worst < margin / 2
    if not ok:
        import warnings

        warnings.warn(
            f"{bundle.path.name}: its verify calls' logits differ from the sequential steps' by up to {worst:.3g} "
            f"(validation, {entry['batched_vs_sequential']['positions']} positions), more than tie_margin/2 = "
            f"{None if margin is None else margin / 2}: multi-token ids equalled the plain loop's on "
            f"{entry.get('ids_equal')}/{entry.get('compared')} validation chunks but are not guaranteed to at a "
            "near tie. int8-activation graphs (MatMulNBits accuracy_level 4: recipes int4, int4-b32, mixed) do "
            "this; the int4-f32act recipe computes in fp32 and keeps the guarantee",
            MultiTokenWarning,
            stacklevel=3,
        )
    return ok


class MultiTokenDecoding:
    """A policy's multi-token decode loop: the decoder's ``logits_all`` output, a draft table and the settings.

    Args:
        decoder: the policy's :class:`Decoder` (any flavor; graph exported with ``--multi-token``).
        config: :class:`MultiTokenConfig` (default settings when None).
        drafts: the :class:`~nora_edge.drafts.DraftTable` (default: a new one). It lives as long as the policy:
            ``NoraPolicy.reset()`` keeps it (earlier episodes are what the next one drafts from).

    Raises:
        BundleError: the graph has no ``logits_all`` output.
    """

    def __init__(
        self, decoder: Decoder, config: MultiTokenConfig | None = None, drafts: DraftTable | None = None
    ):
        self.verify = VerifyDecoder(decoder)
        self.config = config if config is not None else MultiTokenConfig()
        self.drafts = drafts if drafts is not None else DraftTable()
        self.last_stats: MultiTokenStats | None = None  # the last chunk's counters
        self.guaranteed: bool | None = None  # from the bundle's validation (NoraPolicy.load sets it)
        self.seeded = 0  # chunks taken from the bundle's drafts.json (seed_from)

    def seed_from(self, bundle: B.Bundle, vocab_size: int) -> int:
        """Seed the draft table from the bundle's ``drafts.json`` (when it ships one and ``bundle_drafts`` is on);
        returns the chunks seeded.

        Raises:
            BundleError: the manifest's ``drafts`` section names a file that is not a valid draft file.
        """
        if self.config.bundle_drafts:
            self.seeded += self.drafts.seed(bundle_drafts(bundle, vocab_size))
        return self.seeded

    def generate(
        self,
        first_logits: np.ndarray,
        cache: KVCache,
        prompt_ids: np.ndarray,
        rope_delta: int,
        greedy_config: GreedyConfig,
        instruction: str,
        config: MultiTokenConfig | None = None,
    ) -> tuple[GenerationResult, MultiTokenStats]:
        """One chunk from the prefill's logits (arguments as :func:`multitoken_greedy`; ``config`` overrides the
        decoding's own for this call)."""
        cfg = config if config is not None else self.config
        table = self.drafts
        on = table.enabled(instruction, cfg.gate_rate) if cfg.learn and cfg.gate_rate > 0 else True

        def propose(out: list[int], k: int) -> list[int]:
            return table.propose(instruction, out, k) if on else []

        res, stats = multitoken_greedy(
            self.verify.decoder, self.verify, first_logits, cache, prompt_ids, rope_delta, greedy_config,
            propose, max_draft=cfg.max_draft, tie_margin=cfg.tie_margin, adaptive_draft=cfg.adaptive_draft,
        )  # fmt: skip
        if cfg.learn:
            table.observe(instruction, res.ids)
            if on:
                table.record(instruction, stats.proposed, stats.accepted)
        self.last_stats = stats
        return res, stats


def __getattr__(name: str):
    """``MultiTokenRunner`` and ``batched_vs_sequential`` live in :mod:`nora_edge.multitoken_runner` (lazy: it
    imports this module)."""
    if name in ("MultiTokenRunner", "batched_vs_sequential"):
        from nora_edge import multitoken_runner

        return getattr(multitoken_runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
