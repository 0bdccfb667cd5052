"""The TensorRT op-support checker against its own transcribed tables (onnx-tensorrt docs/operators.md).

Planted graphs: a clean Add/MatMul graph passes; a com.microsoft node, an unsupported dtype (DOUBLE Add, a STRING
tensor, an internal UINT8), every operator the table marks N, an opset above the documented range and a non-zero
DequantizeLinear zero point are rejected naming the node (and tensor). The expectations are read from the JSON
tables (the transcription of the upstream matrix), never hard-coded in the checker's favour; the parser is
checked on a small operators.md in the upstream format.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from nora_edge.errors import ExportError, InputError
from nora_edge.export import trt_support
from nora_edge.export.trt_support import TOKEN_TO_ONNX, assert_tensorrt_compatible, check_graph, table_for

ROOT = Path(__file__).resolve().parents[2]
MAKE_TABLES = ROOT / "export" / "trt_ops" / "make_tables.py"
VERSIONS = ["10.3", "latest"]


def model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    ops = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=ops)


def vi(name, dtype, shape=(2, 2)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def clean_graph():
    """y = (x + b) @ w, all FLOAT."""
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    b = numpy_helper.from_array(np.ones((2, 2), np.float32), "b")
    nodes = [helper.make_node("Add", ["x", "b"], ["s"], name="add0"),
             helper.make_node("MatMul", ["s", "w"], ["y"], name="mm0")]  # fmt: skip
    return model(nodes, [vi("x", TensorProto.FLOAT)], [vi("y", TensorProto.FLOAT)], [w, b])


@pytest.mark.parametrize("version", VERSIONS)
def test_clean_graph_passes(version):
    report = assert_tensorrt_compatible(clean_graph(), version)
    assert report.ok and report.nodes_checked == 2
    assert report.tensors_typed == 5 and report.tensors_untyped == 0  # x, b, s, w, y
    assert report.source["repo"] == "onnx/onnx-tensorrt" and report.source["path"] == "docs/operators.md"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("op", ["MatMulNBits", "FusedMatMul"])
def test_com_microsoft_node_rejected_by_name(version, op):
    nodes = [helper.make_node("Add", ["x", "x"], ["s"], name="add0"),
             helper.make_node(op, ["s", "x"], ["y"], name="planted_ms_node", domain="com.microsoft")]  # fmt: skip
    m = model(
        nodes, [vi("x", TensorProto.FLOAT)], [vi("y", TensorProto.FLOAT)], extra_opsets=[("com.microsoft", 1)]
    )
    report = check_graph(m, version)
    domain_problems = [p for p in report.problems if p.kind == "domain"]
    assert [(p.node, p.op_type, p.domain) for p in domain_problems] == [
        ("planted_ms_node", op, "com.microsoft")
    ]
    with pytest.raises(ExportError, match=r"node 'planted_ms_node' \(com\.microsoft::" + op):
        assert_tensorrt_compatible(m, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_double_add_rejected_naming_node_and_tensor(version):
    add_types = {TOKEN_TO_ONNX[t] for t in table_for(version)["operators"]["Add"]["types"]}
    assert "DOUBLE" not in add_types  # the premise, from the transcribed table
    nodes = [helper.make_node("Cast", ["x"], ["xd"], name="to_double", to=TensorProto.DOUBLE),
             helper.make_node("Add", ["xd", "xd"], ["yd"], name="add_double"),
             helper.make_node("Cast", ["yd"], ["y"], name="to_float", to=TensorProto.FLOAT)]  # fmt: skip
    m = model(nodes, [vi("x", TensorProto.FLOAT)], [vi("y", TensorProto.FLOAT)])
    report = check_graph(m, version)
    found = {(p.node, p.tensor, p.dtype) for p in report.problems if p.kind == "dtype"}
    # Cast's column excludes DOUBLE too (its output to_double:xd), Add's input, and Cast back's input yd
    cast_types = {TOKEN_TO_ONNX[t] for t in table_for(version)["operators"]["Cast"]["types"]}
    expected = {("add_double", "xd", "DOUBLE")}
    if "DOUBLE" not in cast_types:
        expected |= {("to_double", "xd", "DOUBLE"), ("to_float", "yd", "DOUBLE")}
    assert found == expected
    with pytest.raises(ExportError, match=r"node '(add_double|to_double)'.*tensor 'xd' DOUBLE"):
        assert_tensorrt_compatible(m, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_string_tensor_rejected(version):
    assert "STRING" not in {TOKEN_TO_ONNX.get(t) for t in table_for(version)["data_types"]}
    m = model([helper.make_node("Identity", ["s"], ["t"], name="id_str")],
              [vi("s", TensorProto.STRING, (3,))], [vi("t", TensorProto.STRING, (3,))])  # fmt: skip
    report = check_graph(m, version)
    assert {(p.node, p.tensor, p.dtype) for p in report.problems} == {
        ("id_str", "s", "STRING"),
        ("id_str", "t", "STRING"),
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_uint8_only_at_network_boundary(version):
    ok = model([helper.make_node("Cast", ["u"], ["y"], name="u8_in", to=TensorProto.FLOAT)],
               [vi("u", TensorProto.UINT8)], [vi("y", TensorProto.FLOAT)])  # fmt: skip
    assert check_graph(ok, version).ok
    bad = model([helper.make_node("Cast", ["x"], ["u"], name="to_u8", to=TensorProto.UINT8),
                 helper.make_node("Cast", ["u"], ["y"], name="from_u8", to=TensorProto.FLOAT)],
                [vi("x", TensorProto.FLOAT)], [vi("y", TensorProto.FLOAT)])  # fmt: skip
    assert [(p.node, p.tensor, p.dtype) for p in check_graph(bad, version).problems] == [
        ("to_u8", "u", "UINT8")
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_table_row_is_enforced(version):
    """One node per operator of the table: each N row is rejected by name, each Y row (fed its first listed
    type) is not rejected for its op or its input type."""
    ops = table_for(version)["operators"]
    nodes, inputs = [], []
    for i, (op, row) in enumerate(ops.items()):
        dtype = TensorProto.FLOAT
        if row["supported"] and TOKEN_TO_ONNX[row["types"][0]] != "FLOAT":
            dtype = getattr(TensorProto, TOKEN_TO_ONNX[row["types"][0]])
        inputs.append(vi(f"in{i}", dtype))
        nodes.append(helper.make_node(op, [f"in{i}"], [f"out{i}"], name=f"n_{op}"))
    m = model(nodes, inputs, [vi(f"out{i}", TensorProto.FLOAT) for i in range(len(nodes))])
    report = check_graph(m, version)
    assert report.nodes_checked == len(ops)
    rejected = {p.op_type for p in report.problems if p.kind == "op_unsupported"}
    assert rejected == {op for op, row in ops.items() if not row["supported"]}
    assert not [p for p in report.problems if p.kind in ("op_unknown", "domain")]
    typed_bad = [p for p in report.problems if p.kind == "dtype" and p.tensor.startswith("in")]
    assert not typed_bad, typed_bad[:3]
    n_marked = sum(not row["supported"] for row in ops.values())
    assert n_marked == len(rejected) > 10


def test_op_missing_from_table_rejected():
    m = model([helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery")], [vi("x", 1)], [vi("y", 1)])
    (p,) = check_graph(m, "10.3").problems
    assert (p.node, p.kind) == ("mystery", "op_unknown")


def test_opset_range():
    for version in VERSIONS:
        t = table_for(version)
        at_max = check_graph(model(clean_graph().graph.node, [vi("x", 1)], [vi("y", 1)], clean_graph().graph.initializer,
                                   opset=t["opset_max"]), version)  # fmt: skip
        above = check_graph(model(clean_graph().graph.node, [vi("x", 1)], [vi("y", 1)], clean_graph().graph.initializer,
                                  opset=t["opset_max"] + 1), version)  # fmt: skip
        assert at_max.ok
        assert [(p.node, p.kind) for p in above.problems] == [("<graph>", "opset")]


@pytest.mark.parametrize("zp_value,ok", [(0, True), (3, False)])
def test_dequantize_zero_point_restriction(zp_value, ok):
    q = numpy_helper.from_array(np.array([[1, -2], [3, 4]], np.int8), "q")
    s = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    zp = numpy_helper.from_array(np.array(zp_value, np.int8), "zp")
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w"], name="dq_w"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]  # fmt: skip
    m = model(nodes, [vi("x", TensorProto.FLOAT)], [vi("y", TensorProto.FLOAT)], [q, s, zp])
    report = check_graph(m, "10.3")
    assert report.ok is ok
    if not ok:
        assert [(p.node, p.kind, p.tensor) for p in report.problems] == [("dq_w", "zero_point", "zp")]


def test_subgraph_nodes_are_checked():
    then_g = helper.make_graph([helper.make_node("FusedMatMul", ["x", "x"], ["t"], name="inner_ms", domain="com.microsoft")],
                               "then", [], [vi("t", TensorProto.FLOAT)])  # fmt: skip
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="inner_id")], "else", [],
                               [vi("e", TensorProto.FLOAT)])  # fmt: skip
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    m = model([node], [vi("c", TensorProto.BOOL, ()), vi("x", TensorProto.FLOAT)], [vi("y", TensorProto.FLOAT)],
              extra_opsets=[("com.microsoft", 1)])  # fmt: skip
    report = check_graph(m, "10.3")
    assert report.nodes_checked == 3
    assert [(p.node, p.kind) for p in report.problems] == [("inner_ms", "domain")]


def test_unknown_version_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="no TensorRT op-support table for version '9.9'"):
        check_graph(clean_graph(), "9.9")
    with pytest.raises(InputError, match="no ONNX file"):
        check_graph(tmp_path / "absent.onnx")


def test_tables_record_their_source():
    for table in {id(t): t for t in trt_support.load_tables().values()}.values():
        src = table["source"]
        assert src["repo"] == "onnx/onnx-tensorrt" and src["path"] == "docs/operators.md"
        assert re.fullmatch(r"[0-9a-f]{40}|unknown", src["commit"]) and re.fullmatch(
            r"[0-9a-f]{64}", src["sha256"]
        )
        assert table["version_line"].startswith("TensorRT ") and table["data_types"]
        assert set(t for row in table["operators"].values() for t in row["types"]) <= set(TOKEN_TO_ONNX)
    assert table_for("10.3")["source"]["commit"] == "96e781103cfc4adf4a6bb557e94bac8e693f6f4c"


SAMPLE_MD = """# Supported ONNX Operators

