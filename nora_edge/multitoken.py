"""Lossless multi-token decoding: propose K tokens, verify them in ONE decoder call, keep the greedy prefix.

Data flow per chunk:
  prefill (the plain decoder graph, exactly as :class:`~nora_edge.policy.NoraPolicy`) -> logits -> the first
  token by :class:`~nora_edge.generate.GreedySelector` (the sequential loop's own selection: repetition penalty,
  automaton mask, lowest-id tie rule, classes, stop rules)
  -> loop: :class:`DraftTable` proposes up to K tokens d_1..d_K after the tokens so far (an n-gram index of the
  earlier chunks: the longest matching suffix, same instruction first, then any chunk of this process), cut
  where the FAST automaton would refuse them
  -> ONE call of the ``decoder_verify`` graph (:data:`nora_edge.bundle.DECODER_VERIFY`) on [pending, d_1..d_K]
  (S = K + 1 positions) -> logits_all (S, rows)
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

The portable decoder only (immutable KV values; the static / shared-buffer flavors write in place).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from nora_edge import bundle as B
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
from nora_edge.sessions import GraphSession

DEFAULT_MAX_DRAFT = 6  # S <= 7: on the CPU EP an S = 9 call measured ~1.5x an S = 1 call, S <= 5 ~1.0-1.1x
DEFAULT_TIE_MARGIN = 1e-3  # logit units; see the module docstring


class VerifyDecoder:
    """The ``decoder_verify`` graph: S new tokens after a cache -> logits at every new position.

    Args:
        session: the ``decoder_verify`` :class:`GraphSession`.
        decoder: the plain :class:`Decoder` of the same bundle (embedding table, KV names, head rows).
    """

    def __init__(self, session: GraphSession, decoder: Decoder) -> None:
        if B.LOGITS_ALL not in session.output_names:
            raise BundleError(f"decoder_verify graph has no output '{B.LOGITS_ALL}'")
        self.session = session
        self.decoder = decoder
        self._keep = frozenset(decoder.present_names)

    def forward(
        self, ids: np.ndarray, index: int, rope_delta: int, cache: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        """Run ``ids`` (S,) at absolute indices ``index .. index+S-1`` after ``cache``.

        Returns:
            logits (S, rows) float32 and the cache extended by S tokens.
        """
        dec = self.decoder
        s = int(ids.size)
        feeds = {
            B.INPUTS_EMBEDS: dec.embed(ids),  # (1, S, H)
            B.POSITION_IDS: decode_position_ids(index, rope_delta, s),  # (3, 1, S)
            B.ATTENTION_MASK: np.ones((1, cache.length + s), dtype=np.int64),
        }
        feeds.update(cache.values)
        out = self.session.run(feeds, [B.LOGITS_ALL, *dec.present_names], keep=self._keep)
        values = {p: out[q] for p, q in zip(dec.kv_names, dec.present_names, strict=True)}
        return np.asarray(out[B.LOGITS_ALL])[0], KVCache(values, cache.length + s)


def truncate_cache(cache: KVCache, length: int) -> KVCache:
    """The first ``length`` tokens of ``cache`` ((1, kv_heads, length, hd) numpy copies)."""
    if length == cache.length:
        return cache
    vals = {}
    for name, v in cache.values.items():
        arr = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
        vals[name] = np.ascontiguousarray(arr[:, :, :length])
    return KVCache(vals, length)


class DraftTable:
    """Proposals from earlier chunks of this process (lookup only: nothing here decides a token).

    An n-gram index over every recorded chunk: each n-gram (n = 1 .. ``max_suffix``) of a chunk maps to the ids
    that followed it there (up to ``MAX_CONTINUATION``). A proposal takes the longest suffix of the tokens so far
    that the index holds, first among the chunks of the same instruction, then among all; at equal length the
    most recent chunk wins, and within a chunk the earliest occurrence.

    Args:
        max_suffix: longest suffix matched.
        max_entries: index size per table before it is cleared (a bounded process-long memory).
    """

    MAX_CONTINUATION = 16

    def __init__(
        self, max_suffix: int = 4, max_entries: int = 1 << 16, min_rate: float = 0.2, probe_every: int = 4
    ) -> None:
        self.max_suffix, self.max_entries = max_suffix, max_entries
        self.min_rate, self.probe_every = min_rate, probe_every
        self.by_key: dict[str, dict[tuple[int, ...], list[int]]] = {}
        self.any: dict[tuple[int, ...], list[int]] = {}
        self.rate: dict[str, list[float]] = {}  # key -> [decayed proposed, decayed accepted, chunks gated]

    def record(self, key: str, proposed: int, accepted: int) -> None:
        """Account one chunk's drafts (decay 0.8 per chunk) for :meth:`enabled`."""
        r = self.rate.setdefault(key, [0.0, 0.0, 0.0])
        r[0], r[1] = 0.8 * r[0] + proposed, 0.8 * r[1] + accepted

    def enabled(self, key: str) -> bool:
        """False when the instruction's recent drafts were mostly rejected (accepted / proposed < ``min_rate``
        over >= 8 decayed drafts): its chunks then decode plainly, except every ``probe_every``-th, which
        drafts again so the rate can recover."""
        r = self.rate.get(key)
        if r is None or r[0] < 8 or r[1] >= self.min_rate * r[0]:
            return True
        r[2] += 1
        return r[2] % self.probe_every == 0

    def observe(self, key: str, ids: np.ndarray) -> None:
        """Record a finished chunk's generated ids (Qwen ids, (N,))."""
        seq = [int(i) for i in ids]
        own = self.by_key.setdefault(key, {})
        for table in (own, self.any):
            if len(table) > self.max_entries:
                table.clear()
            for n in range(1, self.max_suffix + 1):
                for j in range(len(seq) - n - 1, -1, -1):  # earliest occurrence written last: it wins
                    table[tuple(seq[j : j + n])] = seq[j + n : j + n + self.MAX_CONTINUATION]

    def propose(self, key: str, out: list[int], k: int) -> list[int]:
        """Up to ``k`` ids expected after ``out`` (the tokens generated so far, pending one included)."""
        own = self.by_key.get(key, {})
        for m in range(min(self.max_suffix, len(out)), 0, -1):
            suffix = tuple(out[len(out) - m :])
            for table in (own, self.any):
                cont = table.get(suffix)
                if cont:
                    return cont[:k]
        return []


