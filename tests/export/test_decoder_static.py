"""Static-KV (TensorRT-flavor) decoder graph + its runtime loop vs the current concat-KV graph and HF.

One trained tiny fixture (``tiny_trained_ckpt``: its constrained greedy chunks are mostly the model's own
choices) is exported twice with the shipped action head: the current graph (``export_decoder``) and the static
one (``export_decoder_static``). References: the current graph in onnxruntime through
:class:`nora_edge.generate.Decoder`, and the HF model in PyTorch.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from nora_edge import bundle
from tests.export.test_decoder import hf_prefill_feeds
from tests.synthetic_pairs import held_out_pairs

N_STEPS = 12  # decode steps compared after each prefill
N_PROMPTS = 4


def prompt_inputs(processor, image: np.ndarray, instruction: str) -> dict:
    from nora_edge.export.reference import nora_messages, resize_like_nora

    pil = resize_like_nora(image)
    text = processor.apply_chat_template(
        nora_messages(pil, instruction), tokenize=False, add_generation_prompt=True
    )
    return dict(processor(text=[text], images=[pil], return_tensors="pt"))


@pytest.fixture(scope="module")
def graphs(tiny_trained_ckpt, tmp_path_factory):
    """Model, processor, prompts, both decoders (current and static, in place) and the greedy config."""
    from tokenizers import Tokenizer

    from nora_edge.actions.automaton import FastAutomaton
    from nora_edge.actions.bytetable import ByteTable
    from nora_edge.checkpoint import NoraCheckpoint
    from nora_edge.export.decoder import export_decoder, head_rows_for
    from nora_edge.export.decoder_static import export_decoder_static, static_max_len
    from nora_edge.export.manifest_sections import end_ids, eos_ids
    from nora_edge.export.pipeline import load_model
    from nora_edge.export.validate import session
    from nora_edge.generate import Decoder, GreedyConfig
    from nora_edge.sessions import GraphSession
    from nora_edge.static_kv import StaticDecoder

    torch.set_num_threads(1)
    ckpt = NoraCheckpoint.load(tiny_trained_ckpt)
    model, processor = load_model(ckpt)
    meta = {
        "action_base": ckpt.action_base,
        "num_action_tokens": ckpt.num_action_tokens,
        "end_ids": end_ids(ckpt),
    }
    rows = head_rows_for(meta, "action", model.config.text_config.vocab_size)
    prompts = [prompt_inputs(processor, im, text) for im, text in held_out_pairs(N_PROMPTS, seed=23)]
    longest = max(p["input_ids"].shape[1] for p in prompts)
    max_len = static_max_len(longest, ckpt.time_horizon, ckpt.action_dim)
    root = tmp_path_factory.mktemp("decoder_static")
    cur_spec = export_decoder(model, root / "decoder.onnx", rows, head="action")
    st_spec = export_decoder_static(model, root / "decoder_static.onnx", rows, max_len, head="action")
    table = model.get_input_embeddings().weight.detach().numpy()
    current = Decoder(GraphSession("decoder", session(root / "decoder.onnx")), cur_spec, table, rows)
    static_session = GraphSession("decoder", session(root / "decoder_static.onnx"))
    static = StaticDecoder(static_session, st_spec, table, rows)
    fast = Tokenizer.from_file(str(ckpt.fast.path / "tokenizer.json"))
    byte_table = ByteTable.from_tokenizer(fast, min_token=ckpt.fast.min_token, scale=ckpt.fast.scale)
    gc = ckpt.generation_config
    config = GreedyConfig(
        automaton=FastAutomaton(byte_table, ckpt.time_horizon, ckpt.action_dim),
        action_base=ckpt.action_base,
        eos_ids=tuple(eos_ids(ckpt)),
        max_new_tokens=None,
        max_length=None,
        repetition_penalty=gc.get("repetition_penalty"),
    )
    return SimpleNamespace(
        model=model, prompts=prompts, rows=np.asarray(rows), current=current, static=static,
        static_session=static_session, st_spec=st_spec, cur_spec=cur_spec, path=root / "decoder_static.onnx",
        max_len=max_len,
        table=table, config=config,
    )  # fmt: skip


def test_logits_equal_current_graph_and_hf(graphs):
    from nora_edge.generate import decode_step

    g, compared = graphs, 0
    assert g.static.in_place  # the CPU default
    for inputs in g.prompts[:2]:
        embeds, pos = hf_prefill_feeds(g.model, inputs)
        cur_l, cur_c = g.current.forward(embeds, pos, g.current.empty_cache())
        empty = g.static.empty_cache()
        ptrs = {n: v.data_ptr() for n, v in empty.values.items()}
        st_l, st_c = g.static.forward(embeds, pos, empty)
        with torch.inference_mode():
            hf = g.model(**inputs).logits[0, -1].numpy()[g.rows]
        scale = float(np.abs(hf).max())
        assert np.abs(st_l - cur_l).max() <= 1e-5 * scale
        assert np.abs(st_l - hf).max() <= 1e-5 * scale
        compared += 2
        index, delta, tokens = (
            inputs["input_ids"].shape[1],
            int(pos.max()) + 1 - inputs["input_ids"].shape[1],
            [],
        )
        for _ in range(N_STEPS):
            tok = int(g.rows[np.argmax(cur_l)])
            tokens.append(tok)
            cur_l, cur_c = decode_step(g.current, tok, index, delta, cur_c)
            st_l, st_c = decode_step(g.static, tok, index, delta, st_c)
            assert np.abs(st_l - cur_l).max() <= 1e-5 * scale
            index += 1
            compared += 1
        # the cache: the written slots equal the current graph's present K/V; the rest are still zero
        for name in g.current.kv_names:
            cur_kv = np.asarray(cur_c.values[name].numpy())
            st_kv = st_c.values[name].numpy()
            np.testing.assert_allclose(
                st_kv[:, :, :index], cur_kv, rtol=0, atol=1e-5 * float(np.abs(cur_kv).max())
            )
            assert not st_kv[:, :, index:].any()
            assert st_c.values[name].data_ptr() == ptrs[name]  # in place: onnxruntime wrote into our buffers
            compared += 1
        # HF on the whole sequence: the last step's logits
        longer = dict(inputs)
        extra = torch.tensor([tokens])
        longer["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
        longer["attention_mask"] = torch.ones_like(longer["input_ids"])
        longer["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
        with torch.inference_mode():
            hf_last = g.model(**longer).logits[0, -1].numpy()[g.rows]
        assert np.abs(st_l - hf_last).max() <= 1e-5 * scale
        compared += 1
    assert compared == 2 * (3 + N_STEPS + 2 * g.current.num_layers)


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "functional"])
def test_constrained_greedy_ids_equal_current(graphs, in_place):
    from nora_edge.generate import TOKEN_MODEL, greedy, prefill
    from nora_edge.static_kv import StaticDecoder

    g = graphs
    static = StaticDecoder(g.static_session, g.st_spec, g.table, g.rows, in_place=in_place)
    model_chosen = 0
    for inputs in g.prompts:
        ids = inputs["input_ids"][0].numpy()
        embeds, pos = hf_prefill_feeds(g.model, inputs)
        delta = int(pos.max()) + 1 - ids.size
        results = []
        for dec in (g.current, static):
            logits, cache = dec.forward(embeds, pos, dec.empty_cache())
            results.append(greedy(dec, logits, cache, ids, delta, g.config))
        cur, st = results
        np.testing.assert_array_equal(st.ids, cur.ids)
        assert st.classes == cur.classes and st.stopped == cur.stopped == "complete"
        model_chosen += sum(c == TOKEN_MODEL for c in cur.classes)
        assert ids.size + len(cur.ids) <= g.max_len
    assert model_chosen > N_PROMPTS  # the trained model chooses tokens itself (not only automaton repairs)
    # a cached prefix serves several continuations in place (the policy's usage)
    prefix = np.arange(5, dtype=np.int64) + 100
    pos5 = np.broadcast_to(np.arange(5), (3, 1, 5)).copy()
    outs = []
    for dec in (g.current, static):
        _, base = prefill(dec, prefix, pos5, dec.empty_cache())
        for tail in ([7, 8, 9], [11, 12]):
            p = np.broadcast_to(np.arange(5, 5 + len(tail)), (3, 1, len(tail))).copy()
            outs.append(prefill(dec, np.array(tail), p, base)[0])
    np.testing.assert_allclose(outs[2], outs[0], rtol=0, atol=1e-5 * np.abs(outs[0]).max())
    np.testing.assert_allclose(outs[3], outs[1], rtol=0, atol=1e-5 * np.abs(outs[1]).max())


def test_graph_is_tensorrt_compatible_and_static(graphs):
    from nora_edge.export.trt_support import assert_tensorrt_compatible

    for version in ("10.3", "latest"):
        report = assert_tensorrt_compatible(graphs.path, version)
        assert not report.problems
    model = onnx.load(str(graphs.path))
    ops = Counter(n.op_type for n in model.graph.node)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert ops["ScatterElements"] == 2 * graphs.current.num_layers and "Concat" not in {
        n.op_type for n in model.graph.node if any("past_key_values" in i for i in n.input)
    }
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }
    kv = [1, graphs.current.num_kv_heads, graphs.max_len, graphs.current.head_dim]
    assert dims[bundle.INPUTS_EMBEDS][:2] == [1, "seq"] and dims["cache_position"] == ["seq"]
    for i in range(graphs.current.num_layers):
        for name in (
            bundle.past_key(i),
            bundle.past_value(i),
            bundle.present_key(i),
            bundle.present_value(i),
        ):
            assert dims[name] == kv
    assert graphs.st_spec.meta["max_len"] == graphs.max_len and graphs.st_spec.meta["kv_cache"] == "static"


def test_overflow_and_stale_cache_raise(graphs):
    from nora_edge.errors import InputError
    from nora_edge.static_kv import CacheOverflowError, StaleCacheError

    g, m = graphs.static, graphs.max_len
    ids = np.arange(m - 1, dtype=np.int64) % 50 + 10
    pos = np.broadcast_to(np.arange(m - 1), (3, 1, m - 1)).copy()
    _, cache = g.forward(g.embed(ids), pos, g.empty_cache())
    _, full = g.forward(g.embed(ids[:1]), np.full((3, 1, 1), m - 1), cache)  # slot MAX-1: fits
    assert full.length == m
    with pytest.raises(CacheOverflowError, match=f"max_len {m}") as err:
        g.forward(g.embed(ids[:1]), np.full((3, 1, 1), m), full)
    assert isinstance(err.value, InputError)
    with pytest.raises(CacheOverflowError, match=f"max_len {m}"):
        g.forward(g.embed(ids[:2]), np.full((3, 1, 2), m - 1), cache)  # 2 tokens into 1 free slot
    with pytest.raises(CacheOverflowError, match=f"max_len {m}"):
        g.forward(g.embed(np.zeros(m + 1, np.int64)), np.zeros((3, 1, m + 1), np.int64), g.empty_cache())
    # in place: a branch from a 3-token cache rewrites slot 3, so the 6-token cache made before it is stale
    p3 = np.broadcast_to(np.arange(3), (3, 1, 3)).copy()
    _, three = g.forward(g.embed(ids[:3]), p3, g.empty_cache())
    _, six = g.forward(g.embed(ids[3:6]), p3 + 3, three)
    g.forward(g.embed(ids[:1]), np.full((3, 1, 1), 3), three)  # allowed: no later write went below slot 3
    with pytest.raises(StaleCacheError, match="slot 3"):
        g.forward(g.embed(ids[:1]), np.full((3, 1, 1), 6), six)


def test_static_decoder_refuses_a_concat_kv_graph(graphs):
    from nora_edge.errors import BundleError
    from nora_edge.static_kv import StaticDecoder

    with pytest.raises(
        BundleError, match=r"kv_cache in \['shared', 'static'\] and max_len"
    ):  # the concat-KV graph + spec
        StaticDecoder(graphs.current.session, graphs.cur_spec, graphs.table, graphs.rows)
