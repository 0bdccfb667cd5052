"""TensorRT op-support checker: every node, opset and tensor dtype of an ONNX graph against TensorRT's documented
ONNX operator support for a stated TensorRT version.

Source: onnx/onnx-tensorrt ``docs/operators.md`` (the "Operator Support Matrix": operator, Y/N, supported types,
restrictions; and the header's opset range and data-type list), transcribed by ``export/trt_ops/make_tables.py``
into ``export/trt_ops/tensorrt-<release>.json``, which records repo, path, commit, version line and sha256:

- ``tensorrt-10.1.json``: commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c (10.1-GA); also answers for 10.2 and
  10.3 (JetPack 6.1/6.2), since docs/Changelog.md lists no operator added or removed in 10.2/10.3 (see "basis").
- ``tensorrt-10.15.json``: the newest operators.md in the stored index (10.15 GA, 2026-2-2); answers "latest".

Data flow: ModelProto or .onnx path (external weights not loaded) --onnx.shape_inference (dtypes of
intermediate tensors)--> per node, recursing into If/Loop/Scan bodies: (1) domain must be "" / "ai.onnx";
(2) op_type must be in the table and marked Y; (3) the tensor the "Supported Types" column is about (input 0;
input 1 of Where; output 0 of Cast/CastLike and of input-less ops) must have a listed type; (4) every input and
output dtype must be in the header's data-type list, and UINT8 only at the network boundary (header note);
(5) a DequantizeLinear/QuantizeLinear zero point held as a constant must be all zero (table restriction).
Graph level: the ai.onnx opset must lie in the table's range; graph inputs/outputs/initializers obey (4).
--> :class:`Report` (problems naming node, op, domain, tensor, dtype; restriction notes of the ops present).
:func:`assert_tensorrt_compatible` raises :class:`~nora_edge.errors.ExportError` naming the offending nodes.

Table type tokens -> ONNX: FP32 FLOAT, FP16 FLOAT16, BF16 BFLOAT16, FP8 FLOAT8E4M3FN (TensorRT's only FP8),
FP4 FLOAT4E2M1, INT4/INT8/INT32/INT64/UINT8/BOOL same name; the header's DOUBLE/FLOAT32/FLOAT16/BFLOAT16 likewise.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from nora_edge.errors import ExportError, InputError

TABLE_DIR = Path(__file__).resolve().parent / "trt_ops"
STANDARD_DOMAINS = ("", "ai.onnx")
TOKEN_TO_ONNX = {
    "FP32": "FLOAT", "FLOAT32": "FLOAT", "FLOAT": "FLOAT", "FP16": "FLOAT16", "FLOAT16": "FLOAT16",
    "BF16": "BFLOAT16", "BFLOAT16": "BFLOAT16", "DOUBLE": "DOUBLE", "FP8": "FLOAT8E4M3FN",
    "FP4": "FLOAT4E2M1", "INT4": "INT4", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64",
    "UINT8": "UINT8", "BOOL": "BOOL",
}  # fmt: skip
OUTPUT_SUBJECT_OPS = {"Cast", "CastLike"}  # the types column also bounds what they produce
INPUT_INDEX = {"Where": 1}  # Where's input 0 is the BOOL condition; the column is about X/Y
ZERO_POINT_OPS = {"DequantizeLinear": 2, "QuantizeLinear": 2}  # "`x_zero_point`/`y_zero_point` must be zero"


@dataclass(frozen=True)
class Problem:
    """One reason TensorRT would refuse the graph.

    Attributes:
        node: node name ("<graph>" for model-level problems, "<graph input>" etc. for boundary tensors).
        op_type: the node's op ("" for model-level problems).
        domain: the node's domain ("" is ai.onnx).
        kind: "domain", "op_unsupported", "op_unknown", "dtype", "opset" or "zero_point".
        detail: a sentence naming what is wrong and what the table allows.
        tensor: the tensor at fault, if any.
        dtype: its ONNX dtype name, if any.
    """

    node: str
    op_type: str
    domain: str
    kind: str
    detail: str
    tensor: str = ""
    dtype: str = ""

    def line(self) -> str:
        """One readable line: node 'n' (domain::Op) tensor 't' DTYPE: detail."""
        op = f"{self.domain}::{self.op_type}" if self.domain else self.op_type
        where = f"node '{self.node}' ({op})" if op else self.node
        if self.tensor:
            where += f" tensor '{self.tensor}'" + (f" {self.dtype}" if self.dtype else "")
        return f"{where}: {self.detail}"


@dataclass
class Report:
    """What :func:`check_graph` found.

    Attributes:
        graph: the graph's name or file path.
        version: the TensorRT version asked for; ``table_version`` the table that answered it.
        source: provenance of the table (repo, path, commit, ref, sha256, basis) plus its version line.
        problems: every refusal found, in node order.
        notes: {op_type: restriction text} for the ops present that carry restrictions (not enforced).
        op_counts: {(domain, op_type): number of nodes}.
        nodes_checked / tensors_typed / tensors_untyped: how much was looked at (untyped: shape inference
            gave no dtype, e.g. outputs of non-standard ops).
    """

    graph: str
    version: str
    table_version: str
    source: dict
    problems: list[Problem] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    op_counts: Counter = field(default_factory=Counter)
    nodes_checked: int = 0
    tensors_typed: int = 0
    tensors_untyped: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing blocks TensorRT per the table."""
        return not self.problems

    def summary(self) -> Counter:
        """{(kind, op or dtype): count} over the problems, for a short "what blocks it" list."""
        return Counter((p.kind, p.dtype if p.kind == "dtype" else f"{p.domain + '::' if p.domain else ''}{p.op_type}")
                       for p in self.problems)  # fmt: skip

    def to_dict(self) -> dict:
        """JSON-ready form (for a manifest section or ``--json`` output)."""
        return {
            "graph": self.graph, "tensorrt": self.version, "table": self.table_version, "source": self.source,
            "ok": self.ok, "problems": [asdict(p) for p in self.problems], "notes": self.notes,
            "nodes_checked": self.nodes_checked,
            "op_counts": {f"{d + '::' if d else ''}{o}": n for (d, o), n in sorted(self.op_counts.items())},
        }  # fmt: skip

    def format(self, limit: int = 20) -> str:
        """Human-readable report: verdict, source line, blocking summary, first ``limit`` problems."""
        head = (
            f"{self.graph}: TensorRT {self.version} (table {self.table_version}, {self.source.get('repo')}@"
        )
        head += f"{str(self.source.get('commit'))[:12]}): "
        head += "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [
            head
            + f" [{self.nodes_checked} nodes, {self.tensors_typed} typed / {self.tensors_untyped} untyped]"
        ]
        for (kind, what), n in sorted(self.summary().items()):
            lines.append(f"  blocks: {kind:14s} {what} x{n}")
        lines += ["  " + p.line() for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... {len(self.problems) - limit} more")
        return "\n".join(lines)


@cache
def load_tables() -> dict[str, dict]:
    """{version: table} for every ``applies_to`` entry of every JSON in ``TABLE_DIR``."""
    out: dict[str, dict] = {}
    for path in sorted(TABLE_DIR.glob("tensorrt-*.json")):
        table = json.loads(path.read_text(encoding="utf-8"))
        for v in table["applies_to"]:
            out[str(v)] = table
    return out


def table_for(version: str) -> dict:
    """The support table answering for TensorRT ``version`` ("10.3", "10.15", "latest", ...).

    Raises:
        InputError: no table covers that version (the message lists those that do).
    """
    tables = load_tables()
    if str(version) not in tables:
        raise InputError(f"no TensorRT op-support table for version '{version}'; have {sorted(tables)}")
    return tables[str(version)]


def _onnx_types(tokens) -> set[str]:
    return {TOKEN_TO_ONNX[t] for t in tokens if t in TOKEN_TO_ONNX}


def _dtype_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type) if elem_type else ""


