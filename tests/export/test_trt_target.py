"""`export --target tensorrt` (fp32): a static-KV decoder, both graphs inside TensorRT's operator tables, validated
like any export, and the runtime's greedy ids equal to the onnxruntime-target bundle's.

Reference: the same checkpoint exported for onnxruntime (the current decoder, KV grown by concatenation), run by
the same NoraPolicy on the same frames and instructions; the TensorRT-flavor export also passes the PyTorch graph
checks and NORA's reference-policy check in its own validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nora_edge.bundle import Bundle
from nora_edge.errors import ExportError

PROFILE = str(Path(__file__).resolve().parents[2] / "profiles" / "orin-agx-64gb.toml")


@pytest.fixture(scope="module")
def bundles(trt_target_bundles) -> tuple[Path, Path]:
    return trt_target_bundles


def test_manifest_and_validation(bundles):
    from nora_edge.export.pipeline import TRT_MAX_INSTRUCTION_TOKENS

    b = Bundle.load(bundles[0])
    meta = b.components["decoder"].meta
    assert b.manifest["export"]["target"] == "tensorrt" and meta["kv_cache"] == "static"
    assert b.manifest["prompt"]["max_instruction_tokens"] == TRT_MAX_INSTRUCTION_TOKENS
    longest = len(b.prompt.prefix_ids) + len(b.prompt.suffix_ids) + TRT_MAX_INSTRUCTION_TOKENS
    assert meta["max_len"] >= longest + 4 * b.codec.time_horizon * b.codec.action_dim + 1
    v = b.manifest["validation"]
    checks = ("decoder_prefill", "decoder_decode", "decoder_table", "policy")
    assert all(v[k]["passed"] for k in checks), {k: v[k] for k in checks}
    assert v["policy"]["pairs"] == 4


def test_greedy_ids_equal_the_onnxruntime_target(bundles):
    from nora_edge.export.synthetic_task import instruction_list
    from nora_edge.policy import NoraPolicy
    from nora_edge.static_kv import StaticDecoder

    trt = NoraPolicy.load(bundles[0], providers="cpu", threads=1, forced_tokens="flag")
    ort = NoraPolicy.load(bundles[1], providers="cpu", threads=1, forced_tokens="flag")
    assert isinstance(trt.decoder, StaticDecoder) and not isinstance(ort.decoder, StaticDecoder)
    rng = np.random.default_rng(3)
    compared = 0
    for k, instruction in enumerate(instruction_list()[:6]):
        image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        a, b = trt.run_chunk(image, instruction), ort.run_chunk(image, instruction)
        np.testing.assert_array_equal(a.ids, b.ids, err_msg=f"pair {k}")
        assert a.token_classes == b.token_classes
        np.testing.assert_allclose(a.actions, b.actions, rtol=0, atol=1e-9)
        compared += 1
    assert compared == 6


def test_graphs_pass_the_tensorrt_checker(bundles):
    from nora_edge.cli import app

    result = CliRunner().invoke(app, ["check-trt", str(bundles[0]), "--trt", "10.3"])
    assert result.exit_code == 0, result.output
    assert result.output.count(": OK") == 2  # vision and decoder
    ort = CliRunner().invoke(app, ["check-trt", str(bundles[1])])
    assert ort.exit_code == 0  # the fp32 onnxruntime graphs use standard ops too; only their KV grows


def test_quantized_tensorrt_target_is_refused(tiny_trained_ckpt_h5: Path, tmp_path):
    from nora_edge.export.pipeline import export_bundle

    with pytest.raises(ExportError, match="recipe 'int8' cannot target TensorRT"):
        export_bundle(
            tiny_trained_ckpt_h5, tmp_path / "x", target="tensorrt", precision="int8", progress=False
        )
    with pytest.raises(ExportError, match="target must be one of"):
        export_bundle(tiny_trained_ckpt_h5, tmp_path / "y", target="tensorrt-llm", progress=False)


def test_profiles_match_the_graphs_and_trtexec_commands(bundles, tmp_path):
    """The manifest's optimization profiles name the decoder's dynamic inputs with their static dims, and
    `build-engine --print-trtexec` turns them into one trtexec build per graph; without TensorRT (or for an
    onnxruntime-target bundle) build-engine fails naming what to do."""
    import onnx

    from nora_edge.cli import app

    b = Bundle.load(bundles[0])
    section = b.manifest["tensorrt"]
    assert section["checked_versions"] == ["10.3", "latest"]
    assert section["kv_cache"]["max_len"] == b.components["decoder"].meta["max_len"]
    graph = onnx.load(b.file(b.components["decoder"].file), load_external_data=False).graph
    inputs = {i.name: i.type.tensor_type.shape.dim for i in graph.input}
    profile, checked = section["profiles"]["decoder"], 0
    for name, dims in profile.items():
        graph_dims = inputs[name]
        assert len(dims["min"]) == len(dims["opt"]) == len(dims["max"]) == len(graph_dims), name
        for axis, d in enumerate(graph_dims):
            if d.dim_param:  # dynamic: 1 (a decode step, optimized) .. the longest prompt
                assert (
                    dims["min"][axis]
                    == dims["opt"][axis]
                    == 1
                    < dims["max"][axis]
                    <= section["kv_cache"]["max_len"]
                )
            else:
                assert dims["min"][axis] == dims["max"][axis] == d.dim_value, (name, axis)
            checked += 1
    assert checked == 3 + 3 + 1  # inputs_embeds, position_ids, cache_position
    assert all(
        not i.type.tensor_type.shape.dim[0].dim_param for i in graph.input if i.name.startswith("past")
    )
    run = CliRunner().invoke(app, ["build-engine", str(bundles[0]), "--profile", PROFILE, "--print-trtexec"])
    assert run.exit_code == 0, run.output
    lines = run.output.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("trtexec --onnx=") for line in lines)
    assert "--minShapes=inputs_embeds:1x1x" in lines[1] and "--memPoolSize=workspace:1024" in lines[1]
    assert f"{bundles[0].name}.engines/orin-agx-64gb/decoder.plan" in lines[1] and "Shapes" not in lines[0]
    build = CliRunner().invoke(app, ["build-engine", str(bundles[0]), "--profile", PROFILE])
    assert build.exit_code == 2 and "--print-trtexec" in build.output
    ort = CliRunner().invoke(app, ["build-engine", str(bundles[1]), "--profile", PROFILE, "--print-trtexec"])
    assert ort.exit_code == 2 and "--target tensorrt" in ort.output
