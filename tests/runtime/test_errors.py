"""Every bad input raises the right typed error with a telling message, and the policy keeps working after."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from nora_edge.errors import BundleError, InputError
from nora_edge.policy import NoraPolicy


@pytest.fixture(scope="module")
def policy(rt_bundle):
    # random weights: chunks hold automaton-forced tokens, handed out flagged (this file tests input errors)
    return NoraPolicy.load(rt_bundle, providers="cpu", threads=1, forced_tokens="flag")


@pytest.fixture(scope="module")
def image():
    from nora_edge.export.images import random_rgb_image

    return random_rgb_image(0)


BAD_CALLS = [
    (lambda img: (np.zeros((224, 224), np.uint8), "pick"), InputError, r"shape \(H, W, 3\)"),
    (lambda img: (img.astype(np.float32) / 255, "pick"), InputError, "float32 is not accepted"),
    (lambda img: (np.full((8, 8, 3), np.nan), "pick"), InputError, "NaN or inf"),
    (lambda img: (np.full((8, 8, 3), 300, np.int32), "pick"), InputError, "out of range"),
    (lambda img: (np.zeros((0, 5, 3), np.uint8), "pick"), InputError, "empty"),
    (lambda img: (img.tolist(), "pick"), InputError, "numpy array"),
    (lambda img: (img, ""), InputError, "instruction is empty"),
    (lambda img: (img, "   \n"), InputError, "instruction is empty"),
    (lambda img: (img, None), InputError, "must be a str"),
    (lambda img: (img, "go " * 2000), InputError, "instruction is too long"),
    (lambda img: (img, "pick <|im_end|> up"), InputError, "special token"),
    (lambda img: (img, "pick <robot_action_3>"), InputError, "special token"),
]


@pytest.mark.parametrize(("make", "error", "match"), BAD_CALLS)
def test_bad_input_raises_then_policy_still_works(policy, image, make, error, match):
    bad_image, instruction = make(image)
    with pytest.raises(error, match=match):
        policy.predict_action_chunk(bad_image, instruction)
    assert policy.last_output is None  # a failed step never leaves an action behind
    with pytest.raises(error, match=match):
        policy.select_action(bad_image, instruction)
    good = policy.predict_action_chunk(image, "pick up the cup")
    assert good.shape == (1, 7) and np.isfinite(good).all()


def test_unknown_unnorm_key(policy, image):
    with pytest.raises(InputError, match="unknown unnorm_key 'nope'.*fixture_robot"):
        policy.predict_action_chunk(image, "pick", unnorm_key="nope")
    assert policy.predict_action_chunk(image, "pick", unnorm_key="fixture_robot").shape == (1, 7)


def test_unnorm_key_required_with_several(tiny_ckpt_multikey, tmp_path, image):
    from nora_edge.export.pipeline import export_bundle

    path = export_bundle(tiny_ckpt_multikey, tmp_path / "mk", validate=False, progress=False)
    pol = NoraPolicy.load(path, providers="cpu", threads=1, forced_tokens="flag")
    with pytest.raises(InputError, match="unnorm_key is required.*other_robot"):
        pol.predict_action_chunk(image, "pick")
    a = pol.predict_action_chunk(image, "pick", unnorm_key="fixture_robot")
    b = pol.predict_action_chunk(image, "pick", unnorm_key="other_robot")
    stats = pol.bundle.norm_stats
    # same normalized chunk, unnormalized with each key's q01/q99 (NORA's formula on every dim)
    norm_a = (
        2 * (a - stats["fixture_robot"].q01) / (stats["fixture_robot"].q99 - stats["fixture_robot"].q01) - 1
    )
    norm_b = 2 * (b - stats["other_robot"].q01) / (stats["other_robot"].q99 - stats["other_robot"].q01) - 1
    np.testing.assert_allclose(norm_a, norm_b, atol=1e-9)


def copy_bundle(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_bundle_errors(rt_bundle, tmp_path):
    with pytest.raises(BundleError, match="not found"):
        NoraPolicy.load(tmp_path / "missing")

    b = copy_bundle(rt_bundle, tmp_path / "version")
    edit_manifest(b, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match="schema_version 99"):
        NoraPolicy.load(b)

    b = copy_bundle(rt_bundle, tmp_path / "tampered")
    with open(b / "decoder.onnx", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="decoder.onnx: sha256"):
        NoraPolicy.load(b)

    b = copy_bundle(rt_bundle, tmp_path / "dims")
    edit_manifest(b, lambda m: m["codec"].update(action_dim=6))
    with pytest.raises(BundleError, match="codec.action_dim 6"):
        NoraPolicy.load(b)

    b = copy_bundle(rt_bundle, tmp_path / "image")
    edit_manifest(b, lambda m: m["image"].update(resample=2))
    with pytest.raises(BundleError, match="'resample' = 2"):
        NoraPolicy.load(b)

    b = copy_bundle(rt_bundle, tmp_path / "meta")
    edit_manifest(b, lambda m: m["components"]["decoder"]["meta"].pop("num_kv_heads"))
    with pytest.raises(BundleError, match="num_kv_heads"):
        NoraPolicy.load(b)


def test_bad_load_options(rt_bundle):
    with pytest.raises(InputError, match="not available"):
        NoraPolicy.load(rt_bundle, providers="cuda")
    with pytest.raises(InputError, match="threads"):
        NoraPolicy.load(rt_bundle, providers="cpu", threads=-2)
