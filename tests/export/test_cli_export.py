"""``nora-edge export`` options that steer the shipped-runtime check, through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from nora_edge.cli import app


def test_export_validation_instructions_and_prompts(tiny_ckpt, tmp_path):
    (tmp_path / "tasks.txt").write_text("pick up the cup\n\nopen the drawer\n", encoding="utf-8")
    out = tmp_path / "b"
    args = ["export", str(tiny_ckpt), "--out", str(out), "--validation-prompts", "2"]
    result = CliRunner().invoke(app, [*args, "--validation-instructions", str(tmp_path / "tasks.txt")])
    assert result.exit_code == 0, result.output
    policy = json.loads((out / "manifest.json").read_text())["validation"]["policy"]
    assert policy["pairs"] == 2  # what the CLI asked for, recorded by the export
    missing = CliRunner().invoke(app, [*args, "--validation-instructions", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "cannot read validation instructions" in missing.output
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    empty = CliRunner().invoke(app, [*args, "--validation-instructions", str(tmp_path / "empty.txt")])
    assert empty.exit_code == 2 and "no instruction in the file" in empty.output


def test_export_multi_token_calibration_folder_is_checked_before_any_stage(tiny_ckpt, tmp_path):
    """``--multi-token --calibration DIR`` reads the folder (drafts.json is built from it) before exporting:
    a folder without instructions.jsonl exits 2 naming it, and leaves no bundle. Without --multi-token an fp32
    export does not read it (only recipes and the draft file use calibration frames)."""
    (tmp_path / "calib").mkdir()
    out = tmp_path / "b"
    args = ["export", str(tiny_ckpt), "--out", str(out), "--calibration", str(tmp_path / "calib")]
    bad = CliRunner().invoke(app, [*args, "--multi-token"])
    assert bad.exit_code == 2 and "missing instructions.jsonl" in bad.output, bad.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calib"]
    ok = CliRunner().invoke(app, [*args, "--no-validate"])
    assert ok.exit_code == 0, ok.output
    assert "drafts" not in json.loads((out / "manifest.json").read_text())
