"""Runtime == ReferencePolicy on 50 held-out (frame, instruction) pairs, on fixtures whose output is well-formed.

The trained tiny fixtures (``tiny_trained_ckpt``, ``tiny_trained_ckpt_h5``) emit a decodable FAST chunk on almost
every input, so "actions equal the reference's wherever its decode is well formed" is checked on real
decodes, not vacuously. Frames come in varied sizes (the 224x224 resize is part of what is compared).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nora_edge.errors import DetokenizationError
from nora_edge.policy import NoraPolicy

N_PAIRS = 50
MIN_WELL_FORMED = 40  # the trained fixtures measure 50/50; random weights give 0/50


def pairs(n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """Held-out frames of varied sizes with instructions of the synthetic task (never seen in training)."""
    from nora_edge.export.images import random_rgb_image
    from nora_edge.export.synthetic_task import instruction_list

    rng = np.random.default_rng(seed)
    texts = instruction_list()
    out = []
    for i in range(n):
        h, w = int(rng.integers(180, 480)), int(rng.integers(180, 640))
        out.append((random_rgb_image(seed * 1000 + i, h, w), texts[int(rng.integers(len(texts)))]))
    return out


def _export(ckpt: Path, out: Path, head: str) -> Path:
    from nora_edge.export.pipeline import export_bundle

    return export_bundle(ckpt, out, head=head, embeddings_dtype="float32", validate=False, progress=False)


@pytest.fixture(scope="module", params=[1, 5], ids=["h1", "h5"])
def trained(request, tmp_path_factory):
    """(reference, unconstrained full-head policy, constrained action-head policy) of one trained fixture."""
    from nora_edge.export.reference import ReferencePolicy

    ckpt = request.getfixturevalue("tiny_trained_ckpt" if request.param == 1 else "tiny_trained_ckpt_h5")
    root = tmp_path_factory.mktemp(f"trained_h{request.param}")
    full = NoraPolicy.load(
        _export(ckpt, root / "full", "full"), providers="cpu", threads=1, constrained=False
    )
    action = NoraPolicy.load(_export(ckpt, root / "action", "action"), providers="cpu", threads=1)
    return ReferencePolicy.from_pretrained(ckpt), full, action


def test_runtime_equals_reference_on_50_pairs(trained) -> None:
    ref, full, action = trained
    well = 0
    for image, instruction in pairs(N_PAIRS, seed=11):
        r = ref.predict_action_chunk(image, instruction)
        if not r.well_formed:  # NORA would send the q01..q99 midpoint; the runtime refuses
            with pytest.raises(DetokenizationError):
                full.predict_action_chunk(image, instruction)
            continue
        well += 1
        out = full.run_chunk(image, instruction)  # unconstrained, full vocabulary: HF greedy exactly
        np.testing.assert_array_equal(out.ids, r.ids)
        np.testing.assert_allclose(out.actions, r.actions, atol=1e-5, rtol=0)
        con = action.run_chunk(image, instruction)  # production path: action head + automaton
        assert con.stopped == "complete"
        np.testing.assert_array_equal(con.ids, r.ids[:-1])  # the same tokens, no step for <|im_end|>
        np.testing.assert_allclose(con.actions, r.actions, atol=1e-5, rtol=0)
    assert well >= MIN_WELL_FORMED, f"only {well}/{N_PAIRS} reference decodes were well formed"


@pytest.mark.slow
def test_medium_runtime_ids_equal_reference_on_50_pairs(medium_ckpt: Path, tmp_path: Path) -> None:
    """Medium (random weights, T=5): ids equal on 50 pairs; actions wherever the reference is well formed."""
    from nora_edge.export.reference import ReferencePolicy

    ref = ReferencePolicy.from_pretrained(medium_ckpt)
    pol = NoraPolicy.load(_export(medium_ckpt, tmp_path / "m", "full"), providers="cpu", constrained=False)
    for image, instruction in pairs(N_PAIRS, seed=12):
        r = ref.predict_action_chunk(image, instruction)
        if r.well_formed:
            out = pol.run_chunk(image, instruction)
            np.testing.assert_allclose(out.actions, r.actions, atol=1e-5, rtol=0)
        else:
            with pytest.raises(DetokenizationError):
                pol.predict_action_chunk(image, instruction)
            out = None
        np.testing.assert_array_equal(pol.last_ids if out is None else out.ids, r.ids)
