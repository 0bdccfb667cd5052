"""mrope positions (numpy port) vs transformers' Qwen2_5_VLModel.get_rope_index; prompt assembly rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from nora_edge.errors import InputError
from nora_edge.prompt import PromptBuilder, decode_position_ids, rope_index

IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID = 90, 91, 92, 93


@pytest.fixture(scope="module")
def hf_model() -> Qwen2_5_VLModel:
    """A minimal Qwen2.5-VL (random weights); only its get_rope_index is used."""
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=100,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        bos_token_id=0,
        eos_token_id=1,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VSTART_ID,
        vision_end_token_id=VEND_ID,
    )
    return Qwen2_5_VLModel(cfg).eval()


def hf_rope(model, ids: np.ndarray, grids: np.ndarray) -> tuple[np.ndarray, int]:
    t_ids = torch.from_numpy(ids)[None]
    types = (t_ids == IMAGE_ID).int()
    pos, delta = model.get_rope_index(t_ids, mm_token_type_ids=types, image_grid_thw=torch.from_numpy(grids))
    return pos[:, 0].numpy(), int(delta[0, 0])


def random_prompt(rng, grids) -> np.ndarray:
    parts = []
    for t, h, w in grids:
        parts += [
            rng.integers(2, 80, rng.integers(0, 20)),
            [VSTART_ID],
            np.full(t * h * w // 4, IMAGE_ID),
            [VEND_ID],
        ]
    parts.append(rng.integers(2, 80, rng.integers(0, 20)))
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


@pytest.mark.parametrize(
    "grids",
    [[(1, 16, 16)], [(1, 4, 8)], [(2, 6, 4)], [(1, 16, 16), (1, 8, 12)], [(1, 2, 2)], [(3, 10, 2)]],
)
def test_rope_index_matches_hf(hf_model, grids):
    rng = np.random.default_rng(len(grids) * 100 + grids[0][1])
    for _ in range(5):
        ids = random_prompt(rng, grids)
        g = np.asarray(grids, dtype=np.int64)
        ref_pos, ref_delta = hf_rope(hf_model, ids, g)
        pos, delta = rope_index(ids, IMAGE_ID, g, 2)
        np.testing.assert_array_equal(pos, ref_pos)
        assert delta == ref_delta


def test_decode_positions_continue_like_hf(hf_model):
    """HF generation positions after the prompt: text_position + rope_delta on all three axes."""
    ids = random_prompt(np.random.default_rng(3), [(1, 16, 16)])
    _, delta = hf_rope(hf_model, ids, np.array([[1, 16, 16]]))
    got = decode_position_ids(ids.size + 4, delta, 3)
    assert got.shape == (3, 1, 3)
    expected = np.arange(ids.size + 4, ids.size + 7) + delta
    for axis in range(3):
        np.testing.assert_array_equal(got[axis, 0], expected)


def test_rope_index_rejects_mismatched_grid():
    ids = np.array([5, VSTART_ID, *([IMAGE_ID] * 10), VEND_ID])
    with pytest.raises(InputError, match="needs 16"):
        rope_index(ids, IMAGE_ID, np.array([[1, 8, 8]]), 2)
    with pytest.raises(InputError, match="image_grid_thw has 2 rows"):
        rope_index(np.array([5, 6]), IMAGE_ID, np.array([[1, 8, 8], [1, 2, 2]]), 2)


def word_tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(["[UNK]", "pick", "up", "the", "cup", "<|image_pad|>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|image_pad|>"])  # id 5, matched before pre-tokenization like Qwen's specials
    return tok


def test_prompt_builder_layout_and_cache():
    b = PromptBuilder(
        (7, 8, VSTART_ID),
        IMAGE_ID,
        VEND_ID,
        (9, 10),
        word_tokenizer(),
        2,
        max_instruction_tokens=4,
        forbidden_ids=frozenset({5}),
    )
    p = b.build("pick up the cup", np.array([[1, 4, 4]]))
    np.testing.assert_array_equal(
        p.input_ids, [7, 8, VSTART_ID, *([IMAGE_ID] * 4), VEND_ID, 1, 2, 3, 4, 9, 10]
    )
    assert p.image_start == 3 and p.num_image_tokens == 4 and p.position_ids.shape == (3, 1, p.length)
    assert b.instruction_ids("pick up the cup") is b.instruction_ids("pick up the cup")  # cached
    with pytest.raises(InputError, match="too long: 5 tokens"):
        b.build("pick up the cup up", np.array([[1, 4, 4]]))
    with pytest.raises(InputError, match="empty"):
        b.build("  ", np.array([[1, 4, 4]]))
    with pytest.raises(InputError, match="must be a str"):
        b.build(None, np.array([[1, 4, 4]]))
    with pytest.raises(InputError, match="special token"):
        b.build("pick <|image_pad|>", np.array([[1, 4, 4]]))
