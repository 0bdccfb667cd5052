"""Fixed-buffer KV decoder loop: (1, kv_heads, MAX, hd) buffers written at a slot, for two graph flavors.

Layouts (``components.decoder.meta.kv_cache``):
  "static"  TensorRT flavor (export/decoder_static.py): the graph takes ``cache_position`` (S,) and writes the
            new K/V rows there with ScatterElements, attending over the slots <= each token's own slot.
  "shared"  fused onnxruntime flavor (export/decoder_fused.py): GroupQueryAttention takes ``attention_mask``
            (1, length + S) of ones, writes the new rows at slots length .. length+S-1 and attends causally
            over them (its past_present_share_buffer mode).

Data flow: :meth:`StaticDecoder.empty_cache` allocates zeroed (1, kv_heads, MAX, hd) float32 OrtValues per
layer on the session's device --:meth:`StaticDecoder.forward` (S new tokens after ``length`` held; the
layout's position input)--> logits (rows,) + a :class:`StaticKVCache` of ``length + S``. ``prefill``,
``decode_step`` and ``greedy`` of :mod:`nora_edge.generate` run on it unchanged (same
``forward(embeds, position_ids, cache)`` contract).

Buffer modes (``in_place``):
  True   present K/V are IO-bound to the past buffers themselves, so no byte of the cache is copied or
         allocated per step (onnxruntime's CPU ScatterElements skips its input->output copy when both are the
         same buffer: ``ScatterData`` in onnxruntime/core/providers/cpu/tensor/scatter.cc; GroupQueryAttention
         detects the shared buffer itself; the tests check the addresses). The buffers are shared by every cache derived from one ``empty_cache()``: a cache may be
         extended again only while no later write went below its length (a cached prompt prefix serves any
         number of continuations; an abandoned branch does not). Extending a cache whose slots were
         overwritten raises :class:`StaleCacheError`; it never reads the other branch's rows.
  False  onnxruntime allocates new present buffers every step (the graph's scatter copies MAX rows): every
         cache is an immutable value, at the price of one cache copy per step.
Default: in place on the CPU provider (verified there by the tests); functional on a GPU provider, where
in-place aliasing of a graph input and output is not verified here (TensorRT engines do not promise it).

Slots past a cache's length may hold stale rows of an earlier branch: the graph's mask never lets a token see
a slot above its own, so they are never read. Overflow (length + S > MAX) raises :class:`CacheOverflowError`
before the graph runs; the graph itself would index out of range (onnxruntime refuses it), never wrap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from nora_edge import bundle as B
from nora_edge.errors import BundleError, InputError
from nora_edge.generate import Decoder, KVCache
from nora_edge.sessions import GraphSession

CACHE_POSITION = "cache_position"  # (seq,) int64 graph input: absolute slot of each new token
KV_LAYOUT = "static"  # components.decoder.meta.kv_cache of a static-KV (TensorRT-flavor) graph
SHARED_LAYOUT = "shared"  # ... of a fused onnxruntime graph (GroupQueryAttention over shared buffers)
KV_LAYOUTS = {KV_LAYOUT: CACHE_POSITION, SHARED_LAYOUT: B.ATTENTION_MASK}  # layout -> its position input


class CacheOverflowError(InputError):
    """More tokens than the static KV cache's ``max_len`` slots."""


class StaleCacheError(InputError):
    """An in-place static cache was extended after a later write overwrote some of its slots."""


class _Store:
    """One set of in-place buffers and the history of writes into them.

    ``minima`` holds (write number, first slot) with strictly increasing first slots: the suffix minima of all
    writes, so the lowest slot written after write ``e`` is the first entry numbered above ``e`` (at most MAX
    entries).
    """

    def __init__(self, values: dict) -> None:
        self.values = values
        self.writes = 0
        self.minima: list[tuple[int, int]] = []

    def lowest_write_after(self, epoch: int) -> int | None:
        for number, start in self.minima:
            if number > epoch:
                return start
        return None

    def record(self, start: int) -> int:
        self.writes += 1
        while self.minima and self.minima[-1][1] >= start:
            self.minima.pop()
        self.minima.append((self.writes, start))
        return self.writes


@dataclass
class StaticKVCache(KVCache):
    """:class:`~nora_edge.generate.KVCache` whose ``values`` are (1, kv_heads, MAX, hd) OrtValues.

    Attributes:
        store: the shared in-place buffers (None in functional mode).
        epoch: number of the store's write this cache is the result of (0: none).
    """

    store: _Store | None = field(default=None, repr=False)
    epoch: int = 0


