"""Quantized TensorRT-flavor bundles: recipe admission, the operator-table check of the quantized graphs, and the
manifest's ``tensorrt`` section.

Data flow: an fp32 ``--target tensorrt`` bundle (manifest ``tensorrt`` section: static KV, the TensorRT versions
its graphs passed) + a recipe --:func:`check_tensorrt_recipe` (recipes.py; dynamic int8 / MatMulNBits refused)-->
quantized graphs in a temp bundle --:func:`check_quantized_graphs`: every graph against every version's table
(``nora_edge.export.trt_support.check_graph``), any problem raises ExportError naming the node; the one exception
is an opset-21 graph (blocked INT4 ``DequantizeLinear``, int4-qdq) against a table whose header range ends at 20
while its own matrix lists INT4 as a DequantizeLinear type (10.1 GA): that version is recorded as *not passed*
with the reason, never as checked, provided nothing but the opset line is at fault--> :func:`tensorrt_section`
(the source's section, ``checked_versions`` narrowed to the versions every graph passed, ``not_passed``,
``precision``).

Build flags are not written here: ``nora_edge.trt_profiles.trt_precision`` derives them from each component's
precision label, shared by ``build-engine`` and the runtime's TensorRT EP (an ``fp16`` component is built strongly
typed so the calibrated fp32 islands keep their types; a ``*qdq*`` label sets INT8 for explicit quantization), and
``components.<graph>.meta.tensorrt`` is reserved for explicit EP option overrides.
"""

from __future__ import annotations

from pathlib import Path

from nora_edge.errors import ExportError

from .recipes import GRAPH_COMPONENTS, HEAD, BundleRecipe
from .registry import RECIPES, get_recipe

INT4_OPSET = 21


def tensorrt_recipes() -> list[str]:
    """Names of the built-in quantized recipes a ``--target tensorrt`` bundle can take (fp32 excluded)."""
    return [r.name for r in RECIPES.values() if r.tensorrt_ready and r.name != "fp32"]


def check_tensorrt_recipe(name: str | BundleRecipe) -> BundleRecipe:
    """The recipe, if every graph it writes is standard ONNX for TensorRT.

    Raises:
        InputError: unknown recipe name.
        ExportError: the recipe writes a graph TensorRT cannot parse (dynamic int8, MatMulNBits), naming it and
            the recipes that can.
    """
    r = get_recipe(name)
    if not r.tensorrt_ready:
        bad = [f"{c}={r.for_component(c).kind}" for c in (*GRAPH_COMPONENTS, HEAD)]
        raise ExportError(
            f"recipe '{r.name}' cannot target TensorRT ({', '.join(bad)}: dynamic int8 and MatMulNBits are "
            f"com.microsoft / onnxruntime-only ops); for --target tensorrt use one of {tensorrt_recipes()}"
        )
    return r


def _only_opset_21(report, path: Path) -> bool:
    """True when the report's only problems are the opset line for an opset-21 graph whose table lists INT4 as a
    DequantizeLinear type (the INT4 type exists only from opset 21, so the matrix covers what the header omits)."""
    import onnx

    from nora_edge.export.trt_support import table_for

    if not report.problems or any(p.kind != "opset" for p in report.problems):
        return False
    model = onnx.load(str(path), load_external_data=False)
    opset = max((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), default=0)
    dq = table_for(report.version)["operators"].get("DequantizeLinear") or {}
    return opset == INT4_OPSET and "INT4" in dq.get("types", [])


def check_quantized_graphs(paths: dict[str, Path], versions: list[str] | tuple[str, ...]) -> dict:
    """Check every quantized graph against every TensorRT version's operator table.

    Args:
        paths: component name -> .onnx path.
        versions: TensorRT versions (the fp32 source's ``tensorrt.checked_versions``).

    Returns:
        {"checked_versions": [versions every graph passed], "not_passed": {version: reason}}.

    Raises:
        ExportError: a graph has a problem other than the documented-opset case (module docstring); the message
            names the graph, the version and the first nodes (``assert_tensorrt_compatible``).
    """
    from nora_edge.export.trt_support import assert_tensorrt_compatible, check_graph

    passed, not_passed = [], {}
    for version in versions:
        ok = True
        for name, path in paths.items():
            report = check_graph(path, version)
            if report.ok:
                continue
            if _only_opset_21(report, path):
                ok = False
                not_passed[version] = (
                    f"{name}: {report.problems[0].detail}; its ops and dtypes all pass this table, which lists "
                    "INT4 (an opset-21 type) for DequantizeLinear: untested on this TensorRT version"
                )
                continue
            assert_tensorrt_compatible(path, version)  # raises, naming the nodes
        if ok:
            passed.append(version)
    if not passed:
        raise ExportError(f"no checked TensorRT version accepts every quantized graph: {not_passed}")
    return {"checked_versions": passed, "not_passed": not_passed}


def tensorrt_section(source: dict, recipe_name: str, checks: dict) -> dict:
    """The quantized bundle's manifest ``tensorrt`` section: the fp32 source's (profiles, static KV) with the
    versions the quantized graphs passed, those they did not (with the reason) and the recipe."""
    return {
        **source,
        "checked_versions": checks["checked_versions"],
        "not_passed": checks["not_passed"],
        "precision": recipe_name,
    }
