"""Decoder-with-KV graph vs the HF model: prefill/decode logits, action head rows, greedy ids, padding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from nora_edge import bundle
from nora_edge.errors import ExportError

INSTRUCTIONS = [
    "stack the blue cup on the green cup",
    "Wipe the table!",
    "turn on the stove",
    "pick up the can",
]


def hf_inputs(processor, instruction: str, seed: int) -> dict:
    from nora_edge.export.reference import nora_messages, resize_like_nora

    image = resize_like_nora(np.random.default_rng(seed).integers(0, 256, (200, 260, 3), dtype=np.uint8))
    text = processor.apply_chat_template(
        nora_messages(image, instruction), tokenize=False, add_generation_prompt=True
    )
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


@torch.inference_mode()
def hf_prefill_feeds(model, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_embeds (1, S, H), position_ids (3, 1, S)) exactly as HF builds them."""
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    feats = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    mask = (inputs["input_ids"] == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(mask, feats)
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"]
    )
    return embeds.numpy(), pos.numpy()


def ort_decoder(path_spec):
    from nora_edge.export.validate import OrtDecoder, session

    path, spec = path_spec[:2]
    return OrtDecoder(session(path), spec)


def rel_err(out, ref) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("k", range(3))
def test_prefill_and_decode_logits_match_hf(tiny_model, tiny_processor, decoder_full_onnx, k):
    inputs = hf_inputs(tiny_processor, INSTRUCTIONS[k], seed=k)
    embeds, pos = hf_prefill_feeds(tiny_model, inputs)
    dec = ort_decoder(decoder_full_onnx)
    logits, past = dec.step(embeds, pos, dec.empty_past())
    with torch.inference_mode():
        ref = tiny_model(**inputs).logits[0, -1].numpy()
    assert rel_err(logits, ref) <= 1e-5
    # one decode step: append the argmax token, compare with HF on the longer sequence
    tok = int(np.argmax(ref))
    table = tiny_model.get_input_embeddings().weight.detach().numpy()
    step, present = dec.step(table[[tok]][None], np.full((3, 1, 1), pos.max() + 1), past)
    longer = dict(inputs)
    longer["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[tok]])], 1)
    longer["attention_mask"] = torch.ones_like(longer["input_ids"])
    longer["mm_token_type_ids"] = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros((1, 1), dtype=torch.long)], 1
    )
    with torch.inference_mode():
        ref2 = tiny_model(**longer).logits[0, -1].numpy()
    assert rel_err(step, ref2) <= 1e-5
    held, kv = present
    assert held == kv[0].shape[2] == embeds.shape[1] + 1


def test_action_head_equals_full_vocab_rows(
    tiny_model, tiny_processor, decoder_full_onnx, decoder_action_onnx
):
    rows = decoder_action_onnx[2]
    inputs = hf_inputs(tiny_processor, INSTRUCTIONS[3], seed=5)
    embeds, pos = hf_prefill_feeds(tiny_model, inputs)
    full = ort_decoder(decoder_full_onnx)
    act = ort_decoder(decoder_action_onnx)
    lf, _ = full.step(embeds, pos, full.empty_past())
    la, _ = act.step(embeds, pos, act.empty_past())
    assert la.shape == (len(rows),)
    np.testing.assert_allclose(la, lf[rows], rtol=0, atol=1e-6 * np.abs(lf).max())


def greedy_parity(model, processor, decoder_path_spec, instructions, max_new: int) -> list[tuple[list, list]]:
    """(HF generate ids, ORT greedy ids) per instruction, with the checkpoint's generation_config; the ORT side
    is the runtime's own loop (nora_edge.generate.greedy, unconstrained) on the graph."""
    from nora_edge.export.validate import session
    from nora_edge.generate import Decoder, GreedyConfig, greedy
    from nora_edge.sessions import GraphSession

    table = model.get_input_embeddings().weight.detach().numpy()
    gc = model.generation_config
    eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    rows = np.arange(model.config.text_config.vocab_size)
    path, spec = decoder_path_spec[:2]
    dec = Decoder(GraphSession("decoder", session(path)), spec, table, rows)
    config = GreedyConfig(None, 0, tuple(eos), max_new, None, gc.repetition_penalty)
    pairs = []
    for k, instruction in enumerate(instructions):
        inputs = hf_inputs(processor, instruction, seed=100 + k)
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new)
        hf_ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        embeds, pos = hf_prefill_feeds(model, inputs)
        prompt_ids = inputs["input_ids"][0].numpy()
        logits, cache = dec.forward(embeds, pos, dec.empty_cache())
        rope_delta = int(pos.max()) + 1 - prompt_ids.size  # first generated position = max + 1
        ids = greedy(dec, logits, cache, prompt_ids, rope_delta, config).ids.tolist()
        pairs.append((hf_ids, ids))
    return pairs


