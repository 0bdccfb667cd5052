"""Kernel launches in the roofline: the launch term is added exactly (checked against a float64 roofline recomputed
here from the profile's numbers), node counts agree with onnx's own view of the stored graph and of the graph
onnxruntime's optimizer writes (re-optimized here), and the bench report carries the node-count table."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import onnx
import pytest

from nora_edge.bench.launches import (
    analytic_launches,
    bundle_node_counts,
    fit_per_layer,
    graph_node_counts,
    launch_costs,
    launch_lines,
    stage_launches,
)
from nora_edge.bench.models import nora_3b
from nora_edge.bench.roofline import PrecisionPlan, analytic_stage_costs, predict_inference, predict_stage_ms
from nora_edge.errors import InputError
from nora_edge.profiles import list_profiles, load_profile

ORIN = [n for n in list_profiles() if n != "host"]


def _roofline_ms_f64(cost, profile) -> float:
    """Independent roofline: sum over ops of max(flops / rate, bytes / bandwidth), from the profile's raw fields."""
    eff_c, eff_m = profile.efficiency["compute"].value, profile.efficiency["memory"].value
    bw = profile.memory["bandwidth_gbs"].value * 1e9 * eff_m
    total = 0.0
    for op in cost.ops:
        tf = profile.peak_tflops[op.precision].value
        if op.rows == 1 and profile.gemv_tflops and op.precision in profile.gemv_tflops:
            tf = profile.gemv_tflops[op.precision].value
        total += max(op.flops / (tf * 1e12 * eff_c), (op.weight_bytes + op.act_bytes) / bw)
    return 1e3 * total


@pytest.mark.parametrize("name", ORIN)
def test_launch_term_is_added_exactly(name):
    prof = load_profile(name)
    costs = analytic_stage_costs(nora_3b(5), PrecisionPlan.preset("int4"))
    launches = analytic_launches(costs)
    compared = 0
    for stage, cost in costs.items():
        ref = _roofline_ms_f64(cost, prof)
        base = predict_stage_ms(cost, prof)
        zero = predict_stage_ms(cost, prof, launches[stage], 0.0)
        assert base["ms"] == pytest.approx(ref, rel=1e-12), stage
        assert zero["ms"] == base["ms"] and zero["launch_ms"] == 0.0, stage
        for c_us in (0.5, 5.0, 37.0):
            got = predict_stage_ms(cost, prof, launches[stage], c_us)
            assert got["ms"] - base["ms"] == pytest.approx(launches[stage] * c_us / 1e3, rel=1e-9), stage
            assert got["roofline_ms"] == base["ms"] and got["launches"] == launches[stage]
            compared += 1
    assert compared == 3 * len(costs) == 12
    # end to end: every invocation of a stage pays its launches
    spec, plan = nora_3b(5), PrecisionPlan.preset("int4")
    old = predict_inference(spec, plan, prof)
    new = predict_inference(spec, plan, prof, launches=launches, launch_us=5.0)
    calls = {
        "vision": 1,
        "prefill": 1,
        "decode_token": spec.decode_steps,
        "action_head": spec.generated_tokens,
    }
    extra_ms = sum(calls[s] * launches[s] for s in calls) * 5.0 / 1e3
    assert new["e2e_ms"] - old["e2e_ms"] == pytest.approx(extra_ms, rel=1e-9)
    assert old["launches"] == dict.fromkeys(calls, 0)
    with pytest.raises(InputError, match="must be >= 0"):
        predict_stage_ms(costs["decode_token"], prof, -1, 5.0)


def test_analytic_launches_count_kernels_per_layer():
    spec = nora_3b(5)
    costs = analytic_stage_costs(spec, PrecisionPlan.preset("int4"))
    n = analytic_launches(costs)
    # fused runtime: qkv, attention, o, gate_up, down + 4 elementwise kernels per decoder layer
    assert n["decode_token"] == spec.lm.layers * 9
    assert n["action_head"] == 2  # final norm + head


@pytest.mark.parametrize("name", ORIN)
def test_every_orin_profile_has_sourced_launch_costs(name):
    lc = launch_costs(load_profile(name))
    assert set(lc) == {"kernel_us", "graph_us"}
    for key, q in lc.items():
        assert q.value > 0 and q.estimate and q.source.startswith("[est]"), key
    assert "HolisticTraceAnalysis" in lc["kernel_us"].source and "cuda-graphs" in lc["graph_us"].source


