"""``nora-edge run`` through typer's CliRunner on the default (action head) bundle."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from nora_edge.cli import app
from nora_edge.policy import NoraPolicy


def test_run_json_reports_milliseconds_and_token_classes(rt_bundle_action, tmp_path):
    from nora_edge.export.images import random_rgb_image

    image = random_rgb_image(31, 200, 260)
    np.save(tmp_path / "frame.npy", image)
    args = ["run", str(rt_bundle_action), "--image", str(tmp_path / "frame.npy"), "--instruction", "open it"]
    # random weights: the automaton overrides the model, so the default refuses and names the reason
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "ForcedTokenError" in refused.output
    result = CliRunner().invoke(app, [*args, "--json", "--allow-forced"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    policy = NoraPolicy.load(rt_bundle_action, providers="cpu", forced_tokens="flag")
    out = policy.run_chunk(image, "open it")
    np.testing.assert_allclose(np.array(data["actions"]), out.actions, rtol=0, atol=1e-12)
    assert data["token_classes"] == out.class_counts and data["flagged"] is True
    ms = data["timings_ms"]
    assert len(ms["decode_steps"]) == data["new_tokens"] - 1 == out.ids.size - 1
    assert 0 < ms["vision"] + ms["prefill"] <= ms["total"]
    # milliseconds: a chunk (vision + prefill + several decoder steps) takes well over 1 ms, and a tiny model's
    # chunk well under 1 s, so seconds would show up as a total below 1
    assert ms["total"] > 1.0, f"timings look like seconds, not ms: {ms}"
    assert data["mode"] == "constrained" and "CPUExecutionProvider" in data["providers"]["decoder"]
    assert data["codec_backend"] == policy.codec_backend
    numpy_run = CliRunner().invoke(app, [*args, "--json", "--allow-forced", "--kernels", "numpy"])
    assert numpy_run.exit_code == 0, numpy_run.output
    assert json.loads(numpy_run.output)["codec_backend"] == "numpy"
    np.testing.assert_array_equal(
        np.array(json.loads(numpy_run.output)["actions"]), np.array(data["actions"])
    )
    bad = CliRunner().invoke(app, [*args, "--kernels", "cuda"])
    assert bad.exit_code == 2 and "kernels must be" in bad.output
