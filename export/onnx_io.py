"""Shared ONNX export plumbing: torch module -> .onnx file with named inputs, outputs and dims.

Data flow: wrapper module + example args + TensorSpecs (names, dim names) --torch.onnx.export (dynamo,
onnxscript optimizer)--> ONNX IR model (initializers still reference the torch tensors, no copy) --dim
names set to the spec's names--> streamed to ``out_path`` (+ ``out_path.data`` external data when the
weights exceed ``EXTERNAL_DATA_BYTES``, so a 3 B decoder never exists twice in RAM nor hits protobuf's 2 GB;
one writer thread with at most ``IN_FLIGHT_BYTES`` copied out of torch at a time). Below that size the graph
is serialized inline, which holds the weights twice more for a moment (measured: +2x on the 92 M medium
decoder), a few hundred MB at most.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
import torch

from nora_edge import bundle
from nora_edge.errors import ExportError

# torch.onnx warns once per export that torchvision's ops are not registered: NORA uses none of them
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to <name>.data (protobuf caps a file at 2 GB)
IN_FLIGHT_BYTES = 256 << 20  # weight bytes copied out of torch and not yet written, at most


def dynamic_shapes_for(specs: Sequence[bundle.TensorSpec], varargs_from: int | None = None) -> tuple:
    """torch.export dynamic_shapes (one dict per input) from dim names.

    Every named dim is ``Dim.DYNAMIC`` (torch.export infers relations such as total = past + seq); the
    names are written into the graph afterwards by :func:`rename_dims`. Inputs from ``varargs_from`` on are
    grouped into one tuple (a ``*args`` parameter).
    """
    out = []
    for spec in specs:
        axes = {i: torch.export.Dim.DYNAMIC for i, d in enumerate(spec.shape) if isinstance(d, str)}
        out.append(axes or None)
    if varargs_from is not None:
        out = [*out[:varargs_from], tuple(out[varargs_from:])]
    return tuple(out)


def rename_dims(model: ir.Model, ins: Sequence[bundle.TensorSpec], outs: Sequence[bundle.TensorSpec]) -> None:
    """Set every graph input/output shape to the spec's ints and dim names (exporter symbols replaced).

    Raises:
        ExportError: a spec'd tensor is missing, or its rank or a fixed dim differs.
    """
    values = {v.name: v for v in [*model.graph.inputs, *model.graph.outputs]}
    names = [v.name for v in [*model.graph.inputs, *model.graph.outputs]]
    expected = [s.name for s in [*ins, *outs]]
    if names != expected:
        raise ExportError(f"exported graph I/O {names[:6]}... differs from the spec {expected[:6]}...")
    for spec in [*ins, *outs]:
        value = values[spec.name]
        shape = value.shape
        if shape is None or len(shape) != len(spec.shape):
            raise ExportError(f"graph tensor '{spec.name}' has shape {shape}, spec says {spec.shape}")
        for got, want in zip(shape, spec.shape, strict=True):
            if isinstance(want, int) and isinstance(got, int) and got != want:
                raise ExportError(f"graph tensor '{spec.name}' has dim {got}, spec says {want}")
        value.shape = ir.Shape(list(spec.shape))


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes of the graph's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def export_module(
    module: torch.nn.Module,
    args: tuple,
    out_path: Path,
    ins: Sequence[bundle.TensorSpec],
    outs: Sequence[bundle.TensorSpec],
    *,
    varargs_from: int | None = None,
) -> list[str]:
    """Export ``module(*args)`` to ``out_path`` with the specs' tensor and dim names.

    Args:
        varargs_from: index of the first input that the module receives through ``*args``.

    Returns:
        external data file names written beside ``out_path`` (empty when the graph is one file).

    Raises:
        ExportError: the exporter failed or the graph's interface differs from the specs.
    """
    out_path = Path(out_path)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=[s.name for s in ins],
                output_names=[s.name for s in outs],
                dynamic_shapes=dynamic_shapes_for(ins, varargs_from),
                opset_version=OPSET,
                optimize=True,
                verbose=False,
                report=False,
            )
    except Exception as e:  # the exporter raises many types
        raise ExportError(f"torch.onnx.export of {type(module).__name__} failed: {e}") from e
    rename_dims(program.model, ins, outs)
    external = initializer_bytes(program.model) > EXTERNAL_DATA_BYTES
    if external:  # one writer thread, 256 MiB in flight: onnx_ir's defaults buffer up to 1 GiB across threads
        ir.save(
            program.model,
            out_path,
            external_data=f"{out_path.name}.data",
            max_workers=1,
            max_in_flight_bytes=IN_FLIGHT_BYTES,
        )
    else:
        program.save(out_path, external_data=False)
    data = out_path.parent / f"{out_path.name}.data"
    return [data.name] if external and data.is_file() else []