TensorRT 8.6 supports operators up to Opset 17. Latest information ...

TensorRT supports the following ONNX data types: DOUBLE, FLOAT32, FLOAT16, INT8, and BOOL

> Note: There is limited support for INT32.

## Operator Support Matrix

| Operator | Supported | Supported Types | Restrictions |
|----------|-----------|-----------------|--------------|
| Abs      | Y         | FP32, FP16, INT32 |
| ConstantOfShape | Y  | FP32, INF64 |
| DynamicQuantizeLinear | N | Not supported. Compose it. |
| Slice    | Y         | FP32, INT32, BOOL | `axes` must be an initializer |
| Xor      | Y         | BOOL
"""


def test_make_tables_parses_upstream_format(tmp_path):
    md = tmp_path / "operators.md"
    md.write_text(SAMPLE_MD, encoding="utf-8")
    out = tmp_path / "t.json"
    subprocess.run([sys.executable, str(MAKE_TABLES), "--md", str(md), "--commit", "0" * 40, "--table-version",
                    "8.6", "--applies-to", "8.6", "--out", str(out)], check=True, capture_output=True)  # fmt: skip
    t = json.loads(out.read_text())
    assert (t["header_version"], t["opset_min"], t["opset_max"]) == ("8.6", None, 17)
    assert t["data_types"] == ["DOUBLE", "FLOAT32", "FLOAT16", "INT8", "BOOL"]
    ops = t["operators"]
    assert list(ops) == ["Abs", "ConstantOfShape", "DynamicQuantizeLinear", "Slice", "Xor"]
    assert ops["ConstantOfShape"]["types"] == ["FP32", "INT64"] and len(t["errata_applied"]) == 1
    assert ops["DynamicQuantizeLinear"] == {"supported": False, "support_text": "N", "types": [],
                                            "restrictions": "Not supported. Compose it."}  # fmt: skip
    assert ops["Slice"]["restrictions"] == "`axes` must be an initializer" and ops["Xor"]["types"] == ["BOOL"]


@pytest.mark.skipif(
    not os.environ.get("NORA_ONNX_TRT_GIT"), reason="set NORA_ONNX_TRT_GIT to an onnx-tensorrt git dir"
)
def test_committed_10_1_table_regenerates(tmp_path):
    table = table_for("10.3")
    out = tmp_path / "t.json"
    subprocess.run([sys.executable, str(MAKE_TABLES), "--git-dir", os.environ["NORA_ONNX_TRT_GIT"], "--commit",
                    table["source"]["commit"], "--table-version", "10.1", "--applies-to", "10.1", "--out", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    fresh = json.loads(out.read_text())
    assert fresh["source"]["sha256"] == table["source"]["sha256"] and fresh["operators"] == table["operators"]


def test_cli_check_trt_names_the_node_and_exits_1(tmp_path):
    """`nora-edge check-trt FILE.onnx`: a clean graph exits 0; a planted com.microsoft node exits 1 naming it."""
    import onnx
    from typer.testing import CliRunner

    from nora_edge.cli import app

    onnx.save(clean_graph(), tmp_path / "clean.onnx")
    ok = CliRunner().invoke(app, ["check-trt", str(tmp_path / "clean.onnx")])
    assert ok.exit_code == 0, ok.output
    nodes = [
        helper.make_node("MatMulNBits", ["x", "x"], ["y"], name="planted_ms_node", domain="com.microsoft")
    ]
    m = model(
        nodes, [vi("x", TensorProto.FLOAT)], [vi("y", TensorProto.FLOAT)], extra_opsets=[("com.microsoft", 1)]
    )
    onnx.save(m, tmp_path / "planted.onnx")
    bad = CliRunner().invoke(app, ["check-trt", str(tmp_path / "planted.onnx"), "--json"])
    assert bad.exit_code == 1 and "planted_ms_node" in bad.output
    report = json.loads(bad.output)["planted.onnx"]
    assert report["ok"] is False
