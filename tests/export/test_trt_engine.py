"""`nora-edge build-engine` and the runtime's TensorRT EP options on a real `--target tensorrt` bundle.

Reference: the bundle's manifest.json read as plain JSON (the ``tensorrt.profiles`` section the export wrote) and
the ONNX graphs' own input shapes (onnx.load); the build plan, the printed trtexec commands and the EP's
``trt_profile_*_shapes`` strings must all carry exactly those shapes. Without TensorRT (this machine, CI) the API
build fails with the message pointing to --print-trtexec; the real build is a separate test, skipped unless
tensorrt imports (it also needs an NVIDIA GPU). No test here claims an engine was built.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nora_edge.bundle import Bundle
from nora_edge.errors import BundleError, ExportError, InputError
from nora_edge.profiles import load_profile_file
from nora_edge.sessions import CPU_EP, CUDA_EP, TRT_EP, resolve_providers
from nora_edge.trt_profiles import PROFILE_KEYS, component_profile, parse_shapes

PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "orin-agx-64gb.toml"
DEVICE = load_profile_file(PROFILE).name
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def trt_bundle(trt_target_bundles) -> Path:
    """The session's `--target tensorrt` bundle of the trained tiny checkpoint (tests that change it copy it)."""
    return trt_target_bundles[0]


def manifest_profiles(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["tensorrt"]["profiles"]


def dynamic_graph_inputs(onnx_path: Path) -> set[str]:
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    return {i.name for i in graph.input if any(d.dim_param for d in i.type.tensor_type.shape.dim)}


def trtexec_options(command: str) -> dict[str, str]:
    args = shlex.split(command)
    assert args[0] == "trtexec"
    return dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in args[1:])


def test_build_plan_and_trtexec_commands_carry_the_manifest_profiles(trt_bundle):
    from nora_edge.export.trt_engine import build_plan, engine_dir, trtexec_commands

    b = Bundle.load(trt_bundle)
    want = manifest_profiles(trt_bundle)
    plan = build_plan(b, DEVICE, workspace_mib=512)
    commands = trtexec_commands(b, DEVICE, workspace_mib=512)
    assert [c.name for c in plan.components] == ["vision", "decoder"] and len(commands) == 2
    assert plan.out_dir == engine_dir(b, DEVICE) == trt_bundle.parent / f"{trt_bundle.name}.engines" / DEVICE
    assert plan.workspace_bytes == 512 << 20
    compared = 0
    for comp, command in zip(plan.components, commands, strict=True):
        opts = trtexec_options(command)
        assert opts["onnx"] == str(trt_bundle / f"{comp.name}.onnx") == str(comp.onnx)
        assert opts["saveEngine"] == str(plan.out_dir / f"{comp.name}.plan") == str(comp.plan)
        assert opts["timingCacheFile"] == str(plan.out_dir / "timing.cache")
        assert opts["memPoolSize"] == "workspace:512" and "buildOnly" in opts
        # fp32 graphs: weakly typed, no reduced-precision flag
        assert not (comp.strongly_typed or comp.fp16 or comp.int8)
        assert not {"stronglyTyped", "fp16", "int8"} & set(opts)
        # every dynamic input of the graph has a range, and nothing else does
        assert set(want[comp.name]) == set(comp.profile) == dynamic_graph_inputs(comp.onnx)
        if not want[comp.name]:
            assert not [k for k in opts if k.endswith("Shapes")]
            continue
        for key in PROFILE_KEYS:
            from_trtexec = parse_shapes(opts[f"{key}Shapes"])
            assert list(from_trtexec) == list(want[comp.name])  # trtexec keeps the manifest's order
            for name, dims in want[comp.name].items():
                assert comp.profile[name][key] == dims[key] == from_trtexec[name], (comp.name, name, key)
                compared += 1
    assert compared == 3 * 3  # decoder: inputs_embeds, position_ids, cache_position x min/opt/max