def walk_nodes(graph: onnx.GraphProto):
    """Yield every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from walk_nodes(g)


def _collect_types(
    graph: onnx.GraphProto, types: dict[str, int], consts: dict[str, onnx.TensorProto]
) -> None:
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
        consts[init.name] = init
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = attr.t.data_type
                    consts[node.output[0]] = attr.t
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _collect_types(g, types, consts)


def _load(model_or_path) -> tuple[onnx.ModelProto, str, Path | None]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, model_or_path.graph.name or "<model>", None
    path = Path(model_or_path)
    if not path.is_file():
        raise InputError(f"no ONNX file at {path}")
    return onnx.load(str(path), load_external_data=False), str(path), path.parent


def _is_all_zero(t: onnx.TensorProto, base_dir: Path | None) -> bool | None:
    """True/False for a constant zero point; None when its bytes cannot be read here (external, no dir)."""
    try:
        return not np.any(
            numpy_helper.to_array(t, base_dir=str(base_dir) if base_dir else "").astype(np.float64)
        )
    except (OSError, ValueError, TypeError):
        return None


def check_graph(model_or_path, version: str = "10.3") -> Report:
    """Check one ONNX graph against TensorRT ``version``'s documented ONNX support.

    Args:
        model_or_path: an ``onnx.ModelProto`` or a path to a .onnx file (external weights are not loaded; a
            zero point stored externally is read from beside the file).
        version: TensorRT version ("10.3" for JetPack 6.1/6.2, "10.15" / "latest" for the newest table).

    Returns:
        Report listing every problem (node name, op_type, domain, kind, tensor, dtype) and restriction notes.

    Raises:
        InputError: unknown version, or no file at the path.
    """
    table = table_for(version)
    label = (
        str(version)
        if str(version) == table["table_version"]
        else f"{version} (table {table['table_version']})"
    )
    model, name, base_dir = _load(model_or_path)
    ops_table = table["operators"]
    allowed_global = _onnx_types(table["data_types"])
    uint8_io_only = any("UINT8 is only supported as network input or output" in n for n in table["notes"])
    report = Report(
        graph=name,
        version=str(version),
        table_version=table["table_version"],
        source={**table["source"], "version_line": table["version_line"]},
    )

    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS:
            lo, hi = table["opset_min"] or 1, table["opset_max"]
            if not lo <= imp.version <= hi:
                report.problems.append(Problem("<graph>", "", "", "opset",
                    f"ai.onnx opset {imp.version} is outside TensorRT {label}'s documented range {lo}..{hi}"))  # fmt: skip

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as e:  # inference can choke on exotic graphs; fall back to the declared types
        inferred = model
        report.notes["<shape inference>"] = f"failed ({type(e).__name__}: {e}); declared types only"
    types: dict[str, int] = {}
    consts: dict[str, onnx.TensorProto] = {}
    _collect_types(inferred.graph, types, consts)
    boundary = {vi.name for vi in [*model.graph.input, *model.graph.output]}
    seen_tensors: set[str] = set()

    def check_global(node_name: str, op: str, dom: str, tensor: str) -> None:
        """Header-level dtype rules, reported once per tensor (at the first node that touches it)."""
        if not tensor or tensor in seen_tensors:
            return
        seen_tensors.add(tensor)
        dt = _dtype_name(types.get(tensor, 0))
        report.tensors_typed += bool(dt)
        report.tensors_untyped += not dt
        if not dt:
            return
        if dt not in allowed_global:
            report.problems.append(Problem(node_name, op, dom, "dtype",
                f"{dt} is not among TensorRT {label}'s ONNX data types {sorted(allowed_global)}", tensor, dt))  # fmt: skip
        elif dt == "UINT8" and uint8_io_only and tensor not in boundary:
            report.problems.append(Problem(node_name, op, dom, "dtype",
                "UINT8 is only supported as a network input or output tensor type", tensor, dt))  # fmt: skip

    def check_op(node: onnx.NodeProto, nname: str, dom: str) -> None:
        """Domain, matrix row (Y/N), the types column, and constant zero points of one node."""
        if dom not in STANDARD_DOMAINS:
            report.problems.append(Problem(nname, node.op_type, dom, "domain",
                f"domain '{dom}' is not ONNX standard; TensorRT's ONNX parser imports only ai.onnx ops"))  # fmt: skip
            return
        row = ops_table.get(node.op_type)
        if row is None:
            report.problems.append(Problem(nname, node.op_type, dom, "op_unknown",
                f"{node.op_type} is not in TensorRT {label}'s operator support matrix"))  # fmt: skip
            return
        if not row["supported"]:
            why = f" ({row['restrictions']})" if row["restrictions"] else ""
            report.problems.append(Problem(nname, node.op_type, dom, "op_unsupported",
                f"{node.op_type} is marked '{row['support_text']}' (not supported) in TensorRT {label}'s matrix{why}"))  # fmt: skip
            return
        if row["restrictions"]:
            report.notes[node.op_type] = row["restrictions"]
        allowed = _onnx_types(row["types"])
        k = INPUT_INDEX.get(node.op_type, 0)
        subjects = [node.input[k]] if len(node.input) > k and node.input[k] else []
        if node.op_type in OUTPUT_SUBJECT_OPS or not node.input:
            subjects += [node.output[0]] if node.output else []
        for t in subjects:
            dt = _dtype_name(types.get(t, 0))
            if dt and dt not in allowed:
                report.problems.append(Problem(nname, node.op_type, dom, "dtype",
                    f"{node.op_type} supports {row['types']} in TensorRT {label}, not {dt}", t, dt))  # fmt: skip
        zp = ZERO_POINT_OPS.get(node.op_type)
        if zp is not None and len(node.input) > zp and node.input[zp] in consts:
            if _is_all_zero(consts[node.input[zp]], base_dir) is False:
                report.problems.append(Problem(nname, node.op_type, dom, "zero_point",
                    f"{node.op_type} needs an all-zero zero point in TensorRT {label} ({row['restrictions']})",
                    node.input[zp], _dtype_name(types.get(node.input[zp], 0))))  # fmt: skip

    for i, node in enumerate(walk_nodes(model.graph)):
        report.nodes_checked += 1
        nname = node.name or f"#{i}:{node.op_type}"
        report.op_counts[(node.domain, node.op_type)] += 1
        check_op(node, nname, node.domain)
        for t in [*node.input, *node.output]:
            check_global(nname, node.op_type, node.domain, t)

    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name not in seen_tensors:
            check_global("<graph input/output>", "", "", vi.name)
    for init in model.graph.initializer:
        if init.name not in seen_tensors:
            check_global("<initializer>", "", "", init.name)
    return report


def assert_tensorrt_compatible(model_or_path, version: str = "10.3", *, show: int = 5) -> Report:
    """:func:`check_graph`, raising when anything blocks TensorRT.

    Args:
        model_or_path: ModelProto or .onnx path.
        version: TensorRT version of the table to check against.
        show: how many offending nodes the error message names.

    Returns:
        The (clean) Report.

    Raises:
        ExportError: the graph has problems; the message names the first ``show`` nodes, op, tensor and dtype.
    """
    report = check_graph(model_or_path, version)
    if not report.ok:
        first = "; ".join(p.line() for p in report.problems[:show])
        more = f" (+{len(report.problems) - show} more)" if len(report.problems) > show else ""
        raise ExportError(
            f"{report.graph} is not TensorRT {version}-compatible per {report.source['repo']} "
            f"{report.source['path']}@{str(report.source['commit'])[:12]}: {len(report.problems)} problem(s): "
            f"{first}{more}"
        )
    return report


def check_bundle(bundle_dir, version: str = "10.3") -> dict[str, Report]:
    """{file name: Report} for every ``*.onnx`` directly in ``bundle_dir`` (vision.onnx, decoder.onnx, ...).

    Raises:
        InputError: not a directory, or no .onnx file in it.
    """
    d = Path(bundle_dir)
    files = sorted(d.glob("*.onnx")) if d.is_dir() else []
    if not files:
        raise InputError(f"no .onnx graphs in {d}")
    return {f.name: check_graph(f, version) for f in files}