def test_greedy_matches_hf_generate(tiny_model, tiny_processor, decoder_full_onnx):
    assert tiny_model.generation_config.repetition_penalty not in (None, 1.0)  # the penalty path is exercised
    pairs = greedy_parity(tiny_model, tiny_processor, decoder_full_onnx, INSTRUCTIONS[:3], max_new=12)
    for hf_ids, ort_ids in pairs:
        assert ort_ids == hf_ids
    assert len({t for hf_ids, _ in pairs for t in hf_ids}) > 1  # not a degenerate single-token stream


@torch.inference_mode()
def test_left_padded_batch_matches_single_sequences(tiny_model, decoder_full_onnx):
    dec = ort_decoder(decoder_full_onnx)
    table = tiny_model.get_input_embeddings().weight.detach().numpy()
    seqs = [[11, 25, 40, 7, 300, 5, 9], [77, 3, 150, 42]]
    total = max(map(len, seqs))
    embeds = np.zeros((2, total, table.shape[1]), np.float32)
    pos = np.zeros((3, 2, total), np.int64)
    mask = np.zeros((2, total), np.int64)
    for b, s in enumerate(seqs):
        embeds[b, total - len(s) :] = table[s]
        pos[:, b, total - len(s) :] = np.arange(len(s))
        mask[b, total - len(s) :] = 1
    feeds = {bundle.INPUTS_EMBEDS: embeds, bundle.POSITION_IDS: pos, bundle.ATTENTION_MASK: mask}
    _, zeros = dec.empty_past()
    feeds.update({n: np.repeat(z, 2, axis=0) for n, z in zip(dec.kv_names, zeros, strict=True)})
    out = dec.sess.run(dec.out_names, feeds)
    nxt = [5, 6]
    step_feeds = {
        bundle.INPUTS_EMBEDS: table[nxt][:, None],
        bundle.POSITION_IDS: np.array([[len(s)] for s in seqs])[None].repeat(3, 0),
        bundle.ATTENTION_MASK: np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
        **dict(zip(dec.kv_names, out[1:], strict=True)),
    }
    out2 = dec.sess.run(dec.out_names, step_feeds)
    for b, s in enumerate(seqs):
        ref = tiny_model(input_ids=torch.tensor([s])).logits[0, -1].numpy()
        ref2 = tiny_model(input_ids=torch.tensor([s + [nxt[b]]])).logits[0, -1].numpy()
        assert rel_err(out[0][b], ref) <= 1e-5
        assert rel_err(out2[0][b], ref2) <= 1e-5


def test_graph_interface_and_ops(decoder_action_onnx, tiny_model):
    path, spec, rows = decoder_action_onnx
    model = onnx.load(str(path))
    assert "Gemm" not in {n.op_type for n in model.graph.node}
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }
    cfg = tiny_model.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    assert dims[bundle.INPUTS_EMBEDS] == ["batch", "seq", cfg.hidden_size]
    assert dims[bundle.POSITION_IDS] == [3, "batch", "seq"]
    assert dims[bundle.ATTENTION_MASK] == ["batch", "total"]
    assert dims[bundle.past_key(0)] == ["batch", cfg.num_key_value_heads, "past", hd]
    assert dims[bundle.present_value(cfg.num_hidden_layers - 1)] == [
        "batch",
        cfg.num_key_value_heads,
        "total",
        hd,
    ]
    assert dims[bundle.LOGITS] == ["batch", len(rows)]
    assert spec.meta["num_layers"] == cfg.num_hidden_layers
    assert len(model.graph.input) == 3 + 2 * cfg.num_hidden_layers


def test_head_rows():
    from nora_edge.export.decoder import head_rows_for

    meta = {"action_base": 100, "num_action_tokens": 8, "end_ids": [50, 51, 50]}
    assert head_rows_for(meta, "action", 200) == [*range(100, 108), 50, 51]
    assert head_rows_for(meta, "full", 200) == list(range(200))
    with pytest.raises(ExportError, match="head must be"):
        head_rows_for(meta, "actions", 200)
    with pytest.raises(ExportError, match="outside"):
        head_rows_for(meta, "action", 104)


@pytest.mark.slow
def test_medium_greedy_matches_hf_generate_20_prompts(medium_ckpt, tmp_path):
    from nora_edge.checkpoint import NoraCheckpoint
    from nora_edge.export.decoder import export_decoder, head_rows_for
    from nora_edge.export.pipeline import load_model

    model, processor = load_model(NoraCheckpoint.load(medium_ckpt))
    path = tmp_path / "decoder.onnx"
    spec = export_decoder(
        model, path, head_rows_for({}, "full", model.config.text_config.vocab_size), head="full"
    )
    words = ["pick", "place", "open", "close", "push", "the red", "the blue", "drawer", "cup", "lid"]
    instructions = [f"{words[i % 5]} {words[5 + (i * 3) % 5]} {i}" for i in range(20)]
    pairs = greedy_parity(model, processor, (path, spec), instructions, max_new=24)
    assert [o for _, o in pairs] == [h for h, _ in pairs]