def test_tensorrt_ep_options_parse_back_to_the_manifest_shapes(trt_bundle, tmp_path):
    b = Bundle.load(trt_bundle)
    want = manifest_profiles(trt_bundle)
    section = b.manifest["tensorrt"]
    compared = 0
    for name in ("vision", "decoder"):
        spec = b.components[name]
        chosen = resolve_providers(
            "auto", precision=spec.precision, meta=spec.meta, cache_dir=tmp_path,
            available=[TRT_EP, CUDA_EP, CPU_EP], profile=component_profile(section, name, spec),
        )  # fmt: skip
        assert [p for p, _ in chosen] == [TRT_EP, CUDA_EP, CPU_EP]  # built for TensorRT: "auto" offers it
        opts = chosen[0][1]
        assert opts["trt_fp16_enable"] == opts["trt_int8_enable"] == "False"  # fp32 graphs
        if not want[name]:
            assert not [k for k in opts if k.startswith("trt_profile_")]
            continue
        for key in PROFILE_KEYS:
            parsed = parse_shapes(opts[f"trt_profile_{key}_shapes"])
            assert set(parsed) == set(want[name]) == dynamic_graph_inputs(b.file(spec.file))
            for tensor, dims in want[name].items():
                assert parsed[tensor] == dims[key], (name, tensor, key)
                compared += 1
    assert compared == 9


def test_policy_hands_the_profiles_to_the_tensorrt_ep(trt_bundle, tmp_path, monkeypatch):
    """NoraPolicy passes the manifest's tensorrt section down to the EP options. onnxruntime's provider list is
    widened to name TensorRT (this CPU build then drops it with a warning and runs on the CPU): only the
    provider choice is simulated, the options are the ones handed to onnxruntime."""
    from nora_edge import sessions
    from nora_edge.policy import NoraPolicy

    want = manifest_profiles(trt_bundle)
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: [TRT_EP, CPU_EP])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TensorrtExecutionProvider.*", category=UserWarning)
        policy = NoraPolicy.load(trt_bundle, providers="auto", threads=1, cache_dir=tmp_path)
    try:
        graphs = {"vision": policy.vision, "decoder": policy.decoder.session}
        compared = 0
        for name, graph in graphs.items():
            assert [p for p, _ in graph.requested] == [TRT_EP, CPU_EP]
            assert graph.providers == [CPU_EP]  # what this build actually runs
            opts = graph.requested[0][1]
            assert opts["trt_engine_cache_path"] == str(tmp_path)
            for key in PROFILE_KEYS:
                parsed = parse_shapes(opts.get(f"trt_profile_{key}_shapes", ""))
                assert parsed == {t: dims[key] for t, dims in want[name].items()}
                compared += len(parsed)
        assert compared == 9
    finally:
        policy.close()


def test_explicit_tensorrt_on_a_cpu_onnxruntime_is_an_input_error(trt_bundle):
    from nora_edge.policy import NoraPolicy

    if TRT_EP in __import__("onnxruntime").get_available_providers():
        pytest.skip("this onnxruntime build has the TensorRT EP")
    with pytest.raises(InputError, match="TensorrtExecutionProvider is not available"):
        NoraPolicy.load(trt_bundle, providers="tensorrt", threads=1)


