"""Forced-token accounting on planted models: the decoder is replaced by a tiny ONNX graph whose logits at
generation step k are a planted table row, so the model's own choice at every step is known exactly.

Planted sequence: S = the FAST encoding (published rule: chr(coefficient - min_token), the bundle's BPE
tokenizer) of a chunk that needs exactly 10 tokens. At every step the planted logits rank S[k] high; the tests then put the end
token or a forbidden action id above it at chosen steps and check what the runtime reports.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nora_edge import bundle as B
from nora_edge.errors import DetokenizationError, ForcedTokenError
from nora_edge.generate import Decoder
from nora_edge.policy import NoraPolicy
from nora_edge.sessions import GraphSession

NEEDED = 10  # tokens the planted chunk needs
ENDS_AFTER = 3  # the model's top choice is the end token from this step on


def planted_graph(spec: B.ComponentSpec, table: np.ndarray, prompt_len: int) -> bytes:
    """Decoder graph with the bundle's I/O names: logits = table[total_len - prompt_len] (clipped), present KV =
    past KV + zeros for the new tokens. ``table``: (steps, rows) float32."""
    m = spec.meta
    layers, kvh, hd = int(m["num_layers"]), int(m["num_kv_heads"]), int(m["head_dim"])
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr), name)  # noqa: E731
    inits = [
        c("table", table.astype(np.float32)),
        c("p0", np.array(prompt_len, np.int64)),
        c("zero_i", np.array(0, np.int64)),
        c("last", np.array(table.shape[0] - 1, np.int64)),
        c("one", np.array([1], np.int64)),
        c("ax0", np.array([0], np.int64)),
        c("kvh", np.array([kvh], np.int64)),
        c("hd", np.array([hd], np.int64)),
        c("zero_f", np.zeros((1,), np.float32)),
    ]
    nodes = [
        helper.make_node("Shape", [B.ATTENTION_MASK], ["mshape"]),
        helper.make_node("Gather", ["mshape", "one"], ["total1"], axis=0),  # (1,) past + new tokens
        helper.make_node("Squeeze", ["total1", "ax0"], ["total"]),
        helper.make_node("Sub", ["total", "p0"], ["k"]),  # generation step
        helper.make_node("Max", ["k", "zero_i"], ["k0"]),
        helper.make_node("Min", ["k0", "last"], ["kc"]),
        helper.make_node("Unsqueeze", ["kc", "ax0"], ["kidx"]),
        helper.make_node("Gather", ["table", "kidx"], [B.LOGITS], axis=0),  # (1, rows)
        helper.make_node("Shape", [B.INPUTS_EMBEDS], ["eshape"]),
        helper.make_node("Gather", ["eshape", "one"], ["s1"], axis=0),  # (1,) new tokens
        helper.make_node("Concat", ["one", "kvh", "s1", "hd"], ["new_shape"], axis=0),
    ]
    nodes.append(helper.make_node("Expand", ["zero_f", "new_shape"], ["new_kv"]))
    ins = [
        helper.make_tensor_value_info(B.INPUTS_EMBEDS, f, [1, "s", int(m["hidden_size"])]),
        helper.make_tensor_value_info(B.POSITION_IDS, i64, [3, 1, "s"]),
        helper.make_tensor_value_info(B.ATTENTION_MASK, i64, [1, "t"]),
    ]
    outs = [helper.make_tensor_value_info(B.LOGITS, f, [1, table.shape[1]])]
    for li in range(layers):
        for past, present in ((B.past_key(li), B.present_key(li)), (B.past_value(li), B.present_value(li))):
            ins.append(helper.make_tensor_value_info(past, f, [1, kvh, "p", hd]))
            nodes.append(helper.make_node("Concat", [past, "new_kv"], [present], axis=2))
            outs.append(helper.make_tensor_value_info(present, f, [1, kvh, "t", hd]))
    graph = helper.make_graph(nodes, "planted_decoder", ins, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def planted_chunk_ids(policy: NoraPolicy) -> np.ndarray:
    """FAST ids of a deterministic chunk whose published FAST encoding has exactly NEEDED tokens.

    The chunk is built in coefficient space (quantized DCT coefficients: zeros plus 8 small ones), which is what
    FAST's BPE encodes: chr(c - min_token) per coefficient, row-major, then the bundle's BPE tokenizer.
    """
    from tokenizers import Tokenizer

    c = policy.bundle.codec
    tok = Tokenizer.from_file(str(policy.bundle.file(c.tokenizer)))
    rng = np.random.default_rng(0)
    n = c.time_horizon * c.action_dim
    for _ in range(5000):
        coeff = np.zeros(n, np.int64)
        coeff[rng.choice(n, 8, replace=False)] = rng.integers(-5, 6, 8)
        ids = tok.encode("".join(map(chr, coeff - c.min_token))).ids
        if len(ids) == NEEDED:
            return np.array(ids, np.int64)
    raise AssertionError(f"no chunk with a {NEEDED}-token encoding found")


@pytest.fixture(scope="module")
def base_policy(rt_bundle_h5):
    """NORA-Long shape (T=5, 35 coefficients): chunks take 10 tokens and more."""
    return NoraPolicy.load(rt_bundle_h5, providers="cpu", threads=1)


def observation():
    from nora_edge.export.images import random_rgb_image

    return random_rgb_image(5, 200, 240), "pick up the red cup"


def planted_policy(base: NoraPolicy, table: np.ndarray, **rule) -> NoraPolicy:
    """``base`` with its decoder replaced by :func:`planted_graph` over ``table`` (steps, head rows)."""
    from nora_edge.chunk import ForcedTokenRule

    image, instruction = observation()
    prompt_len = base.prompt.build(instruction, np.array([base.image_spec.grid_thw()])).input_ids.size
    spec = base.bundle.components["decoder"]
    session = GraphSession("decoder", ort.InferenceSession(planted_graph(spec, table, prompt_len)))
    decoder = Decoder(session, spec, base.decoder.embeddings, base.decoder.head_rows)
    return NoraPolicy(
        base.bundle, base.vision, decoder, base.prompt, base.table, base.automaton, base.image_spec,
        True, ForcedTokenRule(**rule),
    )  # fmt: skip


def plant(base: NoraPolicy, seq: np.ndarray, overrides: dict[int, int]) -> np.ndarray:
    """(steps, rows) logits: step k ranks action id seq[k] at 5.0 and the Qwen id ``overrides[k]`` at 9.0."""
    rows = base.decoder.head_rows
    row_of = {int(q): r for r, q in enumerate(rows.tolist())}
    base_id = base.bundle.actions.base
    table = np.zeros((len(seq) + 2, rows.size), np.float32)
    for k, fid in enumerate(seq):
        table[k, row_of[base_id + int(fid)]] = 5.0
        if k in overrides:
            table[k, row_of[overrides[k]]] = 9.0
    return table


def test_end_token_top_after_3_of_10(base_policy):
    """The model wants to end after 3 of the 10 tokens the chunk needs: the default policy refuses the chunk
    naming step 3; "flag" returns it with forced_continue = 7."""
    seq = planted_chunk_ids(base_policy)
    eos = int(base_policy.bundle.generation.eos_token_ids[0])
    table = plant(base_policy, seq, {k: eos for k in range(ENDS_AFTER, NEEDED)})
    image, instruction = observation()
    strict = planted_policy(base_policy, table)
    with pytest.raises(ForcedTokenError, match=r"refused at step 3 of 10") as exc:
        strict.run_chunk(image, instruction)
    err = exc.value
    assert isinstance(err, DetokenizationError) and err.step == ENDS_AFTER
    assert err.token_classes == ("model",) * 3 + ("forced_continue",) * 7
    np.testing.assert_array_equal(err.ids, seq + base_policy.bundle.actions.base)
    assert strict.last_output is None  # nothing was handed out

    flagged = planted_policy(base_policy, table, mode="flag")
    out = flagged.run_chunk(image, instruction)
    assert out.forced == NEEDED - ENDS_AFTER == 7 and out.repaired == 0 and out.flagged
    np.testing.assert_array_equal(out.fast_ids, seq)
    np.testing.assert_array_equal(out.top_ids[ENDS_AFTER:], [eos] * 7)
    assert flagged.last_timings["token_classes"] == {"model": 3, "repaired": 0, "forced_continue": 7}


def test_forbidden_top_choice_is_repaired(base_policy):
    """A forbidden action id on top at one step is repaired (the allowed S[k] is taken) and counted."""
    seq = planted_chunk_ids(base_policy)
    auto = base_policy.automaton
    state, step, forbidden = auto.start(), None, None
    for k, fid in enumerate(seq):  # the first step where the automaton forbids some action id
        banned = np.flatnonzero(~auto.allowed(state))
        if banned.size:
            step, forbidden = k, int(banned[0])
            break
        state = auto.advance(state, int(fid))
    assert step is not None, "the automaton never forbids an id along the planted chunk"
    bad = int(base_policy.bundle.actions.base + forbidden)
    table = plant(base_policy, seq, {step: bad})
    image, instruction = observation()
    with pytest.raises(ForcedTokenError, match=f"step {step} of 10.*max_repaired=0") as exc:
        planted_policy(base_policy, table).run_chunk(image, instruction)
    assert exc.value.token_classes[step] == "repaired" and exc.value.token_classes.count("repaired") == 1
    out = planted_policy(base_policy, table, max_repaired=1).run_chunk(image, instruction)
    assert out.repaired == 1 and out.forced == 0 and int(out.top_ids[step]) == bad
    np.testing.assert_array_equal(out.fast_ids, seq)


def test_model_own_chunk_is_not_flagged(base_policy):
    seq = planted_chunk_ids(base_policy)
    out = planted_policy(base_policy, plant(base_policy, seq, {})).run_chunk(*observation())
    assert out.token_classes == ("model",) * NEEDED and not out.flagged
    np.testing.assert_array_equal(out.top_ids, out.ids)


def test_rule_options_are_validated(rt_bundle_action):
    from nora_edge.errors import InputError

    with pytest.raises(InputError, match="forced_tokens must be one of"):
        NoraPolicy.load(rt_bundle_action, providers="cpu", forced_tokens="ignore")
    with pytest.raises(InputError, match="max_repaired must be an int >= 0"):
        NoraPolicy.load(rt_bundle_action, providers="cpu", max_repaired=-1)
