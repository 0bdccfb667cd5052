"""NoraPolicy: a NORA bundle running on onnxruntime (numpy, onnxruntime and tokenizers only; never torch).

Data flow per chunk:
  image (H, W, 3) uint8 --preprocess--> pixel_values + grid --vision index tensors--> vision graph
  --> image embeds (n, H)
  instruction --tokenizers (cached)--> prompt ids/positions --decoder prefill after the cached constant prefix
  (system turn .. <|vision_start|>, prefilled once at load)--> logits + KV
  --greedy (constrained by the FAST automaton, or HF-parity unconstrained)--> generated ids
  --action ids - base--> FAST ids --byte-table decode (strict)--> normalized (T, D)
  (codec backend "c": libnora_fast (nora_edge.kernels) does the constrained selection and the strict decode to
  integer coefficients; the float64 iDCT below is numpy's either way, so actions are bit-identical)
  --the manifest's postprocess chain (nora_edge.actions.postprocess; default NORA's q01/q99)--> actions (T, D).

Failure policy: every problem raises (InputError for caller input, BundleError for the bundle,
DetokenizationError for an undecodable output, ForcedTokenError for a chunk holding tokens the model did not
choose, see ``nora_edge.chunk``); a robot never gets a made-up action. After an error the policy is still
usable. ``last_timings`` holds the stage times of the last successful chunk.

Threads: one lock covers a whole chunk and the action queue, so several threads may share a policy (calls are
served one at a time). ``close()`` (or ``with``) releases the graph sessions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from nora_edge import bundle as B
from nora_edge.actions.automaton import FastAutomaton
from nora_edge.actions.bytetable import ByteTable
from nora_edge.actions.normalize import NormStats
from nora_edge.chunk import ChunkOutput, ForcedTokenRule, check_forced_tokens
from nora_edge.errors import BundleError, DetokenizationError, InputError
from nora_edge.generate import Decoder, GenerationResult, GreedyConfig, KVCache, greedy, prefill
from nora_edge.kernels import SEQ_STATUS, FastKernels, codec_kernels
from nora_edge.preprocess import ImageSpec, preprocess_image, validate_image
from nora_edge.prompt import PromptBuilder
from nora_edge.sessions import GraphSession, open_session
from nora_edge.vision_index import compute_vision_index

log = logging.getLogger(__name__)

__all__ = ["ChunkOutput", "NoraPolicy", "check_bundle_consistency"]


def _vision_params(bundle: B.Bundle) -> dict:
    meta = bundle.components["vision"].meta
    out = {}
    for key in ("spatial_merge_size", "window_size", "patch_size"):
        if key not in meta:
            raise BundleError(f"manifest.json: components.vision.meta lacks field '{key}'")
        out[key] = int(meta[key])
    return out


def check_bundle_consistency(bundle: B.Bundle) -> None:
    """Cross-check manifest sections the runtime combines.

    Raises:
        BundleError: naming the disagreeing fields.
    """
    a, c = bundle.actions, bundle.codec
    if c.vocab_size != a.count:
        raise BundleError(f"manifest.json: codec.vocab_size {c.vocab_size} != actions.count {a.count}")
    dims = {ns.action_dim for ns in bundle.norm_stats.values()}
    if dims != {c.action_dim}:
        raise BundleError(
            f"manifest.json: codec.action_dim {c.action_dim} but norm_stats have dims {sorted(dims)}"
        )
    dec = bundle.components["decoder"]
    logits = [t for t in dec.outputs if t.name == B.LOGITS]
    if not logits:
        raise BundleError(f"manifest.json: components.decoder has no output '{B.LOGITS}'")
    rows = logits[0].shape[-1]
    if isinstance(rows, int) and rows != a.head_rows.size:
        raise BundleError(
            f"manifest.json: decoder logits have {rows} rows but actions.head_rows lists {a.head_rows.size}"
        )


DECODINGS = ("plain", "multi-token")


class NoraPolicy:
    """NORA on onnxruntime. Build with :meth:`load`.

    Attributes:
        bundle: the loaded :class:`~nora_edge.bundle.Bundle`.
        constrained: True = automaton-constrained decoding (always decodable); False = HF greedy parity.
        forced_tokens: the :class:`~nora_edge.chunk.ForcedTokenRule` applied to every chunk.
        time_horizon, action_dim: T and D of a chunk.
        last_timings: SECONDS per stage of the last successful chunk: preprocess, vision, prefill,
            decode_steps (list), decode (sum), detokenize, total; plus new_tokens, token_classes (count per
            class) and providers (execution providers per graph).
        last_output: the last :class:`ChunkOutput`.
        last_ids: (N,) generated ids of the last generation, set even when its decode then failed.
        codec_backend: "c" (libnora_fast selects and decodes) or "numpy"; also in ``last_timings``.
        kernels: the :class:`~nora_edge.kernels.FastKernels` context, or None.
    """

    def __init__(
        self,
        bundle: B.Bundle,
        vision: GraphSession,
        decoder: Decoder,
        prompt: PromptBuilder,
        table: ByteTable,
        automaton: FastAutomaton | None,
        image_spec: ImageSpec,
        constrained: bool,
        forced_tokens: ForcedTokenRule | None = None,
        kernels: FastKernels | None = None,
        multi_token=None,
    ) -> None:
        self.bundle = bundle
        self.vision = vision
        self.decoder = decoder
        self.prompt = prompt
        self.table = table
        self.automaton = automaton
        self.image_spec = image_spec
        self.constrained = constrained
        self.forced_tokens = forced_tokens or ForcedTokenRule()
        self.kernels = kernels
        self.codec_backend = "c" if kernels is not None else "numpy"
        self.multi_token = multi_token  # a nora_edge.multitoken.MultiTokenDecoding, or None (plain loop)
        self._lock = threading.RLock()
        self._closed = False
        self.time_horizon = bundle.codec.time_horizon
        self.action_dim = bundle.codec.action_dim
        self._vision_params = _vision_params(bundle)
        self._vision_inputs = set(vision.input_names)
        gen = bundle.generation
        self._greedy = GreedyConfig(
            automaton=automaton,
            action_base=bundle.actions.base,
            eos_ids=tuple(gen.eos_token_ids),
            max_new_tokens=gen.max_new_tokens,
            max_length=gen.max_length,
            repetition_penalty=gen.repetition_penalty,
            kernels=kernels,
        )
        self._prefix = self._prefill_prefix()
        self._queue: deque[np.ndarray] = deque()
        self._queue_key: tuple[str, str | None] | None = None
        self.last_timings: dict = {}
        self.last_output: ChunkOutput | None = None
        self.last_ids: np.ndarray | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        bundle: str | Path | B.Bundle,
        providers: str | Sequence[str] = "auto",
        threads: int | None = None,
        constrained: bool = True,
        *,
        forced_tokens: str = "raise",
        max_repaired: int = 0,
        spinning: bool = False,
        shared_pool: bool = False,
        verify: bool = True,
        cache_dir: str | Path | None = None,
        kernels: str = "auto",
        decoding: str = "plain",
        multi_token=None,
    ) -> NoraPolicy:
        """Load a bundle and open its graphs.

        Args:
            bundle: bundle directory (or an already loaded Bundle).
            providers: "auto" (TensorRT for graphs built for it -> CUDA -> CPU), a provider name or a list
                (see ``sessions``); ``last_timings["providers"]`` says what each graph runs on.
            threads: intra-op threads per session (None = onnxruntime's default).
            constrained: automaton-constrained decoding (default) or HF-parity unconstrained decoding, which
                needs a head="full" bundle (an action head's argmax is not HF's).
            forced_tokens: "raise" (default): a chunk with a forced_continue token or more than
                ``max_repaired`` repaired tokens raises ForcedTokenError; "flag": returned with its token
                classes (``ChunkOutput.flagged``).
            max_repaired: repaired tokens a chunk may hold under "raise".
            spinning: let idle pool threads spin (lower latency, burns a core between calls; default off).
            shared_pool: run both graphs on onnxruntime's process-wide thread pool (its spinning stays on).
            verify: check every bundle file's sha256 (False: sizes only).
            cache_dir: TensorRT engine cache folder.
            kernels: FAST codec backend: "auto" (libnora_fast when it loads, else numpy with one warning per
                process), "c" (InputError when the library is unavailable) or "numpy". The context comes from
                the bundle's ``codec.files.native`` tables when listed, else is built from the manifest.
            decoding: "plain" (the sequential greedy loop, one decoder call per token) or "multi-token"
                (:mod:`nora_edge.multitoken`: proposals verified several per decoder call, ids identical to the plain
                loop; needs a bundle exported with ``--multi-token``). ``last_timings`` then holds ``decoder_calls``
                and the chunk's ``multi_token`` counters.
            multi_token: a :class:`~nora_edge.multitoken.MultiTokenConfig` for ``decoding="multi-token"`` (default
                settings when None).

        The instruction length limit is the manifest's ``prompt.max_instruction_tokens`` when present, else
        512 tokens (a guard against runaway input, far above any robot instruction).

        Raises:
            BundleError: missing/tampered/incompatible bundle or graphs that disagree with the manifest.
            InputError: bad providers/threads/kernels/decoding, kernels="c" without libnora_fast, or
                decoding="multi-token" on a decoder with fixed KV buffers.
            KernelsError: kernels="auto" with $NORA_EDGE_KERNELS_LIB naming a library that does not load.
        """
        rule = ForcedTokenRule(forced_tokens, max_repaired)
        if kernels not in ("auto", "c", "numpy"):
            raise InputError(f"kernels must be 'auto', 'c' or 'numpy', got {kernels!r}")
        if decoding not in DECODINGS:
            raise InputError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        if multi_token is not None and decoding != "multi-token":
            raise InputError(
                f'multi_token settings given with decoding={decoding!r}; use decoding="multi-token"'
            )
        b = bundle if isinstance(bundle, B.Bundle) else B.Bundle.load(bundle, verify=verify)
        check_bundle_consistency(b)
        if not constrained and b.actions.head != "full":
            raise InputError(
                f"{b.path}: constrained=False needs a head='full' bundle; this bundle's head is "
                f"'{b.actions.head}', whose argmax only sees action and end rows (not HF greedy parity)"
            )
        cdir = Path(cache_dir) if cache_dir is not None else None
        sessions = {
            name: open_session(
                name, b.file(b.components[name].file), b.components[name], providers=providers,
                threads=threads, cache_dir=cdir, spinning=spinning, shared_pool=shared_pool,
                tensorrt=b.manifest.get("tensorrt"),
            )
            for name in ("vision", "decoder")
        }  # fmt: skip
        emb = b.embeddings
        try:
            table = np.load(b.file(emb["file"]), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, KeyError) as e:
            raise BundleError(f"{b.path}: cannot read the embeddings table ({e})") from e
        if list(table.shape) != list(emb.get("shape", table.shape)):
            raise BundleError(f"{b.path}: embeddings shape {table.shape} != manifest {emb.get('shape')}")
        dspec = b.components["decoder"]
        if dspec.meta.get("kv_cache") in ("static", "shared"):  # TensorRT / fused flavors: fixed KV buffers
            from nora_edge.static_kv import StaticDecoder

            decoder = StaticDecoder(sessions["decoder"], dspec, table, b.actions.head_rows)
        else:
            decoder = Decoder(sessions["decoder"], dspec, table, b.actions.head_rows)
        try:
            tokenizer = Tokenizer.from_file(str(b.file(b.prompt.tokenizer)))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise BundleError(f"{b.path / b.prompt.tokenizer}: not a readable tokenizer ({e})") from e
        forbidden = frozenset(tokenizer.get_added_tokens_decoder()) | frozenset(
            range(b.actions.base, b.actions.base + b.actions.count)
        )
        prompt = PromptBuilder(
            b.prompt.prefix_ids,
            b.prompt.image_pad_id,
            b.prompt.vision_end_id,
            b.prompt.suffix_ids,
            tokenizer,
            _vision_params(b)["spatial_merge_size"],
            max_instruction_tokens=int(b.manifest["prompt"].get("max_instruction_tokens", 512)),
            forbidden_ids=forbidden,
        )
        byte_table = ByteTable.load(b.file(b.codec.byte_table))
        automaton = (
            FastAutomaton(byte_table, b.codec.time_horizon, b.codec.action_dim) if constrained else None
        )
        image_spec = ImageSpec.from_manifest(b.image)
        fixed = b.components["vision"].meta.get("grid_thw")
        if fixed is not None and tuple(fixed) != image_spec.grid_thw():
            raise BundleError(
                f"manifest.json: the vision graph is specialised to grid {list(fixed)} but the image section "
                f"gives grid {list(image_spec.grid_thw())}"
            )
        fast = codec_kernels(kernels, b, byte_table, automaton)
        multi = None
        if decoding == "multi-token":
            from nora_edge.multitoken import MultiTokenDecoding, guarantee_of

            multi = MultiTokenDecoding(decoder, multi_token)
            multi.guaranteed = guarantee_of(b, multi.config)
            multi.seed_from(b, table.shape[0])
        return cls(
            b, sessions["vision"], decoder, prompt, byte_table, automaton, image_spec, constrained, rule, fast,
            multi,
        )  # fmt: skip

    def _prefill_prefix(self) -> KVCache:
        """KV of the constant prompt prefix (system turn .. <|vision_start|>), computed once."""
        ids = self.prompt.prefix_ids
        pos = np.broadcast_to(np.arange(ids.size, dtype=np.int64), (3, 1, ids.size)).copy()  # (3, 1, P)
        _, cache = prefill(self.decoder, ids, pos, self.decoder.empty_cache())
        return cache

    # ------------------------------------------------------------------ inference
    def norm_stats(self, unnorm_key: str | None) -> NormStats:
        """Stats for ``unnorm_key``; None picks the only key (InputError when there are several)."""
        stats = self.bundle.norm_stats
        if unnorm_key is None:
            if len(stats) != 1:
                raise InputError(f"unnorm_key is required: the bundle has {len(stats)} keys {sorted(stats)}")
            return next(iter(stats.values()))
        if not isinstance(unnorm_key, str) or unnorm_key not in stats:
            raise InputError(f"unknown unnorm_key {unnorm_key!r}; the bundle has {sorted(stats)}")
        return stats[unnorm_key]

    def image_embeds(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        """Run the vision graph: (patches, 1176) pixel values -> (merged, H) float32 embeddings."""
        feeds = {B.PIXEL_VALUES: pixel_values}
        if len(self._vision_inputs) > 1:  # dynamic graph: host index tensors
            index = compute_vision_index(grid_thw, **self._vision_params)
            feeds.update({k: v for k, v in index.graph_feeds().items() if k in self._vision_inputs})
        out = self.vision.run(feeds, [B.IMAGE_EMBEDS])[B.IMAGE_EMBEDS]
        return np.asarray(out, dtype=np.float32)

    @property
    def providers(self) -> dict[str, list[str]]:
        """Execution providers each graph session actually runs on."""
        return {"vision": list(self.vision.providers), "decoder": list(self.decoder.session.providers)}

    @property
    def mode(self) -> str:
        """ "constrained" or "hf-parity"."""
        return "constrained" if self.constrained else "hf-parity"

    def run_chunk(self, image: np.ndarray, instruction: str, unnorm_key: str | None = None) -> ChunkOutput:
        """One full inference with every intermediate (see :class:`ChunkOutput`); thread-safe.

        Raises:
            InputError: bad image, empty/over-long instruction, unknown unnorm key, closed policy.
            DetokenizationError: the generated ids do not decode into exactly (T, D).
            ForcedTokenError: the chunk holds tokens the model did not choose beyond ``forced_tokens``.
        """
        with self._lock:
            self._check_open()
            return self._run_chunk(image, instruction, unnorm_key)

    def prefill_prompt(self, prompt, embeds: np.ndarray) -> tuple[np.ndarray, KVCache]:
        """Prefill a built prompt after the cached prefix, its image run replaced by ``embeds`` (n, H).

        Returns:
            logits (rows,) of the last prompt token and the KV cache after the prompt.

        Raises:
            BundleError: the vision graph's embedding count differs from the prompt's image tokens.
        """
        if embeds.shape[0] != prompt.num_image_tokens:
            raise BundleError(
                f"vision graph returned {embeds.shape[0]} embeddings, the prompt holds {prompt.num_image_tokens}"
            )
        p = prompt.image_start
        return prefill(
            self.decoder,
            prompt.input_ids[p:],
            prompt.position_ids[:, :, p:],
            self._prefix,
            embeds,
            image_start=0,
        )

    def _run_chunk(self, image: np.ndarray, instruction: str, unnorm_key: str | None) -> ChunkOutput:
        t0 = time.perf_counter()
        self.last_ids = self.last_output = None
        chain = self.bundle.postprocess
        stats = chain.stats_for(self.bundle.norm_stats, unnorm_key)  # InputError before any graph runs
        self.prompt.instruction_ids(instruction)  # validate before any graph runs
        pixel_values, grid = preprocess_image(image, self.image_spec)
        t1 = time.perf_counter()
        embeds = self.image_embeds(pixel_values, grid)
        t2 = time.perf_counter()
        prompt = self.prompt.build(instruction, grid)
        logits, cache = self.prefill_prompt(prompt, embeds)
        t3 = time.perf_counter()
        multi = None
        if self.multi_token is not None:
            result, multi = self.multi_token.generate(
                logits, cache, prompt.input_ids, prompt.rope_delta, self._greedy, instruction
            )
        else:
            result = greedy(self.decoder, logits, cache, prompt.input_ids, prompt.rope_delta, self._greedy)
        self.last_ids = result.ids  # kept even when the decode below fails (parity studies, logs)
        t4 = time.perf_counter()
        fast_ids, normalized = self.detokenize(result)
        actions = chain.apply(normalized, stats)  # the manifest's chain, float64 (default: NORA's q01/q99)
        if not np.isfinite(actions).all():
            raise DetokenizationError(f"decoded actions are not finite: {actions.tolist()}")
        t5 = time.perf_counter()
        out = ChunkOutput(
            actions, normalized, result.ids, fast_ids, result.stopped, chain.label(stats),
            result.classes, result.top_ids, self.mode,
        )  # fmt: skip
        if (
            out.flagged
        ):  # "raise" refuses it below; under "flag" the caller opted in and reads ChunkOutput.flagged
            log.info("chunk holds tokens the model did not choose: %s", out.class_counts)
        check_forced_tokens(out, self.forced_tokens)
        self.last_timings = {
            "preprocess": t1 - t0,
            "vision": t2 - t1,
            "prefill": t3 - t2,
            "decode_steps": list(result.step_seconds),
            "decode": t4 - t3,
            "detokenize": t5 - t4,
            "total": t5 - t0,
            "new_tokens": int(result.ids.size),
            "token_classes": out.class_counts,
            "providers": self.providers,
            "codec_backend": self.codec_backend,
            "decoding": "plain" if multi is None else "multi-token",
            "decoder_calls": len(result.step_seconds) if multi is None else multi.decoder_calls,
        }
        if multi is not None:
            self.last_timings["multi_token"] = multi.to_json()
        self.last_output = out
        return out

    def detokenize(self, result: GenerationResult) -> tuple[np.ndarray, np.ndarray]:
        """Generated ids -> (FAST ids (K,), normalized (T, D)); strict, raises DetokenizationError."""
        base, count = self.bundle.actions.base, self.bundle.actions.count
        ids = result.ids
        fast_ids = ids[(ids >= base) & (ids < base + count)] - base  # (K,) NORA: every action-range id
        if fast_ids.size == 0:
            raise DetokenizationError(
                f"no action tokens were generated (stopped: {result.stopped}, ids {ids.tolist()[:12]})"
            )
        if self.kernels is None:
            normalized = self.table.decode_chunk(fast_ids, self.time_horizon, self.action_dim)  # (T, D)
            return fast_ids.astype(np.int64), np.asarray(normalized, dtype=np.float64)
        status, ints, _ = self.kernels.decode_one(fast_ids)  # (T*D,) int32
        if status != 0:
            self.table.decode_chunk(fast_ids, self.time_horizon, self.action_dim)  # raises the exact error
            raise DetokenizationError(
                f"codec kernels: decode status '{SEQ_STATUS[status]}' where the numpy decode succeeds"
            )
        # the numpy decode's own float64 arithmetic on the same integers: bit-identical
        normalized = self.table.actions_from_coefficients(ints.reshape(self.time_horizon, self.action_dim))
        return fast_ids.astype(np.int64), normalized

    def predict_action_chunk(
        self, image: np.ndarray, instruction: str, unnorm_key: str | None = None
    ) -> np.ndarray:
        """Actions for one observation.

        Args:
            image: (H, W, 3) uint8 RGB frame.
            instruction: task text (passed raw, as NORA does).
            unnorm_key: norm-stats key; None picks the only one.

        Returns:
            (T, D) float64 actions in robot units.
        """
        return self.run_chunk(image, instruction, unnorm_key).actions

    def select_action(self, image: np.ndarray, instruction: str, unnorm_key: str | None = None) -> np.ndarray:
        """Next action from the queue, refilled with a new chunk when empty.

        The queue is dropped when the instruction or unnorm key changes. The image is validated on every call
        but only run through the model when a new chunk is predicted.

        Returns:
            (D,) float64 action.
        """
        validate_image(image)
        key = (instruction, unnorm_key)
        with self._lock:
            if key != self._queue_key:
                self._queue.clear()
            if not self._queue:
                chunk = self.predict_action_chunk(image, instruction, unnorm_key)
                self._queue.extend(np.array(row) for row in chunk)
                self._queue_key = key
            return self._queue.popleft()

    def reset(self) -> None:
        """Forget queued actions (call at episode start)."""
        with self._lock:
            self._queue.clear()
            self._queue_key = None

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise InputError("this NoraPolicy was closed; load the bundle again")

    def close(self) -> None:
        """Release the graph sessions (idempotent); any later inference raises InputError."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._queue_key = None
            self._prefix = None
            self.vision = None
            self.decoder.session = None
            if self.kernels is not None:
                self.kernels.close()

    def __enter__(self) -> NoraPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
