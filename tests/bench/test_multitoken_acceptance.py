"""The multi-token acceptance record every bench report's Orin prediction reads (bench/multitoken_acceptance.py)."""

from __future__ import annotations

import json

import pytest

from nora_edge.bench import multitoken_acceptance as M
from nora_edge.bench.orin_predict import orin_markdown, orin_section
from nora_edge.errors import InputError


def _result(plain: float, multi: float) -> dict:
    return {
        "inputs": 10, "ids_identical": 10, "fallbacks": 0, "tokens_per_chunk": plain + 1.0,
        "plain_calls_per_chunk": plain, "mt_calls_per_chunk": multi, "tokens_histogram": {"3": 6, "4": 4},
        "accepted_per_verify_histogram": {"0": 2, "2": 5},
    }  # fmt: skip


def test_record_round_trip(tmp_path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"source_checkpoint": {"path": "/x/policies/p"}}))
    rec = M.record_from(_result(3.0, 1.5), tmp_path / "loop.npz", bundle, 6, "2026-12-01")
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(rec))
    got = M.load_record(path)
    assert got["acceptance"] == 3.0 / 1.5 and got["block"] == 7 and got["recipe"] == "fp32"
    assert "10 closed-loop calls (loop.npz) of the policy p" in got["source"]


def test_committed_record_feeds_every_report() -> None:
    rec = M.load_record()  # bench/baselines/multitoken_acceptance.json
    assert rec is not None and 1 < rec["acceptance"] <= rec["block"]
    assert rec["ids_identical"] == rec["chunks"] >= 500  # the acceptance check's closed-loop steps
    plain, multi = rec["calls_per_chunk"]["plain"], rec["calls_per_chunk"]["multi_token"]
    assert rec["acceptance"] == pytest.approx(plain / multi, rel=1e-12)
    assert sum(rec["tokens_histogram"].values()) == rec["chunks"]
    sec = orin_section({"median": 21.0, "p90": 25.0, "n": 5}, 5, measured_acceptance=rec)
    measured = [r for r in sec["rows"] if r["mode"] == "multi-token [measured acceptance]"]
    assert len(measured) == 8 and all(
        r["acceptance"] == rec["acceptance"] for r in measured
    )  # 4 Orins x 2 stats
    assert "Measured multi-token acceptance" in "\n".join(orin_markdown(sec))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not json", "not a readable JSON"),
        (json.dumps({"kind": "other"}), "not a multi-token acceptance record"),
        (json.dumps({"kind": M.KIND, "acceptance": 9.0, "block": 7}), "acceptance must be in"),
        (json.dumps({"kind": M.KIND, "acceptance": 2.0, "block": 0}), "block must be"),
    ],
)
def test_bad_records_are_refused(tmp_path, content, match) -> None:
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(InputError, match=match):
        M.load_record(path)
    with pytest.raises(InputError, match="not found"):
        M.load_record(tmp_path / "missing.json")
