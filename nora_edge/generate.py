"""Prefill, decode steps and greedy generation on the ONNX decoder (numpy + onnxruntime).

Data flow:
  prompt ids (S,) --embedding table, image embeds scattered over the <|image_pad|> run--> inputs_embeds
  (1, S, H) --:func:`prefill` (past = the cached constant prefix)--> logits of the last position (rows,) + KV
  --:func:`greedy`: pick a token (argmax, optionally masked / penalised) --:func:`decode_step` with that
  token's embedding at position p + rope_delta--> ... until a stop rule fires; the final token never costs a
  decoder step.

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

The KV cache is a dict of OrtValues (numpy on CPU without IO binding) that only ever flows graph -> graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from nora_edge import bundle as B
from nora_edge.actions.automaton import AutomatonState, FastAutomaton
from nora_edge.errors import BundleError, DetokenizationError, InputError
from nora_edge.kernels import SEL_STATUS
from nora_edge.prompt import decode_position_ids
from nora_edge.sessions import GraphSession


@dataclass
class KVCache:
    """Present keys/values of every layer after ``length`` tokens.

    Attributes:
        values: graph input name (``past_key_values.{i}.key/value``) -> OrtValue or (1, kv_heads, length, hd).
        length: tokens held.
    """

    values: dict
    length: int


class Decoder:
    """The decoder graph plus the embedding table and the head-row map.

    Args:
        session: the decoder :class:`GraphSession`.
        spec: its manifest component spec (meta: num_layers, num_kv_heads, head_dim, hidden_size).
        embeddings: (vocab, H) table (any float dtype; rows are cast to float32 when gathered).
        head_rows: (rows,) Qwen id of each logits row.
    """

    def __init__(
        self, session: GraphSession, spec: B.ComponentSpec, embeddings: np.ndarray, head_rows: np.ndarray
    ):
        meta = spec.meta
        try:
            self.num_layers = int(meta["num_layers"])
            self.num_kv_heads = int(meta["num_kv_heads"])
            self.head_dim = int(meta["head_dim"])
            self.hidden_size = int(meta["hidden_size"])
        except KeyError as e:
            raise BundleError(f"manifest.json: components.decoder.meta lacks field {e}") from e
        if embeddings.ndim != 2 or embeddings.shape[1] != self.hidden_size:
            raise BundleError(
                f"embeddings table has shape {embeddings.shape}, expected (vocab, {self.hidden_size}) "
                "(components.decoder.meta.hidden_size)"
            )
        self.session = session
        self.embeddings = embeddings
        self.head_rows = np.asarray(head_rows, dtype=np.int64)
        self.row_of = {int(q): r for r, q in enumerate(self.head_rows.tolist())}
        self.kv_names = [n for i in range(self.num_layers) for n in (B.past_key(i), B.past_value(i))]
        self.present_names = [
            n for i in range(self.num_layers) for n in (B.present_key(i), B.present_value(i))
        ]
        self._keep = frozenset(self.present_names)
        self._rows_cache: dict[tuple[int, int], np.ndarray] = {}

    def rows_of(self, base: int, count: int) -> np.ndarray:
        """Head row of each Qwen id ``base .. base+count-1`` (cached).

        Raises:
            BundleError: the head has no row for some of them.
        """
        key = (int(base), int(count))
        if key not in self._rows_cache:
            rows = np.array([self.row_of.get(base + i, -1) for i in range(count)], dtype=np.int64)
            if (rows < 0).any():
                raise BundleError(
                    f"decoder head lacks rows for {(rows < 0).sum()} of the ids {base}..{base + count - 1}"
                )
            rows.setflags(write=False)
            self._rows_cache[key] = rows
        return self._rows_cache[key]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(S,) ids -> (1, S, H) float32 embeddings."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.embeddings.shape[0]):
            raise InputError(f"token id outside the embedding table [0, {self.embeddings.shape[0]})")
        return self.embeddings[ids].astype(np.float32)[None]  # (1, S, H)

    def empty_cache(self) -> KVCache:
        """A cache holding no tokens: (1, kv_heads, 0, hd) arrays."""
        z = np.zeros((1, self.num_kv_heads, 0, self.head_dim), dtype=np.float32)
        return KVCache({n: z for n in self.kv_names}, 0)

    def forward(
        self, embeds: np.ndarray, position_ids: np.ndarray, cache: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        """Run the graph on ``S`` new tokens after ``cache``.

        Args:
            embeds: (1, S, H) float32.
            position_ids: (3, 1, S) int64.
            cache: KV of the tokens before.

        Returns:
            logits (rows,) float32 of the last new token, and the extended cache.
        """
        s = embeds.shape[1]
        feeds = {
            B.INPUTS_EMBEDS: np.ascontiguousarray(embeds, dtype=np.float32),
            B.POSITION_IDS: np.ascontiguousarray(position_ids, dtype=np.int64),
            B.ATTENTION_MASK: np.ones((1, cache.length + s), dtype=np.int64),
        }
        feeds.update(cache.values)
        out = self.session.run(feeds, [B.LOGITS, *self.present_names], keep=self._keep)
        logits = np.asarray(out[B.LOGITS])[0]  # (rows,)
        values = {past: out[pres] for past, pres in zip(self.kv_names, self.present_names, strict=True)}
        return logits, KVCache(values, cache.length + s)


def prefill(
    decoder: Decoder,
    input_ids: np.ndarray,
    position_ids: np.ndarray,
    cache: KVCache,
    image_embeds: np.ndarray | None = None,
    image_start: int | None = None,
) -> tuple[np.ndarray, KVCache]:
    """Run the decoder over prompt tokens (optionally after a cached prefix).

    Args:
        decoder: the :class:`Decoder`.
        input_ids: (S,) ids of the new tokens.
        position_ids: (3, 1, S) their mrope positions.
        cache: KV of the tokens before (``decoder.empty_cache()`` for none).
        image_embeds: (n, H) vision output to place over the image-pad run, or None.
        image_start: index in ``input_ids`` where the image run starts.

    Returns:
        logits (rows,) of the last token and the extended cache.
    """
    embeds = decoder.embed(input_ids)  # (1, S, H)
    if image_embeds is not None:
        n = image_embeds.shape[0]
        if image_start is None or image_start < 0 or image_start + n > embeds.shape[1]:
            raise InputError(
                f"image run [{image_start}, +{n}) does not fit the {embeds.shape[1]} prompt tokens"
            )
        embeds[0, image_start : image_start + n] = image_embeds
    return decoder.forward(embeds, position_ids, cache)


def decode_step(
    decoder: Decoder, token_id: int, index: int, rope_delta: int, cache: KVCache
) -> tuple[np.ndarray, KVCache]:
    """Feed one generated token at absolute sequence index ``index``.

    Returns:
        logits (rows,) for the next token and the extended cache.
    """
    embeds = decoder.embed(np.array([token_id], dtype=np.int64))  # (1, 1, H)
    return decoder.forward(embeds, decode_position_ids(index, rope_delta), cache)


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


def greedy(
    decoder: Decoder,
    first_logits: np.ndarray,
    cache: KVCache,
    prompt_ids: np.ndarray,
    rope_delta: int,
    config: GreedyConfig,
) -> GenerationResult:
    """Greedy decoding from the prefill's logits.

    Args:
        decoder: the :class:`Decoder`.
        first_logits: (rows,) logits after the prompt.
        cache: KV after the prompt.
        prompt_ids: (S,) the whole prompt (for the repetition penalty and positions).
        rope_delta: mrope offset of generated positions.
        config: :class:`GreedyConfig`.

    Returns:
        :class:`GenerationResult`.

    Raises:
        DetokenizationError: constrained mode found no allowed action id (cannot happen with a consistent
            automaton) or overran its length bound.
        BundleError: ``config.kernels`` was built for another head or codec (n_rows, V, T, D differ).
    """
    sel = GreedySelector(decoder, prompt_ids, config)
    logits, steps, index = first_logits, [], int(prompt_ids.size)
    while True:
        token = sel.choose(logits)
        if sel.stopped is not None:
            break
        t0 = time.perf_counter()
        logits, cache = decode_step(decoder, token, index, rope_delta, cache)
        steps.append(time.perf_counter() - t0)
        index += 1
    return sel.result(steps)
