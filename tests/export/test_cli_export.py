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
