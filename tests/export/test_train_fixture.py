"""Trained tiny fixtures: loading, well-formed greedy output on held-out inputs, determinism, the training path.

The well-formed rate is measured with the real ReferencePolicy (HF ``generate`` with the checkpoint's
generation_config) on frames ``random_rgb_image(0..49)``, which training never sees (its frames use seeds
>= TRAIN_IMAGE_SEED_BASE).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from nora_edge import names
from nora_edge.checkpoint import NoraCheckpoint
from nora_edge.errors import ExportError, InputError
from nora_edge.export import fixtures, synthetic_task
from nora_edge.export.images import random_rgb_image
from nora_edge.export.reference import ReferencePolicy
from nora_edge.export.train_fixture import (
    FIXTURE_TRAIN_STEPS,
    TRAIN_IMAGE_SEED_BASE,
    assistant_logits,
    held_out_cases,
    make_batch,
    train_fixture,
    training_frame_seed,
    write_trained_weights,
)

# Bound on the held-out well-formed rate (50 cases). With the shipped settings (train_fixture defaults,
# FIXTURE_TRAIN_STEPS, 1 thread) training seeds 0-4 measured 1.00 x5 (h=1) and 1.00, 1.00, 1.00, 0.98, 1.00
# (h=5); the seed-0 fixtures used here reach 1.00. Training is bit-exact for a fixed thread count, but float
# rounding may differ on another CPU / torch build, and less-trained settings in the sweep had outlier seeds
# at 0.58-0.78, so the bound is the 80% target rather than the measured value: it still fails as soon as
# training stops teaching the FAST grammar (random weights: 0.00).
WELL_FORMED_BOUND = 0.8
# A trained model must also follow the instruction, not only emit the right number of coefficients: the median
# absolute error of its decoded chunks against synthetic_task.target_chunk, relative to the error of the
# target for the wrong verb (task_error_ratio), must stay below this. Measured 0.04-0.13 over seeds 0-4.
TASK_ERROR_RATIO = 0.5


def safetensors_header_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------- loading
@pytest.mark.parametrize(
    ("trained", "random", "horizon"),
    [
        ("tiny_trained_ckpt", "tiny_ckpt", 1),
        ("tiny_trained_ckpt_h5", "tiny_ckpt_h5", 5),
    ],
)
def test_trained_fixture_loads_and_only_weights_changed(trained, random, horizon, request):
    trained, random = request.getfixturevalue(trained), request.getfixturevalue(random)
    ckpt = NoraCheckpoint.load(trained)
    assert (ckpt.time_horizon, ckpt.action_dim) == (horizon, 7)
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        trained, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # same safetensors layout as the random fixture: names, order, dtypes, shapes, offsets
    st = names.SAFETENSORS_SINGLE
    assert safetensors_header_bytes(trained / st) == safetensors_header_bytes(random / st)
    a, b = file_bytes(trained), file_bytes(random)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == [st]  # tokenizer, configs, FAST dir, norm stats untouched
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(random, dtype=torch.float32).state_dict()
    unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, base[k])]
    assert unchanged == []  # every tensor was trained


# ----------------------------------------------------------------------------------- well-formed rate
def other_verb(text: str) -> str:
    """The same instruction with the next verb of synthetic_task.VERBS (same template, color, object)."""
    verb, color, obj = synthetic_task.parse_instruction(text)
    nxt = synthetic_task.VERBS[(synthetic_task.VERBS.index(verb) + 1) % len(synthetic_task.VERBS)]
    return text.replace(verb, nxt, 1)


def task_error_ratio(policy: ReferencePolicy, results, cases) -> float:
    """median |decoded - target| / median |target for the wrong verb - target| over well-formed cases.

    Well below 1 means the decoded chunks follow the instruction, not just the FAST grammar.
    """
    t = policy.checkpoint.time_horizon
    model_err, wrong_err = [], []
    for (img, text), r in zip(cases, results, strict=True):
        if not r.well_formed:
            continue
        feats = synthetic_task.image_features(img)
        target = synthetic_task.target_chunk(feats, text, t)
        model_err.append(np.abs(r.normalized - target).mean())
        wrong_err.append(np.abs(synthetic_task.target_chunk(feats, other_verb(text), t) - target).mean())
    return float(np.median(model_err) / np.median(wrong_err))


@pytest.mark.parametrize("fixture_name", ["tiny_trained_ckpt", "tiny_trained_ckpt_h5"])
def test_reference_greedy_output_is_well_formed_on_held_out_inputs(fixture_name, request):
    policy = ReferencePolicy.from_pretrained(request.getfixturevalue(fixture_name))
    t = policy.checkpoint.time_horizon
    cases = held_out_cases(50)
    assert all(seed < TRAIN_IMAGE_SEED_BASE for seed in range(50))
    results = [policy.predict_action_chunk(img, text) for img, text in cases]
    rate = np.mean([r.well_formed for r in results])
    assert rate >= WELL_FORMED_BOUND, [r.reason for r in results if not r.well_formed]
    for r in results:
        if r.well_formed:
            assert r.normalized.shape == r.actions.shape == (t, 7)
            assert r.ids[-1] == policy.checkpoint.token_ids["im_end"]
            assert np.all(np.isfinite(r.actions))
    assert task_error_ratio(policy, results, cases) < TASK_ERROR_RATIO


# ----------------------------------------------------------------------------------- determinism
def test_training_is_deterministic_per_seed(tiny_ckpt, tmp_path):
    threads = torch.get_num_threads()
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        ckpt = copy_ckpt(tiny_ckpt, tmp_path / name)
        report = train_fixture(ckpt, steps=3, seed=seed, progress=False)
        assert report.steps == len(report.losses) == 3 and all(np.isfinite(report.losses))
        runs[name] = (ckpt / names.SAFETENSORS_SINGLE).read_bytes()
    assert torch.get_num_threads() == threads  # the training thread count is restored
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    assert runs["a"] != (tiny_ckpt / names.SAFETENSORS_SINGLE).read_bytes()


def test_build_fixture_train_steps(tiny_ckpt, tmp_path):
    untrained = fixtures.build_fixture(
        tmp_path / "zero", preset="tiny", seed=0, train_steps=0, progress=False
    )
    assert file_bytes(untrained) == file_bytes(
        tiny_ckpt
    )  # train_steps=0 is the random fixture, byte for byte
    trained = fixtures.build_fixture(tmp_path / "two", preset="tiny", seed=0, train_steps=2, progress=False)
    manual = copy_ckpt(tiny_ckpt, tmp_path / "manual")
    train_fixture(manual, steps=2, seed=0, progress=False)
    assert file_bytes(trained) == file_bytes(manual)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manual", "two", "zero"]  # no tmp dirs left


# ----------------------------------------------------------------------------------- training path
def test_training_batch_matches_reference_inputs_and_full_forward(tiny_ckpt_h5):
    policy = ReferencePolicy.from_pretrained(tiny_ckpt_h5)
    frames = [random_rgb_image(training_frame_seed(0, k)) for k in range(2)]
    instructions = synthetic_task.instruction_list()
    texts = [[instructions[0], instructions[37]], [instructions[100], instructions[37]]]
    batch = make_batch(policy, frames, texts, {})
    model = policy.model
    ckpt = policy.checkpoint
    rows = [(f, text) for f, group in enumerate(texts) for text in group]
    for b, (f, text) in enumerate(rows):
        ref = policy.prepare_inputs(frames[f], text)  # the reference's own input path
        n = ref["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][b, :n], ref["input_ids"][0])
        assert torch.equal(batch["mm_token_type_ids"][b, :n], ref["mm_token_type_ids"][0])
        assert torch.equal(batch["pixel_values"].reshape(2, -1, 1176)[f], ref["pixel_values"])
        assert torch.equal(batch["image_grid_thw"][b], ref["image_grid_thw"][0])
        assert (batch["labels"][b, :n] == -100).all()
        length = int(batch["attention_mask"][b].sum())
        assistant = batch["input_ids"][b, n:length].numpy()
        assert np.array_equal(batch["labels"][b, n:length].numpy(), assistant)
        assert assistant[-1] == ckpt.token_ids["im_end"]
        # the reference's own extraction + FAST decode recovers the target chunk up to FAST rounding:
        # 0.5 / scale per DCT coefficient; the orthonormal iDCT keeps the L2 norm of the error per dim column
        _, normalized, reason = policy.decode_actions(assistant)
        assert reason is None
        target = synthetic_task.target_chunk(synthetic_task.image_features(frames[f]), text, 5)
        assert np.abs(normalized - target).max() <= np.sqrt(5) * 0.5 / policy.fast.scale + 1e-9
    logits, gold = assistant_logits(model, batch)
    per_row_pixels = batch["pixel_values"].reshape(2, -1, 1176)[batch["frame_of_row"]].reshape(-1, 1176)
    with torch.no_grad():
        full = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            pixel_values=per_row_pixels,
            image_grid_thw=batch["image_grid_thw"],
        ).logits  # (B, L, V)
    r, c = torch.nonzero(batch["labels"][:, 1:] != -100, as_tuple=True)
    assert torch.equal(gold, batch["labels"][r, c + 1])
    torch.testing.assert_close(logits.detach(), full[r, c], atol=2e-5, rtol=1e-5)


def test_bad_arguments_raise_typed_errors(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    before = file_bytes(ckpt)
    for kwargs, match in (
        ({"steps": 0}, "steps"),
        ({"steps": 2, "batch": 6, "per_frame": 4}, "multiple"),
        ({"steps": 2, "lr": -1.0}, "lr"),
        ({"steps": 2, "lr": float("nan")}, "lr"),
        ({"steps": True}, "steps"),
        ({"steps": 2, "seed": -1}, "seed"),
    ):
        with pytest.raises(ExportError, match=match):
            train_fixture(ckpt, progress=False, **kwargs)
    assert file_bytes(ckpt) == before
    with pytest.raises(ExportError, match="train_steps"):
        fixtures.build_fixture(tmp_path / "x", train_steps=-1, progress=False)
    assert not (tmp_path / "x").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="no .safetensors"):
        write_trained_weights(empty, torch.nn.Linear(1, 1), {})
    with pytest.raises(ExportError, match="overlap"):
        held_out_cases(10, first_seed=TRAIN_IMAGE_SEED_BASE - 5)


def test_shipped_step_counts_cover_both_horizons():
    assert set(FIXTURE_TRAIN_STEPS) == {1, 5} and all(v > 0 for v in FIXTURE_TRAIN_STEPS.values())


# ----------------------------------------------------------------------------------- the synthetic task
def test_target_chunk_is_smooth_bounded_and_depends_on_all_inputs():
    rng = np.random.default_rng(0)
    instructions = synthetic_task.instruction_list()
    assert len(set(instructions)) == len(instructions)
    for _ in range(50):
        feats = rng.uniform(-1, 1, 5)
        text = instructions[int(rng.integers(len(instructions)))]
        chunk = synthetic_task.target_chunk(feats, text, 5)
        assert chunk.shape == (5, 7)
        assert np.abs(chunk[:, :6]).max() <= 0.9 and set(np.unique(chunk[:, 6])) <= {-1.0, 1.0}
        coeffs = scipy.fft.dct(chunk, type=2, norm="ortho", axis=0)  # independent DCT
        np.testing.assert_allclose(coeffs[2:], 0.0, atol=1e-12)  # only k = 0 and k = 1: smooth in time
        # the half-cosine sums to zero over the chunk, so T = 1 (no swing) gives the T = 5 chunk's mean
        np.testing.assert_allclose(synthetic_task.target_chunk(feats, text, 1)[0], chunk.mean(0), atol=1e-12)
    feats = np.array([0.5, -0.3, 0.2, 0.4, -0.6])
    ref = synthetic_task.target_chunk(feats, "push the red block", 5)
    for text in ("push the green block", "push the red cup", "lift the red block"):
        assert not np.allclose(synthetic_task.target_chunk(feats, text, 5), ref), text
    for i, color in enumerate(("red", "green", "blue", "yellow", "yellow")):  # a color that reads feature i
        other = feats.copy()
        other[i] = -other[i]
        text = f"push the {color} bowl"
        changed = synthetic_task.target_chunk(other, text, 5)
        assert not np.allclose(changed, synthetic_task.target_chunk(feats, text, 5)), i


def test_image_features_read_the_resized_frame():
    flat = np.full((100, 300, 3), 153, dtype=np.uint8)  # 153 / 255 = 0.6 -> +1 after standardizing
    np.testing.assert_allclose(synthetic_task.image_features(flat), [1.0, 1.0, 1.0, 0.0, 0.0], atol=1e-12)
    split = np.zeros((224, 224, 3), dtype=np.uint8)
    split[:, 112:] = 255  # bright right half; top and bottom alike
    feats = synthetic_task.image_features(split)
    assert feats[3] == 1.0 and abs(feats[4]) < 1e-12
    with pytest.raises(InputError, match="uint8"):
        synthetic_task.image_features(split.astype(np.float32))
    with pytest.raises(InputError, match="not one of"):
        synthetic_task.target_chunk(feats, "dance", 1)
    with pytest.raises(InputError, match="shape"):
        synthetic_task.target_chunk(feats[:3], "push the red cup", 1)
