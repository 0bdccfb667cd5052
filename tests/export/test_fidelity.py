"""Fidelity report: per-sample records against direct float64 definitions, aggregates recomputed from the
raw records of the written JSON, and the whole report on real tiny bundles (a bundle against itself must
agree exactly; a quantized one is reported, never zeroed; every built-in recipe passes its own thresholds on
the trained tiny fixture)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nora_edge.errors import InputError
from nora_edge.export.fidelity import (
    REPORT_JSON,
    REPORT_MD,
    PolicyRun,
    aggregate,
    compare_runs,
    fidelity_report,
    write_report,
)


def _run(rng, ids, t=3, d=4, logits=True, error=None, actions=None, classes=None, embeds=None):
    ids = np.asarray(ids, np.int64)
    steps = [rng.standard_normal(16) for _ in ids] if logits else None
    if error is not None:
        return PolicyRun(ids, steps, None, None, error, classes, embeds)
    norm = rng.uniform(-1, 1, (t, d)) if actions is None else actions
    return PolicyRun(ids, steps, 2.0 * norm + 0.5, norm, None, classes, embeds)


M, R, F = "model", "repaired", "forced_continue"


def _pairs(rng):
    """Sample pairs covering: identical, divergence at 2, length mismatch, malformed test, malformed ref,
    gripper flips; token classes and image embeddings on some of them."""
    emb = rng.standard_normal((6, 8))
    a = _run(rng, [5, 6, 7, 8], classes=(M, M, M, M), embeds=emb)
    same = PolicyRun(
        a.ids.copy(), [s.copy() for s in a.step_logits], a.actions.copy(), a.normalized.copy(), None,
        a.classes, emb.copy(),
    )  # fmt: skip
    b = _run(rng, [5, 6, 7, 9, 10], classes=(M, M, M, M, M), embeds=emb)
    b2 = _run(
        rng, [5, 6, 1, 9, 10], classes=(M, R, M, R, F), embeds=emb + 0.1 * rng.standard_normal(emb.shape)
    )
    c = _run(rng, [1, 2, 3], classes=(M, F, M))
    c2 = _run(rng, [1, 2, 3, 4], classes=(M, M, M, M))
    d = _run(rng, [3, 3])
    d2 = _run(rng, [3], error="FAST decode failed: 5 coefficients, expected 12")
    e = _run(rng, [4, 4, 4], error="no action tokens were generated")
    e2 = _run(rng, [4, 4, 4])
    flip = d.normalized.copy()
    flip[:, -1] = -flip[:, -1]  # every gripper step flips sign
    f = PolicyRun(d.ids.copy(), None, 2.0 * flip + 0.5, flip, None)
    return [(a, same), (b, b2), (c, c2), (d, d2), (e, e2), (d, f)]


def _decoder_only(rng, pairs):
    """A decoder-only run per pair: identical to the reference for pair 0, diverging at 1 for pair 1."""
    a = pairs[0][0]
    dec_b = _run(rng, [5, 2, 7, 9, 10])
    return [a, dec_b, None, None, None, None]


def _records(rng) -> list[dict]:
    pairs = _pairs(rng)
    dec = _decoder_only(rng, pairs)
    return [compare_runs(i, f"task {i}", r, t, -1, dec[i]) for i, (r, t) in enumerate(pairs)], pairs, dec


def test_record_fields_match_their_definitions():
    rng = np.random.default_rng(0)
    recs, pairs, dec = _records(rng)
    same, div, longer, bad_test, bad_ref, flips = recs
    assert same["exact_match"] and same["token_agreement"] == 1.0 and same["first_divergence"] is None
    assert np.allclose(same["logits_cosine"], 1.0, atol=1e-15) and len(same["logits_cosine"]) == 4
    assert same["action_l2"] == [0.0] * 4 and same["gripper_flips"] == 0
    # divergence at index 2: 4 of 5 positions agree; logits comparable at steps 0..2 (same context)
    assert div["first_divergence"] == 2 and div["token_agreement"] == pytest.approx(4 / 5)
    r, t = pairs[1]
    want = [
        float(r.step_logits[i] @ t.step_logits[i])
        / np.linalg.norm(r.step_logits[i])
        / np.linalg.norm(t.step_logits[i])
        for i in range(3)
    ]
    assert div["logits_cosine"] == pytest.approx(want, rel=1e-12)
    d = np.asarray(t.actions) - np.asarray(r.actions)
    assert div["action_l2"] == pytest.approx(np.sqrt((d**2).sum(0)).tolist(), rel=1e-12)
    assert div["action_max"] == pytest.approx(np.abs(d).max(0).tolist(), rel=1e-12)
    assert div["gripper_flips"] == int((np.sign(r.normalized[:, -1]) != np.sign(t.normalized[:, -1])).sum())
    # a longer candidate: the extra token is a disagreement, the first divergence is the shorter length
    assert longer["first_divergence"] == 3 and longer["token_agreement"] == pytest.approx(3 / 4)
    assert len(longer["logits_cosine"]) == 3
    # malformed decodes are reported, never compared
    assert bad_test["test_error"].startswith("FAST decode failed") and bad_test["action_l2"] is None
    assert bad_test["test_actions"] is None and bad_ref["ref_error"] and bad_ref["gripper_flips"] is None
    assert flips["gripper_flips"] == 3 and flips["logits_cosine"] is None
    # image embeddings: cosine of the flattened (merged, H) outputs, float64; None when either side lacks them
    assert same["image_embeds_cosine"] == pytest.approx(1.0, abs=1e-15)
    x, y = pairs[1][0].image_embeds.ravel(), pairs[1][1].image_embeds.ravel()
    assert div["image_embeds_cosine"] == pytest.approx(
        x @ y / np.linalg.norm(x) / np.linalg.norm(y), rel=1e-12
    )
    assert div["image_embeds_cosine"] < 0.999 and longer["image_embeds_cosine"] is None
    # token classes are kept per side; decoder-only fields compare the decoder run with the reference
    assert div["test_classes"] == [M, R, M, R, F] and div["ref_classes"] == [M] * 5
    assert bad_ref["ref_classes"] is None and longer["ref_classes"] == [M, F, M]
    assert same["decoder_token_agreement"] == 1.0 and same["decoder_first_divergence"] is None
    assert same["decoder_logits_cosine"] == pytest.approx([1.0] * 4, abs=1e-15)
    assert div["decoder_ids"] == [5, 2, 7, 9, 10] and div["decoder_first_divergence"] == 1
    assert div["decoder_token_agreement"] == pytest.approx(4 / 5) and len(div["decoder_logits_cosine"]) == 2
    assert longer["decoder_ids"] is None and longer["decoder_token_agreement"] is None


def _rate(records, side, cls):
    known = [r[f"{side}_classes"] for r in records if r[f"{side}_classes"] is not None]
    return sum(cls in c for c in known) / len(known) if known else None


def _recompute(records: list[dict]) -> dict:
    """Aggregates from the raw JSON records with independent code: ids, per-step cosines, action chunks."""
    agree, exact, divs, cos_means, cos_all, l2, mx, flips, frac = [], [], [], [], [], [], [], [], []
    d_agree, d_exact, d_cos_means, d_cos_all = [], [], [], []
    bad_ref = bad_test = steps = 0
    for r in records:
        a, b = r["ref_ids"], r["test_ids"]
        n = max(len(a), len(b))
        agree.append(sum(x == y for x, y in zip(a, b, strict=False)) / n if n else 1.0)
        exact.append(a == b)
        if a != b:
            divs.append(
                next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            )
        if r["logits_cosine"]:
            cos_means.append(sum(r["logits_cosine"]) / len(r["logits_cosine"]))
            cos_all += r["logits_cosine"]
        if r["decoder_ids"] is not None:
            c = r["decoder_ids"]
            m = max(len(a), len(c))
            d_agree.append(sum(x == y for x, y in zip(a, c, strict=False)) / m if m else 1.0)
            d_exact.append(a == c)
            if r["decoder_logits_cosine"]:
                d_cos_means.append(sum(r["decoder_logits_cosine"]) / len(r["decoder_logits_cosine"]))
                d_cos_all += r["decoder_logits_cosine"]
        bad_ref += r["ref_error"] is not None
        bad_test += r["test_error"] is not None
        if r["ref_actions"] is not None and r["test_actions"] is not None:
            d = np.array(r["test_actions"]) - np.array(r["ref_actions"])  # (T, D)
            l2.append(np.sqrt((d**2).sum(0)))
            mx.append(np.abs(d).max(0))
            n_ref, n_test = np.array(r["ref_normalized"]), np.array(r["test_normalized"])  # (T, D)
            frac.append(np.abs(n_test - n_ref) / 2)  # robot-unit error / (q99 - q01)
            steps += n_ref.shape[0]
            flips.append(int((np.sign(n_ref[:, -1]) != np.sign(n_test[:, -1])).sum()))
    emb = [r["image_embeds_cosine"] for r in records if r["image_embeds_cosine"] is not None]
    rates = {}
    for name, cls in (("repaired", "repaired"), ("forced_continue", "forced_continue")):
        ref, test = _rate(records, "ref", cls), _rate(records, "test", cls)
        rates[f"{name}_rate_ref"], rates[f"{name}_rate_test"] = ref, test
        rates[f"{name}_rate_increase"] = None if ref is None or test is None else test - ref
    counts = {}
    for side in ("ref", "test"):
        known = [c for r in records if (c := r[f"{side}_classes"]) is not None]
        counts[f"token_classes_{side}"] = (
            {k: sum(c.count(k) for c in known) for k in ("model", "repaired", "forced_continue")}
            if known
            else None
        )
    n = len(records)
    return {
        "n": n,
        "token_agreement_mean": sum(agree) / len(agree),
        "exact_match_rate": sum(exact) / len(exact),
        "first_divergence_min": min(divs) if divs else None,
        "first_divergence_mean": sum(divs) / len(divs) if divs else None,
        "logits_cosine_mean": sum(cos_means) / len(cos_means) if cos_means else None,
        "logits_cosine_min": min(cos_all) if cos_all else None,
        "image_embeds_cosine_mean": sum(emb) / len(emb) if emb else None,
        "image_embeds_cosine_min": min(emb) if emb else None,
        "decoder_token_agreement_mean": sum(d_agree) / len(d_agree) if d_agree else None,
        "decoder_exact_match_rate": sum(d_exact) / len(d_exact) if d_exact else None,
        "decoder_logits_cosine_mean": sum(d_cos_means) / len(d_cos_means) if d_cos_means else None,
        "decoder_logits_cosine_min": min(d_cos_all) if d_cos_all else None,
        "n_action_compared": len(l2),
        "action_l2_mean_per_dof": np.mean(l2, 0).tolist() if l2 else None,
        "action_max_per_dof": np.max(mx, 0).tolist() if mx else None,
        "action_l2_mean": float(np.mean(l2)) if l2 else None,
        "action_err_frac_mean": float(np.mean(frac)) if frac else None,
        "action_err_frac_max": float(np.max(frac)) if frac else None,
        "gripper_flip_samples": sum(f > 0 for f in flips),
        "gripper_flips_total": sum(flips),
        "gripper_flip_rate": sum(flips) / steps if steps else None,
        "malformed_ref": bad_ref,
        "malformed_test": bad_test,
        "malformed_rate_ref": bad_ref / n,
        "malformed_rate_test": bad_test / n,
        "malformed_rate_increase": (bad_test - bad_ref) / n,
        **rates,
        **counts,
    }


def assert_aggregates_recomputable(report_path) -> dict:
    report = json.loads(report_path.read_text())
    want = _recompute(report["records"])
    got = report["aggregates"]
    assert set(got) == set(want)
    for k, v in want.items():
        if v is None or isinstance(v, int | dict):
            assert got[k] == v, k
        else:
            assert np.allclose(got[k], v, rtol=1e-12, atol=1e-15), k
    return report


def test_written_report_aggregates_recompute_from_raw_records(tmp_path):
    rng = np.random.default_rng(1)
    records, _, _ = _records(rng)
    write_report(tmp_path, records, {"reference": "ref", "candidate": "cand", "gripper_dim": -1})
    report = assert_aggregates_recomputable(tmp_path / REPORT_JSON)
    agg = report["aggregates"]
    assert agg["malformed_test"] == 1 and agg["malformed_ref"] == 1 and agg["n_action_compared"] == 4
    # classes known on 3 reference and 3 test chunks: ref (M..), (M..), (M F M); test (M..), (M R M R F), (M..)
    assert agg["repaired_rate_test"] == pytest.approx(1 / 3) and agg["repaired_rate_ref"] == 0.0
    assert agg["forced_continue_rate_increase"] == pytest.approx(0.0)
    assert agg["token_classes_test"] == {"model": 10, "repaired": 2, "forced_continue": 1}
    assert agg["decoder_token_agreement_mean"] == pytest.approx((1.0 + 4 / 5) / 2)
    md = (tmp_path / REPORT_MD).read_text()
    assert "| token_agreement_mean |" in md and md.count("| task ") == 6
    with pytest.raises(InputError, match="no records"):
        aggregate([])


# --- on real bundles (trained tiny fixture: its fp32 outputs carry signal, so quantization noise is measurable) --
@pytest.fixture(scope="module")
def fp32_bundle(tiny_trained_ckpt, tmp_path_factory):
    import torch

    from nora_edge.export.pipeline import export_bundle

    torch.set_num_threads(2)
    return export_bundle(
        tiny_trained_ckpt, tmp_path_factory.mktemp("fid") / "fp32", validate=False, progress=False
    )


def test_bundle_against_itself_agrees_exactly(fp32_bundle, tmp_path):
    from nora_edge.export.quantize.calibration import synthetic_samples

    fidelity_report(fp32_bundle, fp32_bundle, synthetic_samples(2, seed=5), tmp_path)
    report = assert_aggregates_recomputable(tmp_path / REPORT_JSON)
    agg = report["aggregates"]
    assert agg["token_agreement_mean"] == 1.0 and agg["exact_match_rate"] == 1.0
    assert agg["logits_cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert agg["image_embeds_cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert agg["decoder_token_agreement_mean"] == 1.0 and agg["decoder_logits_cosine_min"] == pytest.approx(
        1.0
    )
    assert agg["action_l2_mean"] == 0.0 and agg["gripper_flips_total"] == 0
    assert agg["repaired_rate_increase"] == 0.0 and agg["forced_continue_rate_increase"] == 0.0
    assert sum(agg["token_classes_test"].values()) == sum(len(r["test_ids"]) for r in report["records"]) > 0
    assert all(r["ref_ids"] and r["ref_classes"] == r["test_classes"] for r in report["records"])


def test_quantized_bundle_report_inside_bundle(fp32_bundle, tmp_path):
    from nora_edge.bundle import Bundle
    from nora_edge.export.quantize.bundle_quant import quantize_bundle

    out = quantize_bundle(fp32_bundle, tmp_path / "int8", "int8")
    b = Bundle.load(out)  # the report files are listed and hashed in the manifest
    assert {REPORT_JSON, REPORT_MD} <= set(b.manifest["files"])
    report = assert_aggregates_recomputable(out / REPORT_JSON)
    assert report["aggregates"] == b.manifest["quantization"]["fidelity"]
    assert report["validation"] == b.manifest["validation"]
    assert report["aggregates"]["n"] == 8 and report["aggregates"]["malformed_test"] == 0
    assert 0.99 < report["aggregates"]["decoder_logits_cosine_mean"] < 1.0  # int8 changes the logits
    assert "| decoder | decoder_logits_cosine_mean |" in (out / REPORT_MD).read_text()


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8", "int8-qdq", "int4", "int4-hqq", "mixed"])
def test_every_recipe_bundle_loads_and_passes_its_thresholds(fp32_bundle, tmp_path, make_rgb_image, name):
    from nora_edge.bundle import Bundle
    from nora_edge.export.quantize import GATE_METRICS, get_recipe
    from nora_edge.export.quantize.bundle_quant import quantize_bundle
    from nora_edge.policy import NoraPolicy

    out = quantize_bundle(fp32_bundle, tmp_path / name, name)  # raises FidelityGateError on a miss
    recipe, b, src = get_recipe(name), Bundle.load(out), Bundle.load(fp32_bundle)
    v = b.manifest["validation"]
    assert v["status"] == "passed" and v["failed_metrics"] == [] and not v["accepted_despite_failure"]
    assert len(v["metrics"]) == len(GATE_METRICS) and all(m["passed"] for m in v["metrics"])
    for comp in ("vision", "decoder"):
        assert b.components[comp].precision == recipe.precision(comp)
    q = b.manifest["quantization"]["components"]["decoder"]
    size = sum(
        b.manifest["files"][f]["size"]
        for f in (b.components["decoder"].file, *b.components["decoder"].data_files)
    )
    src_size = sum(
        src.manifest["files"][f]["size"]
        for f in (src.components["decoder"].file, *src.components["decoder"].data_files)
    )
    assert q["bytes_after"] == size and q["bytes_before"] == src_size
    if name != "fp32":
        assert size < src_size
    if name not in ("fp32", "fp16"):
        assert q["nodes_quantized"]
    policy = NoraPolicy.load(out, providers="cpu", forced_tokens="flag")
    actions = policy.predict_action_chunk(make_rgb_image(seed=3), "pick up the red block")
    assert actions.shape == (policy.time_horizon, policy.action_dim) and np.isfinite(actions).all()
    assert_aggregates_recomputable(out / REPORT_JSON)


def test_recorded_calibration_feeds_are_what_the_graphs_take(fp32_bundle):
    import onnxruntime as ort

    from nora_edge.bundle import Bundle
    from nora_edge.export.quantize import record_feeds, synthetic_samples

    feeds = record_feeds(fp32_bundle, synthetic_samples(2, seed=7), max_decoder_feeds=6)
    b = Bundle.load(fp32_bundle)
    assert len(feeds["vision"]) == 2 and len(feeds["decoder"]) == 6
    seq = [f["inputs_embeds"].shape[1] for f in feeds["decoder"]]
    assert seq[0] > 1 and seq[1] > 1 and all(s == 1 for s in seq[2:])  # 2 prefills, then decode steps
    past = [f["past_key_values.0.key"].shape[2] for f in feeds["decoder"]]
    assert past[0] > 0 and past[-1] > past[0]  # prefix KV, then the growing cache
    for name in ("vision", "decoder"):  # every recorded feed runs the fp32 graph as is
        sess = ort.InferenceSession(str(b.file(b.components[name].file)), providers=["CPUExecutionProvider"])
        assert {i.name for i in sess.get_inputs()} == set(feeds[name][0])
        sess.run(None, feeds[name][-1])
