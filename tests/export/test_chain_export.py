"""The action chain end to end: LeRobot ``meta/stats.json`` + gripper steps at export -> manifest -> NoraPolicy.

One export (tiny fixture checkpoint, validate=False). The reference is written here: LeRobot's Unnormalize
MIN_MAX (huggingface/lerobot ``lerobot/common/policies/normalize.py``) then NORA's ``normalize_gripper_action``
(binarize) and ``invert_gripper_action`` (declare-lab/nora ``inference/nora.py``), applied to
``ChunkOutput.normalized``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nora_edge.bundle import Bundle, format_info
from nora_edge.checkpoint import NoraCheckpoint
from nora_edge.errors import BundleError, ExportError, InputError
from tests.lerobot_reference import nora_readme_actions, write_dataset

GRIPPER = ("rescale", "binarize", "invert")


@pytest.fixture(scope="module")
def chain_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from nora_edge.export.pipeline import export_bundle

    dim = NoraCheckpoint.load(tiny_ckpt).action_dim
    root, action = write_dataset(tmp_path_factory.mktemp("lerobot_ds"), dim)
    out = tmp_path_factory.mktemp("chain") / "bundle"
    path = export_bundle(tiny_ckpt, out, validate=False, progress=False, stats=root, gripper=GRIPPER)
    return path, action


def test_export_writes_chain_and_runtime_applies_it(chain_bundle, make_rgb_image):
    from nora_edge.policy import NoraPolicy

    path, action = chain_bundle
    b = Bundle.load(path)
    assert [s["op"] for s in b.manifest["postprocess"]] == ["unnormalize"] + [f"gripper_{g}" for g in GRIPPER]
    first = b.manifest["postprocess"][0]
    assert first["mode"] == "min_max" and first["source"] == "meta/stats.json[action]"
    assert first["min"] == action["min"] and first["max"] == action["max"]
    text = format_info(b.info())
    assert "postprocess    1. unnormalize min_max" in text and "4. gripper_invert dim -1" in text
    mn, mx = np.array(action["min"]), np.array(action["max"])
    compared = 0
    with NoraPolicy.load(path, providers="cpu", threads=1, forced_tokens="flag") as policy:
        for seed in range(3):
            out = policy.run_chunk(make_rgb_image(seed=seed), "pick up the red block")
            want = nora_readme_actions(out.normalized, mn, mx)
            np.testing.assert_allclose(out.actions, want, rtol=0, atol=1e-12)
            assert out.actions.dtype == np.float64 and out.unnorm_key == "meta/stats.json[action]"
            compared += out.actions.size
        with pytest.raises(InputError, match="fixes its statistics"):
            policy.run_chunk(make_rgb_image(seed=0), "pick up the red block", "fixture_robot")
    assert compared == 3 * b.codec.time_horizon * b.codec.action_dim


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_inconsistent_manifest_chain_fails_load(chain_bundle, tmp_path):
    path, _ = chain_bundle
    dim = Bundle.load(path, verify=False).codec.action_dim

    def short_min(m):
        m["postprocess"][0]["min"] = m["postprocess"][0]["min"][:-1]

    def dim_out_of_range(m):
        m["postprocess"][1]["dim"] = dim

    def twice(m):
        m["postprocess"].append({"op": "gripper_invert", "dim": dim - 1})

    def bad_key(m):
        m["postprocess"][0] = {"op": "unnormalize", "mode": "q01_q99", "key": "no_such_robot", "source": "n"}

    cases = [
        (short_min, f"postprocess[0].min: has {dim - 1} dims"),
        (dim_out_of_range, f"postprocess[1].dim: {dim} is out of range"),
        (twice, f"gripper_invert on dim {dim - 1} applied twice"),
        (bad_key, "unnorm key 'no_such_robot' does not exist"),
    ]
    for i, (edit, message) in enumerate(cases):
        bad = _edited(path, tmp_path / f"b{i}", edit)
        with pytest.raises(BundleError, match="manifest.json: postprocess") as e:
            Bundle.load(bad, verify=False)
        assert message in str(e.value), (message, str(e.value))
    older = _edited(path, tmp_path / "older", lambda m: m.pop("postprocess"))
    chain = Bundle.load(older, verify=False).postprocess
    assert chain.to_json() == [
        {"op": "unnormalize", "mode": "q01_q99", "key": None, "source": "norm_stats.json"}
    ]
    assert len(cases) == 4


def test_stats_errors_at_export(tiny_ckpt: Path, tmp_path: Path):
    from nora_edge.export.pipeline import export_bundle

    dim = NoraCheckpoint.load(tiny_ckpt).action_dim
    rng = np.random.default_rng(0)
    mn = rng.uniform(-1, 0, dim)
    cases = [
        ({"min": mn[:-1].tolist()}, {}, f"has {dim - 1} dims, the action dim is {dim}"),
        ({"max": [float("nan")] * dim}, {}, "action.max: holds NaN/inf"),
        ({"max": mn.tolist(), "min": mn.tolist()}, {}, "min >= max at dims"),
        ({"std": [1.0] * (dim - 1) + [-1.0]}, {"norm_mode": "mean_std"}, "std <= 0 at dims"),
        ({}, {"stats_key": "actions"}, "no feature 'actions'"),
        ({}, {"norm_mode": "q99"}, "norm mode"),
        ({}, {"gripper": ("invert", "invert")}, "applied twice"),
        ({}, {"gripper": (f"rescale:{dim}",)}, "out of range"),
        ({}, {"gripper": ("open",)}, "--gripper"),
    ]
    for i, (override, kwargs, message) in enumerate(cases):
        root, _ = write_dataset(tmp_path / f"ds{i}", dim, **override)
        out = tmp_path / f"out{i}"
        with pytest.raises(ExportError) as e:
            export_bundle(tiny_ckpt, out, validate=False, progress=False, stats=root, **kwargs)
        assert message in str(e.value), (message, str(e.value))
        assert "stats.json" in str(e.value) or "gripper" in message or "--gripper" in str(e.value)
        assert not out.exists()
    with pytest.raises(ExportError, match="statistics file not found"):
        export_bundle(tiny_ckpt, tmp_path / "none", validate=False, progress=False, stats=tmp_path / "nope")
    assert len(cases) == 9


def test_cli_export_chain_options_reach_the_exporter(tiny_ckpt: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from nora_edge.cli import app

    dim = NoraCheckpoint.load(tiny_ckpt).action_dim
    root, _ = write_dataset(tmp_path / "ds", dim, std=[1.0] * (dim - 1) + [0.0])
    base = ["export", str(tiny_ckpt), "--out", str(tmp_path / "b"), "--no-validate", "--stats", str(root)]
    cases = [
        (["--stats-key", "actions"], "no feature 'actions'"),
        (["--norm-mode", "mean_std"], f"std <= 0 at dims [{dim - 1}]"),
        (["--gripper", "rescale", "--gripper", f"invert:{dim}"], f"postprocess (stats {root / 'meta'}"),
        (["--gripper", "invert", "--gripper", "invert:-1"], f"gripper_invert on dim {dim - 1} applied twice"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 2 and "ExportError" in result.output, result.output
        assert message in " ".join(result.output.split()), (message, result.output)
    assert not (tmp_path / "b").exists() and len(cases) == 4


def test_quantized_copy_keeps_the_chain(chain_bundle, tmp_path, make_rgb_image):
    """Quantizing a bundle with fixed (LeRobot) statistics runs its studies without an unnorm key and carries
    the chain over unchanged; the quantized policy's actions go through it."""
    import warnings

    from nora_edge.export.quantize import quantize_bundle
    from nora_edge.policy import NoraPolicy

    path, _ = chain_bundle
    with warnings.catch_warnings():  # random tiny weights miss the int8 gate: accepted, and recorded
        warnings.simplefilter("ignore")
        out = quantize_bundle(
            path, tmp_path / "q", "int8", n_calibration=2, n_fidelity=2, accept_degraded=True
        )
    src, q = Bundle.load(path), Bundle.load(out)
    assert q.manifest["postprocess"] == src.manifest["postprocess"]
    assert not q.postprocess.takes_unnorm_key
    policy = NoraPolicy.load(out, providers="cpu", threads=1, forced_tokens="flag")
    chunk = policy.run_chunk(make_rgb_image(seed=4), "pick up the cup")
    assert chunk.actions.shape == chunk.normalized.shape


