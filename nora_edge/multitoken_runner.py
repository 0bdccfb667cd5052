"""Plain and multi-token decoding of one policy, side by side: what benchmarks, the export's validation and the
tests compare.

Data flow: frame + instruction --the policy's preprocessing, vision graph, cached prefix and prefill (shared)-->
first logits + KV --:meth:`MultiTokenRunner.plain` (``generate.greedy``) | :meth:`MultiTokenRunner.multitoken`
(the policy's :class:`~nora_edge.multitoken.MultiTokenDecoding`)--> results with decode seconds;
:func:`batched_vs_sequential`: the plain ids re-run as one verify call vs the sequential steps' logits.
"""

from __future__ import annotations

import time

import numpy as np

from nora_edge.drafts import DraftTable
from nora_edge.errors import InputError
from nora_edge.generate import GenerationResult, GreedySelector, decode_step, greedy
from nora_edge.multitoken import (
    DEFAULT_MAX_DRAFT,
    DEFAULT_TIE_MARGIN,
    MultiTokenConfig,
    MultiTokenStats,
    VerifyDecoder,
)


def batched_vs_sequential(runner: MultiTokenRunner, image: np.ndarray, instruction: str) -> dict:
    """The plain loop's ids re-run as ONE verify call from the prefill, against the sequential steps' logits.

    What the ``tie_margin`` guard has to cover: a graph computing in fp32 differs in the last bits (GEMM shapes);
    one computing with int8 activations (MatMulNBits ``accuracy_level`` 4) can differ by a quantization step
    wherever a tiny difference upstream flips an activation's rounding.

    Returns:
        positions compared, bitwise-equal positions, max |difference| (logit units), and ``changed``: 1 if the
        selection on the batched logits (teacher-forced) departs from the plain ids, else 0.
    """
    pol = runner.policy
    prompt, logits0, cache0 = runner._prefill(image, instruction)
    ids = greedy(pol.decoder, logits0, cache0, prompt.input_ids, prompt.rope_delta, pol._greedy).ids
    feed, index = ids[:-1], int(prompt.input_ids.size)
    if feed.size == 0:
        return {"positions": 0, "bitwise": 0, "max_abs": 0.0, "changed": 0}
    seq, cache = [], cache0
    for j, t in enumerate(feed.tolist()):
        lg, cache = decode_step(pol.decoder, t, index + j, prompt.rope_delta, cache)
        seq.append(lg)
    ver, _ = runner.verify.forward(feed, index, prompt.rope_delta, cache0)  # (N-1, rows)
    seq = np.stack(seq)  # (N-1, rows)
    sel = GreedySelector(pol.decoder, prompt.input_ids, pol._greedy)
    sel.choose(logits0)
    changed = 0
    for j in range(feed.size):
        if sel.choose(ver[j]) != int(ids[j + 1]):
            changed = 1
            break
    return {
        "positions": int(feed.size),
        "bitwise": int(sum(np.array_equal(a, b) for a, b in zip(seq, ver, strict=True))),
        "max_abs": float(np.abs(seq - ver).max()),
        "changed": changed,
    }


class MultiTokenRunner:
    """Plain and multi-token chunks of one ``decoding="multi-token"`` NoraPolicy, side by side (benchmarks, tests).

    Both paths share the policy's preprocessing, vision graph, cached prompt prefix and prefill; they differ
    only in the decode loop. The draft table learns from every multi-token chunk (keyed by instruction).

    Args:
        policy: a NoraPolicy loaded with ``decoding="multi-token"``.
    """

    def __init__(self, policy) -> None:
        if policy.multi_token is None:
            raise InputError('MultiTokenRunner needs a policy loaded with decoding="multi-token"')
        self.policy = policy

    @property
    def drafts(self) -> DraftTable:
        """The policy's draft table (assignable)."""
        return self.policy.multi_token.drafts

    @drafts.setter
    def drafts(self, table: DraftTable) -> None:
        self.policy.multi_token.drafts = table

    @property
    def verify(self) -> VerifyDecoder:
        """The policy's :class:`VerifyDecoder`."""
        return self.policy.multi_token.verify

    @classmethod
    def load(cls, bundle, **policy_kwargs) -> MultiTokenRunner:
        """``NoraPolicy.load(bundle, decoding="multi-token", **policy_kwargs)`` wrapped.

        Raises:
            BundleError: the bundle's decoder has no ``logits_all`` output (export it with ``--multi-token``).
        """
        from nora_edge.policy import NoraPolicy

        return cls(NoraPolicy.load(bundle, decoding="multi-token", **policy_kwargs))

    def _prefill(self, image: np.ndarray, instruction: str):
        from nora_edge.preprocess import preprocess_image

        pol = self.policy
        pixel_values, grid = preprocess_image(image, pol.image_spec)
        prompt = pol.prompt.build(instruction, grid)
        logits, cache = pol.prefill_prompt(prompt, pol.image_embeds(pixel_values, grid))
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
        gate_rate: float = 0.0,
        adaptive_draft: bool = False,
    ) -> tuple[GenerationResult, MultiTokenStats, float]:
        """Multi-token decode of one chunk: (result, stats, decode seconds); settings as :class:`MultiTokenConfig`."""
        cfg = MultiTokenConfig(max_draft, tie_margin, learn, gate_rate, adaptive_draft)
        prompt, logits, cache = self._prefill(image, instruction)
        t0 = time.perf_counter()
        pol = self.policy
        res, stats = pol.multi_token.generate(
            logits, cache, prompt.input_ids, prompt.rope_delta, pol._greedy, instruction, cfg
        )
        return res, stats, time.perf_counter() - t0