def admissible(sel: GreedySelector, drafts: list[int], base: int) -> list[int]:
    """``drafts`` cut at the first id the selector's automaton would never choose (constrained mode only)."""
    auto = sel.automaton
    if auto is None:
        return drafts
    state, keep = sel.state, []
    for d in drafts:
        f = d - base
        if auto.is_complete(state) or not 0 <= f < auto.vocab_size or not auto.allowed(state)[f]:
            break
        keep.append(d)
        state = auto.advance(state, f)
    return keep


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
) -> tuple[GenerationResult, MultiTokenStats]:
    """:func:`nora_edge.generate.greedy` with proposals verified S at a time (module docstring).

    Args:
        decoder, first_logits, cache, prompt_ids, rope_delta, config: as :func:`~nora_edge.generate.greedy`.
        verify: the :class:`VerifyDecoder` of the same bundle.
        propose: callable (tokens so far: list[int], k) -> up to k proposed ids.
        max_draft: K, the most proposals per verify call (after a partly rejected call the next one asks for
            at most twice the accepted count, >= 1, so a poor draft source costs little).
        tie_margin: the guard of the module docstring (None: off).

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
    k = max_draft  # drafts asked for: back to max_draft after a fully accepted call, else 2x the accepted
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
            k = max_draft if accepted == len(drafts) else min(max_draft, max(1, 2 * accepted))
            cache = truncate_cache(grown, cache.length + 1 + accepted)  # pending + accepted drafts
            index += 1 + accepted
    except NearTie:
        stats.fallback = True
        result = greedy(decoder, first_logits, prefill_cache, prompt_ids, rope_delta, config)
        stats.decoder_calls += len(result.step_seconds)
        return result, stats
    return sel.result(steps), stats


class MultiTokenRunner:
    """A :class:`~nora_edge.policy.NoraPolicy` plus its bundle's verify graph: plain and multi-token chunks.

    Both paths share the policy's preprocessing, vision graph, cached prompt prefix and prefill; they differ
    only in the decode loop. The draft table learns from every multi-token chunk (keyed by instruction).

    Args:
        policy: a loaded NoraPolicy on the portable decoder.
        verify: its bundle's :class:`VerifyDecoder`.
        drafts: the :class:`DraftTable` (default: a new one).
    """

    def __init__(self, policy, verify: VerifyDecoder, drafts: DraftTable | None = None) -> None:
        if type(policy.decoder) is not Decoder:
            raise InputError("multi-token decoding needs the portable decoder (immutable KV values)")
        self.policy, self.verify = policy, verify
        self.drafts = drafts if drafts is not None else DraftTable()

    @classmethod
    def load(cls, bundle, **policy_kwargs) -> MultiTokenRunner:
        """Load a bundle that has the optional ``decoder_verify`` component.

        Raises:
            BundleError: the bundle has no ``decoder_verify`` (export it with
                ``nora_edge.export.decoder_verify.add_verify_graph``).
        """
        from nora_edge.policy import NoraPolicy
        from nora_edge.sessions import open_session

        policy = NoraPolicy.load(bundle, **policy_kwargs)
        b = policy.bundle
        spec = b.optional_component(B.DECODER_VERIFY)
        if spec is None:
            raise BundleError(f"{b.path}: no components.{B.DECODER_VERIFY} (multi-token decoding needs it)")
        keep = {k: policy_kwargs[k] for k in ("providers", "threads", "spinning") if k in policy_kwargs}
        session = open_session(B.DECODER_VERIFY, b.file(spec.file), spec, **keep)
        return cls(policy, VerifyDecoder(session, policy.decoder))

    def _prefill(self, image: np.ndarray, instruction: str):
        from nora_edge.generate import prefill
        from nora_edge.preprocess import preprocess_image

        pol = self.policy
        pixel_values, grid = preprocess_image(image, pol.image_spec)
        embeds = pol.image_embeds(pixel_values, grid)
        prompt = pol.prompt.build(instruction, grid)
        p = prompt.image_start
        logits, cache = prefill(
            pol.decoder,
            prompt.input_ids[p:],
            prompt.position_ids[:, :, p:],
            pol._prefix,
            embeds,
            image_start=0,
        )
        return prompt, logits, cache

    def plain(self, image: np.ndarray, instruction: str) -> tuple[GenerationResult, float]:
        """The policy's own sequential greedy loop: (result, decode seconds)."""
        prompt, logits, cache = self._prefill(image, instruction)
        t0 = time.perf_counter()
        res = greedy(
            self.policy.decoder, logits, cache, prompt.input_ids, prompt.rope_delta, self.policy._greedy
        )
        return res, time.perf_counter() - t0

    def multitoken(
        self,
        image: np.ndarray,
        instruction: str,
        *,
        max_draft: int = DEFAULT_MAX_DRAFT,
        tie_margin: float | None = DEFAULT_TIE_MARGIN,
        learn: bool = True,
    ) -> tuple[GenerationResult, MultiTokenStats, float]:
        """Multi-token decode of one chunk: (result, stats, decode seconds).

        ``learn``: record the chunk in the draft table (and its acceptance for :meth:`DraftTable.enabled`, which
        may turn drafting off for an instruction whose drafts keep failing); False drafts unconditionally and
        records nothing.
        """
        prompt, logits, cache = self._prefill(image, instruction)
        t0 = time.perf_counter()
        table = self.drafts
        on = table.enabled(instruction) if learn else True

        def propose(out: list[int], k: int) -> list[int]:
            return table.propose(instruction, out, k) if on else []

        res, stats = multitoken_greedy(
            self.policy.decoder, self.verify, logits, cache, prompt.input_ids, prompt.rope_delta,
            self.policy._greedy, propose, max_draft=max_draft, tie_margin=tie_margin,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        if learn:
            table.observe(instruction, res.ids)
            if on:
                table.record(instruction, stats.proposed, stats.accepted)
        return res, stats, seconds