def test_cli_mask_reaches_the_chain_and_the_runtime(tiny_ckpt: Path, tmp_path: Path, make_rgb_image):
    """--mask keeps the masked dimension as the model produced it (NORA's q01/q99 elsewhere, every key)."""
    from typer.testing import CliRunner

    from nora_edge.cli import app
    from nora_edge.policy import NoraPolicy

    dim = NoraCheckpoint.load(tiny_ckpt).action_dim
    out = tmp_path / "m"
    mask = ",".join(["1"] * (dim - 1) + ["0"])
    base = ["export", str(tiny_ckpt), "--out", str(out), "--no-validate"]
    bad = CliRunner().invoke(app, [*base, "--mask", "1,2"])
    assert bad.exit_code == 2 and "--mask must be comma-separated 0/1" in bad.output
    short = CliRunner().invoke(app, [*base, "--mask", "1,0"])
    assert short.exit_code == 2 and f"the action dim is {dim}" in " ".join(short.output.split())
    ok = CliRunner().invoke(app, [*base, "--mask", mask])
    assert ok.exit_code == 0, ok.output
    b = Bundle.load(out)
    assert b.manifest["postprocess"][0]["mask"] == [True] * (dim - 1) + [False]
    policy = NoraPolicy.load(out, providers="cpu", threads=1, forced_tokens="flag")
    chunk = policy.run_chunk(make_rgb_image(seed=6), "pick up the cup")
    s = b.norm_stats[chunk.unnorm_key]
    x = chunk.normalized
    want = (
        0.5 * (x + 1) * (s.q99 - s.q01) + s.q01
    )  # NORA's formula, then the mask keeps the last dim as produced
    want[:, -1] = x[:, -1]
    np.testing.assert_allclose(chunk.actions, want, rtol=0, atol=1e-12)
    assert chunk.actions.size == x.size > 0