def test_a_profile_missing_a_dynamic_input_is_refused(trt_bundle, tmp_path):
    """A manifest whose decoder profile drops cache_position: build-engine and the runtime both name it."""
    from nora_edge.export.trt_engine import build_plan
    from nora_edge.policy import NoraPolicy

    copy = Path(shutil.copytree(trt_bundle, tmp_path / "trt"))
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["tensorrt"]["profiles"]["decoder"]["cache_position"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    b = Bundle.load(copy)  # the manifest itself is not hashed: the bundle still verifies
    with pytest.raises(BundleError, match=r"dynamic input\(s\) \['cache_position'\]"):
        build_plan(b, DEVICE)
    with pytest.raises(BundleError, match="cache_position"):
        NoraPolicy.load(copy, providers="cpu", threads=1)
    with pytest.raises(ExportError, match="positive number of MiB"):
        build_plan(Bundle.load(trt_bundle), DEVICE, workspace_mib=0)


def test_engine_record_ties_plans_to_the_manifest(trt_bundle, tmp_path):
    """The engines.json logic (hashes, staleness) on stand-in bytes: this checks the record, not TensorRT; the
    files written here are not engines."""
    from nora_edge.atomic import write_bytes_atomic
    from nora_edge.bundle import sha256_file
    from nora_edge.export.trt_engine import build_plan, engine_record, load_engine_record, write_engine_record

    copy = Path(shutil.copytree(trt_bundle, tmp_path / "trt"))
    b = Bundle.load(copy)
    plan = build_plan(b, DEVICE)
    with pytest.raises(BundleError, match="missing file"):
        load_engine_record(b, DEVICE)
    plan.out_dir.mkdir(parents=True)
    built = {}
    for comp in plan.components:
        write_bytes_atomic(comp.plan, f"stand-in for {comp.name}, not an engine".encode())
        built[comp.name] = {
            "sha256": sha256_file(comp.plan),
            "size": comp.plan.stat().st_size,
            "seconds": 0.0,
        }
    path = write_engine_record(plan, engine_record(plan, built, "0.0-not-built", {"name": None}))
    assert path == copy.parent / "trt.engines" / DEVICE / "engines.json"
    record = load_engine_record(Bundle.load(copy), DEVICE)  # the bundle still verifies with engines beside it
    assert record["bundle_manifest_sha256"] == sha256_file(copy / "manifest.json")
    assert record["engines"]["decoder"]["profile"] == manifest_profiles(copy)["decoder"]
    assert record["settings"] == {"workspace_mib": 1024, "timing_cache": "timing.cache"}
    plan.components[0].plan.write_bytes(b"x" * built["vision"]["size"])  # same size, other bytes
    with pytest.raises(BundleError, match="vision.plan: sha256 does not match"):
        load_engine_record(b, DEVICE)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "note": "re-exported"}))
    with pytest.raises(BundleError, match="another manifest.json"):
        load_engine_record(Bundle.load(copy), DEVICE)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the API build runs instead")
def test_build_engine_without_tensorrt_names_what_is_missing(trt_bundle):
    from nora_edge.cli import app
    from nora_edge.export.trt_engine import engine_dir

    run = CliRunner().invoke(app, ["build-engine", str(trt_bundle), "--profile", str(PROFILE)])
    assert run.exit_code == 2, run.output
    text = " ".join(run.output.split())
    assert "ExportError" in text and "tensorrt Python package is not installed" in text
    assert "--print-trtexec" in text
    assert not engine_dir(Bundle.load(trt_bundle), DEVICE).exists()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None,
    reason="needs the tensorrt Python package and an NVIDIA GPU (neither exists on this machine or in CI)",
)
def test_build_engine_with_tensorrt_builds_and_records_engines(trt_bundle, tmp_path):
    """On a TensorRT machine: real engines, whose optimization profiles (read back from the deserialized engines)
    are the manifest's, recorded in engines.json."""
    import tensorrt as trt

    from nora_edge.cli import app
    from nora_edge.export.trt_engine import load_engine_record

    copy = Path(shutil.copytree(trt_bundle, tmp_path / "trt"))
    run = CliRunner().invoke(
        app, ["build-engine", str(copy), "--profile", str(PROFILE), "--workspace-mib", "512"]
    )
    assert run.exit_code == 0, run.output
    record = load_engine_record(Bundle.load(copy), DEVICE)
    assert record["tensorrt_version"] == trt.__version__ and record["settings"]["workspace_mib"] == 512
    assert (copy.parent / "trt.engines" / DEVICE / "timing.cache").is_file()
    want = manifest_profiles(copy)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    compared = 0
    for name in ("vision", "decoder"):
        data = (copy.parent / "trt.engines" / DEVICE / f"{name}.plan").read_bytes()
        engine = runtime.deserialize_cuda_engine(data)
        assert engine is not None, name
        for tensor, dims in want[name].items():
            got = [list(s) for s in engine.get_tensor_profile_shape(tensor, 0)]
            assert got == [dims[k] for k in PROFILE_KEYS], (name, tensor)
            compared += 1
    assert compared == 3