class StaticDecoder(Decoder):
    """A static-KV decoder graph plus the embedding table and the head-row map (see module docstring).

    Args:
        session: the decoder :class:`GraphSession` (graph from ``export_decoder_static``).
        spec: its component spec; meta as :class:`~nora_edge.generate.Decoder` plus ``kv_cache`` ("static"
            or "shared", see the module docstring) and ``max_len``.
        embeddings: (vocab, H) table.
        head_rows: (rows,) Qwen id of each logits row.
        in_place: bind present K/V to the past buffers (None: on the CPU provider only).

    Raises:
        BundleError: meta lacks ``max_len`` / is not a static-KV graph, or the graph's cache shape disagrees.
    """

    def __init__(
        self,
        session: GraphSession,
        spec: B.ComponentSpec,
        embeddings: np.ndarray,
        head_rows: np.ndarray,
        *,
        in_place: bool | None = None,
    ):
        super().__init__(session, spec, embeddings, head_rows)
        layout = spec.meta.get("kv_cache")
        if layout not in KV_LAYOUTS or "max_len" not in spec.meta:
            raise BundleError(
                f"manifest.json: components.decoder.meta must have kv_cache in {sorted(KV_LAYOUTS)} and max_len "
                f"for a fixed-buffer KV decoder (got kv_cache={layout!r}, max_len={spec.meta.get('max_len')!r})"
            )
        self.layout, self.position_input = layout, KV_LAYOUTS[layout]
        self.max_len = int(spec.meta["max_len"])
        shapes = {i.name: i.shape for i in session.session.get_inputs()}
        want = [1, self.num_kv_heads, self.max_len, self.head_dim]
        got = list(shapes.get(self.kv_names[0]) or [])
        # a static graph fixes every dim; a shared one leaves batch and slots symbolic (the buffer sets them)
        fits = got == want if layout == KV_LAYOUT else len(got) == 4 and got[1::2] == want[1::2]
        if self.position_input not in shapes or not fits:
            raise BundleError(
                f"decoder graph: input {self.kv_names[0]} has shape {got}, {self.position_input} "
                f"{'present' if self.position_input in shapes else 'missing'}; meta says a {layout} cache {want}"
            )
        self.in_place = session.device == "cpu" if in_place is None else bool(in_place)

    def empty_cache(self) -> StaticKVCache:
        """Zeroed (1, kv_heads, MAX, hd) buffers on the session's device, holding no tokens."""
        shape = (1, self.num_kv_heads, self.max_len, self.head_dim)
        zeros = np.zeros(shape, dtype=np.float32)
        dev = self.session.device
        values = {
            n: ort.OrtValue.ortvalue_from_numpy(zeros.copy() if dev == "cpu" else zeros, dev, 0)
            for n in self.kv_names
        }
        store = _Store(values) if self.in_place else None
        return StaticKVCache(values, 0, store, 0)

    def _check(self, cache: KVCache, s: int) -> None:
        if not isinstance(cache, StaticKVCache):
            raise InputError(
                f"a static-KV decoder needs a cache from its empty_cache(), got {type(cache).__name__}"
            )
        if cache.length + s > self.max_len:
            raise CacheOverflowError(
                f"static KV cache overflow: {cache.length} tokens held + {s} new > "
                f"max_len {self.max_len} slots "
                "(components.decoder.meta.max_len; re-export with a larger max_len)"
            )
        if cache.store is not None:
            low = cache.store.lowest_write_after(cache.epoch)
            if low is not None and low < cache.length:
                raise StaleCacheError(
                    f"in-place static KV cache of {cache.length} tokens is stale: "
                    f"a later step rewrote slot {low}; "
                    "extend the newest cache, or a prefix no later write went below"
                )

    def truncate(self, cache: StaticKVCache, length: int) -> StaticKVCache:
        """``cache`` holding its first ``length`` tokens: the same buffers, write epoch and store (the slots above
        are never read, and the next write overwrites them)."""
        return StaticKVCache(cache.values, int(length), cache.store, cache.epoch)

    def forward(
        self, embeds: np.ndarray, position_ids: np.ndarray, cache: StaticKVCache, *, every: bool = False
    ) -> tuple[np.ndarray, StaticKVCache]:
        """Run the graph on ``S`` new tokens written at slots ``cache.length .. cache.length + S - 1``.

        Args:
            embeds: (1, S, H) float32.
            position_ids: (3, 1, S) int64 mrope positions.
            cache: a cache from :meth:`empty_cache` or a previous call.
            every: return the ``logits_all`` output (S, rows) instead (a ``--multi-token`` graph).

        Returns:
            logits (rows,) float32 of the last new token (or (S, rows)), and the cache of ``length + S`` tokens.

        Raises:
            CacheOverflowError: ``length + S`` exceeds ``max_len`` (nothing was run or written).
            StaleCacheError: in-place mode, and the cache's slots were overwritten since it was made.
        """
        s = embeds.shape[1]
        self._check(cache, s)
        binding = self.session.session.io_binding()
        binding.bind_cpu_input(B.INPUTS_EMBEDS, np.ascontiguousarray(embeds, dtype=np.float32))
        binding.bind_cpu_input(B.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        if self.layout == KV_LAYOUT:  # the slot of each new token
            binding.bind_cpu_input(CACHE_POSITION, np.arange(cache.length, cache.length + s, dtype=np.int64))
        else:  # GroupQueryAttention reads the tokens held from the mask's sum and width
            binding.bind_cpu_input(B.ATTENTION_MASK, np.ones((1, cache.length + s), dtype=np.int64))
        for name in self.kv_names:
            binding.bind_ortvalue_input(name, cache.values[name])
        binding.bind_output(B.LOGITS_ALL if every else B.LOGITS, "cpu")
        for past, present in zip(self.kv_names, self.present_names, strict=True):
            if self.in_place:
                binding.bind_ortvalue_output(present, cache.values[past])
            else:
                binding.bind_output(present, self.session.device)
        self.session.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        logits = outs[0].numpy()[0]  # (rows,) or (S, rows)
        if self.in_place:
            epoch = cache.store.record(cache.length)
            return logits, StaticKVCache(cache.values, cache.length + s, cache.store, epoch)
        values = dict(zip(self.kv_names, outs[1:], strict=True))
        return logits, StaticKVCache(values, cache.length + s, None, 0)
