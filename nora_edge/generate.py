"""Prefill, decode steps and greedy generation on the ONNX decoder (numpy + onnxruntime).

Data flow:
  prompt ids (S,) --embedding table, image embeds scattered over the <|image_pad|> run--> inputs_embeds
  (1, S, H) --:func:`prefill` (past = the cached constant prefix)--> logits of the last position (rows,) + KV
  --:func:`greedy`: pick a token (argmax, optionally masked / penalised) --:func:`decode_step` with that
  token's embedding at position p + rope_delta--> ... until a stop rule fires; the final token never costs a
  decoder step.

The choice of each token (constrained / unconstrained modes, repetition penalty, tie rule, token classes, the C
kernel path) is :mod:`nora_edge.selection`'s :class:`~nora_edge.selection.GreedySelector`; its names are re-exported here.

The KV cache is a dict of OrtValues (numpy on CPU without IO binding) that only ever flows graph -> graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from nora_edge import bundle as B
from nora_edge.errors import BundleError, InputError
from nora_edge.prompt import decode_position_ids
from nora_edge.selection import (  # noqa: F401  (re-exported: the selection's names as generate.* too)
    HF_DEFAULT_NEW_TOKENS,
    TOKEN_CLASSES,
    TOKEN_FORCED,
    TOKEN_MODEL,
    TOKEN_REPAIRED,
    GenerationResult,
    GreedyConfig,
    GreedySelector,
    _check_kernels,
    _select_c,
    apply_repetition_penalty,
    argmax_lowest_id,
    class_counts,
    new_token_limit,
    select_step_numpy,
)
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
        self, embeds: np.ndarray, position_ids: np.ndarray, cache: KVCache, *, every: bool = False
    ) -> tuple[np.ndarray, KVCache]:
        """Run the graph on ``S`` new tokens after ``cache``.

        Args:
            embeds: (1, S, H) float32.
            position_ids: (3, 1, S) int64.
            cache: KV of the tokens before.
            every: return the ``logits_all`` output (S, rows) instead (a ``--multi-token`` graph).

        Returns:
            logits (rows,) float32 of the last new token (or (S, rows)), and the extended cache.
        """
        s = embeds.shape[1]
        feeds = {
            B.INPUTS_EMBEDS: np.ascontiguousarray(embeds, dtype=np.float32),
            B.POSITION_IDS: np.ascontiguousarray(position_ids, dtype=np.int64),
            B.ATTENTION_MASK: np.ones((1, cache.length + s), dtype=np.int64),
        }
        feeds.update(cache.values)
        name = B.LOGITS_ALL if every else B.LOGITS
        out = self.session.run(feeds, [name, *self.present_names], keep=self._keep)
        logits = np.asarray(out[name])[0]  # (rows,) or (S, rows)
        values = {past: out[pres] for past, pres in zip(self.kv_names, self.present_names, strict=True)}
        return logits, KVCache(values, cache.length + s)

    def truncate(self, cache: KVCache, length: int) -> KVCache:
        """The first ``length`` tokens of ``cache`` ((1, kv_heads, length, hd) numpy copies)."""
        if length == cache.length:
            return cache
        vals = {}
        for name, v in cache.values.items():
            arr = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
            vals[name] = np.ascontiguousarray(arr[:, :, :length])
        return KVCache(vals, length)


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
