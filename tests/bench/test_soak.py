"""Soak runner: a short run produces a record whose verdict follows from its own numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nora_edge.bench.soak import run_soak
from nora_edge.errors import InputError


def test_short_soak_record_is_consistent(tiny_bundle_h5: Path, tmp_path: Path) -> None:
    r = run_soak(tiny_bundle_h5, steps=20, windows=4, warmup=2, out=tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "soak.json").read_text())
    assert on_disk["steps"] == 20 and len(on_disk["windows"]) == 4
    # the verdict is recomputed from the recorded numbers, not trusted
    growth = r["rss_end_mb"] / r["windows"][0]["rss_mb"] - 1
    assert r["rss_growth_from_warmup"] == pytest.approx(r["rss_end_mb"] / r["rss_after_warmup_mb"] - 1)
    drift = r["windows"][-1]["p99"] / r["windows"][0]["p99"] - 1
    assert growth == pytest.approx(r["rss_growth"]) and drift == pytest.approx(r["p99_drift"])
    assert r["ok"] == (growth < r["limits"]["max_rss_growth"] and abs(drift) < r["limits"]["max_p99_drift"])


def test_soak_counts_chunks_the_model_did_not_fully_choose(tiny_bundle_h5: Path, tmp_path: Path) -> None:
    from nora_edge.bench.steps import bench_images
    from nora_edge.policy import NoraPolicy

    r = run_soak(tiny_bundle_h5, steps=16, windows=2, warmup=0, out=tmp_path, progress=False)
    policy = NoraPolicy.load(tiny_bundle_h5, threads=1, forced_tokens="flag")
    images = bench_images(16, seed=0)
    expect = [
        policy.run_chunk(images[i], "pick up the black bowl and place it on the plate").flagged
        for i in range(16)
    ]
    assert [w["flagged_chunks"] for w in r["windows"]] == [sum(expect[:8]), sum(expect[8:])]
    assert r["flagged_chunks"] == sum(expect)


def test_soak_rejects_too_few_steps(tiny_bundle_h5: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="steps >= windows"):
        run_soak(tiny_bundle_h5, steps=3, windows=4, out=tmp_path, progress=False)