def test_fit_per_layer_recovers_a_line():
    assert fit_per_layer([(2, 30 + 2 * 52), (6, 30 + 6 * 52)]) == pytest.approx((30.0, 52.0))
    with pytest.raises(InputError, match="two depths"):
        fit_per_layer([(4, 100), (4, 101)])


def _onnx_nodes(graph: onnx.GraphProto) -> int:
    n = len(graph.node)
    for node in graph.node:
        for a in node.attribute:
            n += _onnx_nodes(a.g) if a.HasField("g") else sum(_onnx_nodes(g) for g in a.graphs)
    return n


def test_node_counts_of_the_tiny_bundle(tiny_bundle_h5):
    import onnxruntime as ort

    compared = 0
    for graph in ("decoder.onnx", "vision.onnx"):
        path = Path(tiny_bundle_h5) / graph
        got = graph_node_counts(path)
        assert got["skipped"] is None and got["provider"] == "CPUExecutionProvider"
        assert got["file_nodes"] == _onnx_nodes(onnx.load(str(path), load_external_data=False).graph)
        with tempfile.TemporaryDirectory() as tmp:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.optimized_model_filepath = str(Path(tmp) / "o.onnx")
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            expect = _onnx_nodes(onnx.load(opts.optimized_model_filepath, load_external_data=False).graph)
        assert got["optimized_nodes"] == expect
        assert 0 < got["kernels"] <= got["optimized_nodes"] <= got["file_nodes"], graph
        assert sum(n for _, n in got["top_ops"]) <= got["optimized_nodes"]
        compared += 2
    assert compared == 4
    small = graph_node_counts(Path(tiny_bundle_h5) / "decoder.onnx", max_bytes=1.0)
    assert small["optimized_nodes"] is None and "not optimized" in small["skipped"]
    assert small["kernels"] == small["file_kernels"] > 0


def test_report_section_has_node_counts_and_launch_lines(tiny_bundle_h5):
    from nora_edge.bench.microbench import host_profile, measure_host
    from nora_edge.bench.report import launches_markdown
    from nora_edge.bench.sections import roofline_section
    from nora_edge.policy import NoraPolicy

    policy = NoraPolicy.load(tiny_bundle_h5, threads=1, forced_tokens="flag")
    host = host_profile(measure_host(1, reps=1))
    r = roofline_section(policy, "pick up the bowl", {"stages": {}}, host, 6)
    assert set(r["node_counts"]) == {"vision", "decoder"}
    assert r["launches"] == stage_launches(bundle_node_counts(policy.bundle, policy.providers))
    compared = 0
    for name in ORIN:
        lc = launch_costs(load_profile(name))
        for stage, n in r["launches"].items():
            roof = r["profiles_roofline"][name][stage]
            assert r["profiles"][name][stage] == pytest.approx(
                roof + n * lc["kernel_us"].value / 1e3, rel=1e-12
            )
            assert r["profiles_cuda_graph"][name][stage] == pytest.approx(
                roof + lc["graph_us"].value / 1e3, rel=1e-12
            )
            compared += 2
    assert compared == 2 * 3 * len(ORIN)
    assert r["profiles"]["host"] == r["profiles_roofline"]["host"]  # no launch cost on the host
    md = "\n".join(launches_markdown(r, list(r["host"])))
    rows = [
        line for line in md.splitlines() if line.startswith("| vision |") or line.startswith("| decoder |")
    ]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        c = r["node_counts"][cells[0]]
        assert [int(cells[2]), int(cells[3]), int(cells[4])] == [
            c["file_nodes"],
            c["optimized_nodes"],
            c["kernels"],
        ]
    assert md.count("+ kernel launches") == len(ORIN) and math.isfinite(
        r["profiles"]["orin-nano-8gb"]["decode_step"]
    )


def test_a_stage_without_launches_is_the_roofline():
    costs = analytic_stage_costs(nora_3b(5), PrecisionPlan.preset("int4"))
    host_like = load_profile("orin-agx-64gb")
    lines = launch_lines(costs, host_like, {"decode_token": 100})
    d = lines["decode_token"]
    assert d["cuda_graph_ms"] < d["kernel_ms"] and d["launches"] == 100
    assert lines["vision"]["kernel_ms"] == lines["vision"]["roofline_ms"] == lines["vision"]["cuda_graph_ms"]
