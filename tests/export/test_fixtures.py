"""NORA-format fixtures: files, tokenizer layout, determinism, HF loading, processor parity, real-shape size."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from nora_edge import names
from nora_edge.actions.fast import FastTokenizer
from nora_edge.checkpoint import NoraCheckpoint
from nora_edge.errors import ExportError, InputError
from nora_edge.export import fixture_weights, fixtures
from nora_edge.export.processor import load_processor
from nora_edge.export.reference import nora_messages, resize_like_nora

torch.set_num_threads(1)

# NORA's prompt: declare-lab/nora inference/nora.py applies the processor's chat template (the standard
# Qwen2-VL template, which adds its default system prompt) to [image, instruction], add_generation_prompt=True.
NORA_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{instruction}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


# ----------------------------------------------------------------------------------- loading
def test_tiny_loads_with_checkpoint_reader_and_transformers(tiny_ckpt):
    ckpt = NoraCheckpoint.load(tiny_ckpt)
    raw = Tokenizer.from_file(str(tiny_ckpt / names.TOKENIZER_JSON))
    assert ckpt.action_base == raw.token_to_id(names.ACTION_TOKEN_FORMAT.format(0))
    assert ckpt.num_action_tokens == names.NUM_ACTION_TOKENS
    assert ckpt.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert (ckpt.time_horizon, ckpt.action_dim) == (1, 7)

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_ckpt, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 5_000_000
    assert n_params == fixture_weights.count_stored_parameters(tiny_ckpt)  # lm_head tied, not stored
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    # the stored tensors are what the model holds (no silent re-init on load)
    header = safetensors_header(tiny_ckpt / names.SAFETENSORS_SINGLE)
    assert {k for k in header if k != "__metadata__"} == {
        fixture_weights.checkpoint_name(k) for k in model.state_dict() if k != "lm_head.weight"
    }
    cfg = model.config
    assert cfg.image_token_id == ckpt.token_ids["image_pad"]
    assert cfg.vision_start_token_id == ckpt.token_ids["vision_start"]
    assert cfg.tie_word_embeddings
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    vc = cfg.vision_config
    assert (vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size, vc.window_size) == (14, 2, 2, 112)
    assert len(vc.fullatt_block_indexes) == 1 and vc.fullatt_block_indexes[0] < vc.depth < 5


def test_weights_follow_init_rule(tiny_ckpt):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)
    lm = model.model.language_model
    q = lm.layers[0].self_attn.q_proj
    assert abs(q.weight.std().item() * np.sqrt(q.in_features) - 1.0) < 0.05
    assert 0.0 < q.bias.abs().max().item() < 1.0  # non-zero biases so a dropped bias shows in parity
    assert torch.equal(lm.norm.weight, torch.ones_like(lm.norm.weight))
    emb_std = lm.embed_tokens.weight.std().item() * np.sqrt(lm.embed_tokens.embedding_dim)
    assert abs(emb_std - fixture_weights.EMBED_STD_SCALE) < 0.02


def test_horizon5_fixture_records_horizon(tiny_ckpt_h5):
    ckpt = NoraCheckpoint.load(tiny_ckpt_h5)
    assert (ckpt.time_horizon, ckpt.action_dim) == (5, 7)


# Qwen2.5-VL-3B-Instruct's generation_config.json as published (huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct,
# NORA ships it unchanged): no max_new_tokens / max_length, so transformers makes its default 20 new tokens.
QWEN25VL_3B_GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
    "transformers_version": "4.49.0.dev0",
}


@pytest.mark.parametrize("which", ["tiny_ckpt", "tiny_ckpt_h5"])
def test_generation_config_is_qwen25vl_3b_instructs(request, which):
    ckpt = request.getfixturevalue(which)
    gen = read_json(ckpt / names.GENERATION_CONFIG)
    assert sorted(gen) == sorted(QWEN25VL_3B_GENERATION_CONFIG)  # exactly the real file's keys
    ids = fixtures.special_ids(fixtures.PRESETS["tiny"].base_vocab)
    endoftext, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    ours = {**gen, "bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643]}
    assert ours == QWEN25VL_3B_GENERATION_CONFIG  # every value but the vocabulary-dependent ids
    assert (gen["bos_token_id"], gen["pad_token_id"], gen["eos_token_id"]) == (
        endoftext,
        endoftext,
        [im_end, endoftext],
    )
    # the real-shape preset (Qwen's vocabulary) writes the real file byte for byte in content
    assert (
        fixtures.generation_config(fixtures.PRESETS["real-shape"].base_vocab) == QWEN25VL_3B_GENERATION_CONFIG
    )
    # nothing for transformers to read a length from: generate() falls back to its default (20 new tokens;
    # tests/export/test_reference.py checks the generated lengths)
    from transformers import GenerationConfig

    hf = GenerationConfig.from_pretrained(ckpt)
    assert hf.max_new_tokens is None and hf.max_length is None


# ----------------------------------------------------------------------------------- tokenizer
def test_tokenizer_id_layout_and_hf_agreement(tiny_ckpt):
    raw = Tokenizer.from_file(str(tiny_ckpt / names.TOKENIZER_JSON))
    hf = AutoTokenizer.from_pretrained(tiny_ckpt)
    base = fixtures.PRESETS["tiny"].base_vocab
    for i, tok in enumerate(names.QWEN_SPECIAL_TOKENS):
        assert raw.token_to_id(tok) == base + i == hf.convert_tokens_to_ids(tok)
    first = base + len(names.QWEN_SPECIAL_TOKENS)
    for i in (0, 1, 1000, names.NUM_ACTION_TOKENS - 1):
        assert hf.convert_tokens_to_ids(names.ACTION_TOKEN_FORMAT.format(i)) == first + i
    assert len(hf) == read_json(tiny_ckpt / names.CONFIG)["vocab_size"]
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    texts = [
        NORA_PROMPT.format(instruction="pick up the red block and place it in the bowl"),
        "Wipe the TABLE, then stack 3 cubes!  \n\n tabs\there <robot_action_7><robot_action_2047>",
        "café naïve 日本語 ☃ \u00e9 e\u0301",  # NFC folds the combining accent
    ]
    for text in texts:
        ids = raw.encode(text).ids
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == raw.decode(ids, skip_special_tokens=False)
    assert raw.encode("e\u0301").ids == raw.encode("\u00e9").ids


def test_filler_vocab_is_unreachable(tiny_ckpt):
    raw = Tokenizer.from_file(str(tiny_ckpt / names.TOKENIZER_JSON))
    vocab = raw.get_vocab(with_added_tokens=False)
    fillers = {i for t, i in vocab.items() if t.startswith("<unused_bpe_")}
    assert len(vocab) == fixtures.PRESETS["tiny"].base_vocab
    rng = np.random.default_rng(0)
    words = ["<unused_bpe_0>", "unused", "bpe", "<", "_", ">", "pick", "the", "block"]
    for _ in range(50):
        text = " ".join(rng.choice(words, 8)) + "".join(chr(int(c)) for c in rng.integers(32, 0x3000, 10))
        assert not fillers & set(raw.encode(text).ids)


# ----------------------------------------------------------------------------------- determinism
def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_identical_files_different_seed_differs(tiny_ckpt, tmp_path):
    again = fixtures.build_fixture(tmp_path / "again", preset="tiny", horizon=1, seed=0, progress=False)
    a, b = _file_bytes(tiny_ckpt), _file_bytes(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    other = _file_bytes(
        fixtures.build_fixture(tmp_path / "s1", preset="tiny", horizon=1, seed=1, progress=False)
    )
    for name in (names.SAFETENSORS_SINGLE, names.NORM_STATS, f"{names.FAST_SUBDIR}/{names.TOKENIZER_JSON}"):
        assert other[name] != a[name], name


def test_build_is_atomic(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fixture_weights, "write_weights", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        fixtures.build_fixture(tmp_path / "ck", preset="tiny", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ExportError, match="preset"):
        fixtures.build_fixture(tmp_path / "a", preset="huge", progress=False)
    with pytest.raises(ExportError, match="horizon"):
        fixtures.build_fixture(tmp_path / "b", horizon=0, progress=False)
    (tmp_path / "c").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        fixtures.build_fixture(tmp_path / "c", progress=False)
    with pytest.raises(ExportError, match="mrope"):
        fixtures.mrope_section(40)


# ----------------------------------------------------------------------------------- FAST + norm stats
def test_fast_dir_fits_smooth_trajectories(tiny_ckpt_h5):
    fast = FastTokenizer.from_pretrained(tiny_ckpt_h5 / names.FAST_SUBDIR)
    cfg = read_json(tiny_ckpt_h5 / names.FAST_SUBDIR / names.FAST_PROCESSOR_CONFIG)
    assert cfg["vocab_size"] == names.NUM_ACTION_TOKENS and cfg["scale"] == 10
    assert (fast.time_horizon, fast.action_dim) == (5, 7)
    assert 256 < fast.vocab_size <= names.NUM_ACTION_TOKENS
    chunks = fixtures.smooth_trajectories(5, seed=123, n_chunks=20)  # (20, 5, 7), unseen data
    assert np.abs(chunks).max() <= 1.0
    decoded = fast.decode(fast.encode(chunks), 5, 7)
    # rounding error 0.5/scale per DCT coefficient; orthonormal iDCT: per element <= sqrt(T) * 0.5 / scale
    assert np.abs(decoded - chunks).max() <= np.sqrt(5) * 0.5 / 10 + 1e-9


def test_norm_stats_format_and_keys(tiny_ckpt, tiny_ckpt_multikey):
    stats = read_json(tiny_ckpt / names.NORM_STATS)
    assert list(stats) == [fixtures.FIXTURE_UNNORM_KEY]
    entry = stats[fixtures.FIXTURE_UNNORM_KEY]
    assert set(entry) == {"action", "proprio", "num_transitions", "num_trajectories"}
    action = entry["action"]
    assert set(action) == {"mean", "std", "max", "min", "q01", "q99", "mask"}
    assert action["mask"] == [True] * 6 + [False]
    q01, q99 = np.array(action["q01"]), np.array(action["q99"])
    assert np.all(np.array(action["min"]) <= q01) and np.all(q01 < q99) and np.all(q99 <= action["max"])
    ckpt = NoraCheckpoint.load(tiny_ckpt_multikey)
    assert sorted(ckpt.norm_stats) == sorted([fixtures.FIXTURE_UNNORM_KEY, "other_robot"])
    with pytest.raises(InputError, match="unnorm_key"):
        ckpt.norm_stats_for(None)


# ----------------------------------------------------------------------------------- processor
def test_prompt_is_noras(tiny_ckpt):
    proc = load_processor(tiny_ckpt)
    image = resize_like_nora(np.zeros((10, 10, 3), np.uint8))
    for instruction in ("pick up the red block and place it in the bowl", "Open The Drawer."):
        text = proc.apply_chat_template(
            nora_messages(image, instruction), tokenize=False, add_generation_prompt=True
        )
        assert text == NORA_PROMPT.format(instruction=instruction)


@pytest.mark.parametrize(
    "shape, nora_resize, grid", [((224, 224), True, (1, 16, 16)), ((480, 640), True, (1, 16, 16)),
                                 ((97, 31), True, (1, 16, 16)), ((280, 420), False, (1, 20, 30))]
)  # fmt: skip
def test_processor_matches_transformers_pieces(tiny_ckpt, make_rgb_image, shape, nora_resize, grid):
    proc = load_processor(tiny_ckpt)
    array = make_rgb_image(seed=sum(shape), height=shape[0], width=shape[1])
    image = resize_like_nora(array) if nora_resize else PIL.Image.fromarray(array)
    prompt = NORA_PROMPT.format(instruction="put the blue cup on the plate")
    ours = proc(text=[prompt], images=[image], return_tensors="np")

    image_processor = AutoImageProcessor.from_pretrained(tiny_ckpt)  # transformers' own Qwen2-VL processor
    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    ref = image_processor(images=[image], return_tensors="np")
    n_pads = int(np.prod(ref["image_grid_thw"][0])) // image_processor.merge_size**2
    expanded = prompt.replace("<|image_pad|>", "<|image_pad|>" * n_pads)
    ids = np.array([tokenizer(expanded)["input_ids"]])

    np.testing.assert_array_equal(ours["image_grid_thw"], [grid])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(ours["input_ids"], ids)
    np.testing.assert_array_equal(ours["attention_mask"], np.ones_like(ids))
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    np.testing.assert_array_equal(ours["mm_token_type_ids"], (ids == image_id).astype(np.int64))
    assert n_pads == grid[1] * grid[2] // 4 and (ids == image_id).sum() == n_pads

    # independent float64 check of the first patch: rescale 1/255, CLIP mean/std, (C, T, 14, 14) layout
    pix = np.asarray(image, dtype=np.float64)[:14, :14] / 255.0  # (14, 14, 3)
    want = ((pix - fixtures.CLIP_MEAN) / fixtures.CLIP_STD).transpose(2, 0, 1)  # (3, 14, 14)
    got = ours["pixel_values"][0].reshape(3, 2, 14, 14)  # (C, temporal, P, P)
    np.testing.assert_allclose(got[:, 0], want, atol=1e-5)
    np.testing.assert_array_equal(got[:, 0], got[:, 1])


def test_processor_rejects_video(tiny_ckpt):
    proc = load_processor(tiny_ckpt)
    with pytest.raises(InputError, match="video"):
        proc(text=["<|vision_start|><|video_pad|><|vision_end|>hi"])


# ----------------------------------------------------------------------------------- medium / real-shape
def test_medium_preset_size_and_load(medium_ckpt):
    n = fixture_weights.count_stored_parameters(medium_ckpt)
    assert 80e6 <= n <= 100e6
    cfg = read_json(medium_ckpt / names.CONFIG)
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (1024, 16, 2)
    ckpt = NoraCheckpoint.load(medium_ckpt)
    assert ckpt.time_horizon == 5
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        medium_ckpt, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_real_shape_tensor_specs_match_qwen25vl_3b():
    """Shapes only (meta device, no memory): the real-shape preset is Qwen2.5-VL-3B + 2048 action tokens."""
    specs = fixture_weights.tensor_specs(fixtures.model_config(fixtures.PRESETS["real-shape"]))
    total = sum(s.numel for s in specs)
    assert abs(total - 3.75e9) <= 0.01 * 3.75e9
    vision = sum(s.numel for s in specs if s.name.startswith("visual."))
    assert abs(vision - 668.7e6) < 0.1e6  # Qwen2.5-VL-3B vision tower (vision_config)
    shapes = {s.name: s.shape for s in specs}
    assert shapes["model.embed_tokens.weight"] == (153713, 2048)
    assert "lm_head.weight" not in shapes


@pytest.mark.slow
def test_real_shape_build_parameter_count(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    if free < 10 * 2**30:
        pytest.skip(f"real-shape fixture needs ~7.5 GB free, {free / 2**30:.1f} GB available")
    ckpt = fixtures.build_fixture(tmp_path / "real", preset="real-shape", horizon=1, progress=False)
    index = read_json(ckpt / names.SAFETENSORS_INDEX)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    n = 0
    for shard in shards:
        header = safetensors_header(ckpt / shard)
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
        n += sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
        assert (ckpt / shard).stat().st_size <= 4 * 2**30
    assert abs(n - 3.75e9) <= 0.01 * 3.75e9
    assert index["metadata"]["total_size"] == 2 * n
    ckpt_meta = NoraCheckpoint.load(ckpt)
    assert (ckpt_meta.action_base, ckpt_meta.vocab_size) == (151665, 153713)
