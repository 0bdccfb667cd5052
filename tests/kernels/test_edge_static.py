"""libnora_edge on the TensorRT-flavor bundle (``--target tensorrt``: the static KV decoder written at
``cache_position``, kernels/src/edge/policy_step.cpp's Static layout) run by onnxruntime's CPU provider.

Reference: the Python runtime on the same bundle (nora_edge/static_kv.py ``StaticDecoder``, its plain loop and
``MultiTokenRunner``'s multi-token loop), chunk by chunk on the parity set run twice: C plain ids == Python plain
ids, C multi-token ids == them, and C's decode-loop counters == Python's ``MultiTokenStats`` from the same
seeded draft table (the bundle ships ``drafts.json``). TensorRT itself is not here (no GPU on this machine); the
graph is the one a TensorRT engine would be built from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nora_edge.bundle import Bundle
from nora_edge.multitoken import MultiTokenRunner

from .test_edge_multitoken import CALIB, PARITY, _edge, calibration, fresh_table, run_both


@pytest.fixture(scope="module")
def static_bundle(tiny_trained_ckpt_h5: Path, tmp_path_factory) -> Path:
    """The trained tiny checkpoint exported for TensorRT (static KV) with logits_all and a draft file."""
    from nora_edge.export.pipeline import export_bundle

    out = tmp_path_factory.mktemp("edgestatic") / "trt_mt"
    return export_bundle(
        tiny_trained_ckpt_h5, out, target="tensorrt", multi_token=True, progress=False, validate=False,
        calibration=calibration(7, CALIB),
    )  # fmt: skip


def test_static_layout_plain_and_multi_token_equal_the_python_runtime(edge_runtime, static_bundle):
    b = Bundle.load(static_bundle)
    assert b.components["decoder"].meta["kv_cache"] == "static" and b.manifest["drafts"]["chunks"] == CALIB
    runner = MultiTokenRunner.load(static_bundle, threads=1, forced_tokens="flag")
    assert runner.drafts.by_key == fresh_table(static_bundle, True).by_key  # seeded from the same file
    pairs = PARITY + PARITY
    plain = _edge(edge_runtime, static_bundle)
    runs = run_both(edge_runtime, static_bundle, runner, pairs)
    n = {"chunks": 0, "plain_calls": 0, "multi_calls": 0, "verify": 0}
    for (image, text), r in zip(pairs, runs, strict=True):
        p = plain.step(image, text)
        py_plain, _ = runner.plain(image, text)
        m = r["c"]
        assert p.ids.tolist() == py_plain.ids.tolist() == m.ids.tolist() == r["py_ids"], text
        np.testing.assert_array_equal(m.actions, p.actions)
        assert m.counters == r["py"], text
        n["chunks"] += 1
        n["plain_calls"] += p.counters["decoder_calls"]
        n["multi_calls"] += m.counters["decoder_calls"]
        n["verify"] += m.counters["verify_calls"]
    assert n["chunks"] == 2 * len(PARITY) == 24 and n["verify"] >= len(PARITY)
    assert n["multi_calls"] < n["plain_calls"], n
