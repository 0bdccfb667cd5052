"""Lossless multi-token decoding (nora_edge.multitoken) vs the plain sequential greedy loop.

The reference is the plain path itself: ``NoraPolicy.run_chunk`` (its ids) and ``generate.greedy`` on the same
prefill (ids, classes, top ids, stop reason). Inputs: the parity set ``held_out_pairs(N, seed=11)`` run twice, so
the second pass has earlier chunks of every instruction to draft from (most drafts accepted), plus drafts chosen
to be all right (oracle), all wrong, or right with holes, which exercise every acceptance length and KV rollback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nora_edge.bundle import LOGITS_ALL, Bundle
from nora_edge.drafts import DraftTable
from nora_edge.errors import BundleError, DetokenizationError, ForcedTokenError, InputError
from nora_edge.generate import decode_step
from nora_edge.multitoken import MultiTokenConfig, multitoken_greedy
from nora_edge.multitoken_runner import MultiTokenRunner
from nora_edge.policy import NoraPolicy
from tests.synthetic_pairs import held_out_pairs

N_PAIRS = 12


def _verify_bundle(ckpt: Path, root: Path, **export_kw) -> Path:
    """``export --multi-token``: the decoder also outputs logits_all."""
    from nora_edge.export.pipeline import export_bundle

    return export_bundle(ckpt, root / "mt", validate=False, progress=False, multi_token=True, **export_kw)


# the medium fixture's bundles take ~2.5 min to build and run: `make test-slow` (the tiny one runs in `make test`)
@pytest.fixture(
    scope="module", params=["tiny_trained_ckpt_h5", pytest.param("medium_ckpt", marks=pytest.mark.slow)]
)
def runner(request, tmp_path_factory) -> MultiTokenRunner:
    """Default ``--multi-token`` bundle (action head, fp16 table, constrained) of a trained and a random fixture."""
    ckpt = request.getfixturevalue(request.param)
    bundle = _verify_bundle(ckpt, tmp_path_factory.mktemp(f"mt_{request.param}"))
    return MultiTokenRunner.load(bundle, providers="cpu", threads=1, forced_tokens="flag")


def _plain_ids(policy: NoraPolicy, image, text) -> np.ndarray:
    try:
        policy.run_chunk(image, text)
    except (DetokenizationError, ForcedTokenError):
        pass  # last_ids is kept: the comparison is on ids
    return policy.last_ids


def _same_result(a, b) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.top_ids, b.top_ids)
    assert a.classes == b.classes and a.stopped == b.stopped


def test_ids_identical_to_plain_greedy_on_the_parity_set(runner) -> None:
    runner.drafts = DraftTable(min_rate=0.0)  # never gated: every chunk drafts
    pairs = held_out_pairs(N_PAIRS, seed=11)
    compared = verify_calls = accepted = plain_calls = mt_calls = 0
    for _ in range(2):  # the second pass drafts from the first
        for image, text in pairs:
            ref = _plain_ids(runner.policy, image, text)
            plain, _ = runner.plain(image, text)
            got, stats, _ = runner.multitoken(image, text)
            np.testing.assert_array_equal(got.ids, ref)
            _same_result(got, plain)
            assert not stats.fallback
            compared += 1
            verify_calls += stats.verify_calls
            accepted += stats.accepted
            plain_calls += len(plain.step_seconds)
            mt_calls += stats.decoder_calls
            assert len(got.step_seconds) == stats.decoder_calls
    assert compared == 2 * N_PAIRS
    assert verify_calls > 0 and accepted > 0  # the multi-token path was exercised, not only plain steps
    assert mt_calls < plain_calls


def _oracle_case(runner: MultiTokenRunner, k: int, corrupt):
    """Plain result, then multitoken_greedy with drafts taken from the plain ids (``corrupt`` edits them)."""
    pol = runner.policy
    image, text = held_out_pairs(1, seed=11)[0]
    prompt, logits, cache = runner._prefill(image, text)
    plain, _ = runner.plain(image, text)
    truth = plain.ids.tolist()

    def propose(out, kk):
        return corrupt(truth[len(out) : len(out) + kk], len(out))

    got, stats = multitoken_greedy(
        pol.decoder, runner.verify, logits, cache, prompt.input_ids, prompt.rope_delta, pol._greedy,
        propose, max_draft=k,
    )  # fmt: skip
    return plain, got, stats


@pytest.mark.parametrize("k", [1, 3, 8])
def test_oracle_drafts_are_all_accepted(runner, k) -> None:
    plain, got, stats = _oracle_case(runner, k, lambda d, n: d)
    _same_result(got, plain)
    n = plain.ids.size
    # the first token comes from the prefill; every call then yields its k drafts + the bonus token
    assert stats.decoder_calls == -(-(n - 1) // (k + 1))
    assert stats.accepted == stats.proposed


def test_wrong_drafts_cost_one_call_per_token(runner) -> None:
    base, count = runner.policy.bundle.actions.base, runner.policy.bundle.actions.count

    def wrong(d, n):  # another action id at every position (the automaton may still cut it)
        return [base + (x - base + 1) % count for x in d]

    plain, got, stats = _oracle_case(runner, 4, wrong)
    _same_result(got, plain)
    assert stats.accepted == 0 and stats.decoder_calls == plain.ids.size - 1


def test_drafts_with_holes_roll_the_cache_back(runner) -> None:
    base, count = runner.policy.bundle.actions.base, runner.policy.bundle.actions.count

    def holes(d, n):  # every third absolute position wrong: acceptance lengths 0, 1 and 2 all occur
        return [base + (x - base + 1) % count if (n + i) % 3 == 2 else x for i, x in enumerate(d)]

    plain, got, stats = _oracle_case(runner, 5, holes)
    _same_result(got, plain)
    assert 0 < stats.accepted < stats.proposed


def test_verify_logits_equal_sequential_steps(runner) -> None:
    """The verify graph on S tokens == S plain decode steps (fp32 tolerance), and its KV too."""
    pol = runner.policy
    image, text = held_out_pairs(2, seed=11)[1]
    prompt, logits, cache0 = runner._prefill(image, text)
    ids = runner.plain(image, text)[0].ids[:-1]
    index = int(prompt.input_ids.size)
    seq, cache = [], cache0
    for j, t in enumerate(ids.tolist()):
        lg, cache = decode_step(pol.decoder, t, index + j, prompt.rope_delta, cache)
        seq.append(lg)
    ver, grown = runner.verify.forward(ids, index, prompt.rope_delta, cache0)
    assert ver.shape == (ids.size, pol.decoder.head_rows.size) and ids.size >= 2
    np.testing.assert_allclose(ver, np.stack(seq), rtol=0, atol=1e-4)
    for name in pol.decoder.kv_names:
        np.testing.assert_allclose(grown.values[name].numpy(), cache.values[name].numpy(), rtol=0, atol=1e-5)


def test_near_tie_guard_falls_back_to_plain(runner) -> None:
    image, text = held_out_pairs(1, seed=11)[0]
    plain, _ = runner.plain(image, text)
    runner.multitoken(image, text)  # learn a draft for this instruction
    got, stats, _ = runner.multitoken(image, text, tie_margin=1e9, learn=False)
    _same_result(got, plain)
    assert plain.ids.size > 1 and stats.verify_calls == 1 and stats.fallback


def test_unconstrained_hf_parity_mode(tiny_ckpt, tmp_path_factory) -> None:
    """Full head, fp32 table, constrained=False (HF greedy parity): ids identical, eos and length rules included."""
    bundle = _verify_bundle(
        tiny_ckpt, tmp_path_factory.mktemp("mt_full"), head="full", embeddings_dtype="float32"
    )
    r = MultiTokenRunner.load(bundle, providers="cpu", threads=1, constrained=False)
    compared = 0
    for _ in range(2):
        for image, text in held_out_pairs(6, seed=11):
            plain, _ = r.plain(image, text)
            got, stats, _ = r.multitoken(image, text)
            _same_result(got, plain)
            compared += 1
    assert compared == 12


def test_multi_token_bundle_layout_and_plain_loading(runner) -> None:
    b = Bundle.load(runner.policy.bundle.path)  # sha256 of every file
    spec = b.components["decoder"]
    assert spec.meta["logits_all"] is True and [o.name for o in spec.outputs[:2]] == ["logits", LOGITS_ALL]
    assert spec.outputs[1].shape[-1] == b.actions.head_rows.size
    assert set(b.components) == {"vision", "decoder"}  # one graph: the weights are stored once
    image, text = held_out_pairs(1, seed=11)[0]
    with NoraPolicy.load(b, providers="cpu", threads=1, forced_tokens="flag") as plain_policy:
        np.testing.assert_array_equal(_plain_ids(plain_policy, image, text), runner.plain(image, text)[0].ids)
        assert plain_policy.multi_token is None and plain_policy.last_timings["decoding"] == "plain"


def test_policy_decoding_option_gives_the_plain_chunks(runner) -> None:
    """NoraPolicy(decoding="multi-token").run_chunk == NoraPolicy(plain).run_chunk: ids, classes, actions."""
    path = runner.policy.bundle.path
    pairs = held_out_pairs(6, seed=11)
    kw = dict(providers="cpu", threads=1, forced_tokens="flag")
    compared = calls_plain = calls_multi = 0
    with NoraPolicy.load(path, **kw) as plain, NoraPolicy.load(path, decoding="multi-token", **kw) as multi:
        for _ in range(2):
            for image, text in pairs:
                try:
                    want = plain.run_chunk(image, text)
                except DetokenizationError:
                    continue  # compared on ids by the parity test; here whole chunks
                got = multi.run_chunk(image, text)
                np.testing.assert_array_equal(got.ids, want.ids)
                np.testing.assert_array_equal(got.actions, want.actions)
                assert got.token_classes == want.token_classes
                t = multi.last_timings
                assert (
                    t["decoding"] == "multi-token" and t["multi_token"]["decoder_calls"] == t["decoder_calls"]
                )
                calls_plain += plain.last_timings["decoder_calls"]
                calls_multi += t["decoder_calls"]
                compared += 1
        assert compared >= 8  # the trained fixture's chunks decode; the random medium one's mostly too
        assert calls_multi < calls_plain
        multi.reset()  # keeps the draft table: earlier episodes are what the next one drafts from
        assert multi.multi_token.drafts.by_key


def test_errors(runner, tiny_ckpt_h5, tmp_path_factory) -> None:
    from nora_edge.export.pipeline import export_bundle

    plain = export_bundle(
        tiny_ckpt_h5, tmp_path_factory.mktemp("noverify") / "b", validate=False, progress=False
    )
    with pytest.raises(BundleError, match=LOGITS_ALL):
        MultiTokenRunner.load(plain, providers="cpu", threads=1)
    with pytest.raises(InputError, match="decoding"):
        NoraPolicy.load(plain, decoding="speculative")
    with pytest.raises(InputError, match="multi-token"):
        NoraPolicy.load(plain, multi_token=MultiTokenConfig())
    with pytest.raises(InputError, match="max_draft"):
        MultiTokenConfig(max_draft=0)
    with pytest.raises(InputError, match="tie_margin"):
        MultiTokenConfig(tie_margin=float("nan"))
    image, text = held_out_pairs(1, seed=11)[0]
    with pytest.raises(InputError, match="max_draft"):
        runner.multitoken(image, text, max_draft=0)


@pytest.fixture(scope="module", params=["fused", "static"])
def fixed_buffer_runner(request, tiny_trained_ckpt_h5, tmp_path_factory) -> MultiTokenRunner:
    """The fused onnxruntime flavor (shared KV buffers, GroupQueryAttention) and the TensorRT flavor (static KV
    written at cache_position, run here in onnxruntime), both exported with --multi-token."""
    kw = {"decoder_graph": "fused"} if request.param == "fused" else {"target": "tensorrt"}
    bundle = _verify_bundle(tiny_trained_ckpt_h5, tmp_path_factory.mktemp(f"mt_{request.param}"), **kw)
    return MultiTokenRunner.load(bundle, providers="cpu", threads=1, forced_tokens="flag")


def test_fixed_buffer_flavors_identical_to_plain(fixed_buffer_runner) -> None:
    """KV rollback on fixed buffers = the held length goes back (rows above are overwritten, never read)."""
    from nora_edge.static_kv import StaticDecoder

    r = fixed_buffer_runner
    assert isinstance(r.policy.decoder, StaticDecoder)
    r.drafts = DraftTable(min_rate=0.0)
    compared = accepted = mt_calls = plain_calls = 0
    for _ in range(2):
        for image, text in held_out_pairs(N_PAIRS, seed=11):
            plain, _ = r.plain(image, text)
            got, stats, _ = r.multitoken(image, text)
            _same_result(got, plain)
            assert not stats.fallback
            compared += 1
            accepted += stats.accepted
            mt_calls += stats.decoder_calls
            plain_calls += len(plain.step_seconds)
    assert compared == 2 * N_PAIRS and accepted > 0 and mt_calls < plain_calls


def test_draft_table_lookup() -> None:
    t = DraftTable(max_suffix=3)
    assert t.propose("a", [5], 4) == []
    t.observe("a", np.array([1, 2, 3, 4, 5, 6]))
    assert t.propose("a", [1, 2], 3) == [3, 4, 5]  # continuation in the same instruction's chunk
    assert t.propose("a", [9, 4], 8) == [5, 6]  # suffix (4,), clipped at the chunk's end
    assert t.propose("b", [2, 3], 2) == [4, 5]  # another instruction: the index of every chunk
    t.observe("a", np.array([1, 2, 7, 8]))
    assert t.propose("a", [1, 2], 3) == [7, 8]  # the most recent chunk wins at equal length
    t.observe("c", np.array([1, 2, 9, 9]))
    assert t.propose("a", [1, 2], 3) == [7, 8]  # the same instruction first
    assert t.propose("b", [1, 2], 3) == [9, 9]  # else the most recent chunk of any instruction
    t.observe("d", np.array([3, 5, 3, 6]))
    assert t.propose("d", [3], 2) == [5, 3]  # within a chunk the earliest occurrence
    t.observe("e", np.array([1, 2, 3]))
    t.observe("e", np.array([4, 2, 5]))
    assert t.propose("e", [1, 2], 1) == [3]  # a longer suffix beats a more recent chunk
    assert t.propose("e", [9, 2], 1) == [5]


def test_draft_gate_turns_off_failing_drafts_and_probes() -> None:
    t = DraftTable(min_rate=0.5, probe_every=2)
    assert t.enabled("g")  # nothing recorded
    t.record("g", 4, 0)
    assert t.enabled("g")  # too few drafts to judge
    t.record("g", 10, 1)  # decayed: 13.2 proposed, 0.8 accepted
    assert [t.enabled("g") for _ in range(4)] == [False, True, False, True]  # every 2nd chunk probes
    t.record("g", 20, 20)  # 30.56 proposed, 20.64 accepted
    assert t.enabled("g") and t.enabled("other")
