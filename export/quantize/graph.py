"""ONNX graph plumbing for the quantization recipes: load/save (external data, atomic), sizes, graph passes.

Data flow: ``.onnx`` (+ external data) -> :func:`load_model` -> ModelProto -> passes
(:func:`rewrite_gemm_to_matmul`, :func:`set_nbits_accuracy_level`, :func:`check_nbits_accuracy`)
-> :func:`save_model_atomic` -> ``out.onnx`` (+ ``out.onnx.data`` when the tensors exceed ~2 GB).
"""

from __future__ import annotations

import heapq
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from nora_edge.errors import ExportError

TWO_GB = 2**31 - 1
INLINE_LIMIT = TWO_GB - (
    64 << 20
)  # weight bytes above which a graph is saved with external data (room for the graph)
EXTERNAL_SUFFIX = ".data"


def load_model(path: str | os.PathLike[str], *, load_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, with its external data unless ``load_weights`` is False.

    Raises:
        ExportError: missing or unreadable file (named).
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX model not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as e:  # onnx raises DecodeError, OSError, ValidationError...
        raise ExportError(f"{path}: cannot load ONNX model ({e})") from e


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (raw or typed fields), without serialising the proto."""
    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            total += numpy_helper.to_array(t).nbytes
    return total


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The ``.onnx`` file and every external-data file it references (existing ones)."""
    path = Path(path)
    model = load_model(path, load_weights=False)
    files = {path}
    for t in model.graph.initializer:
        if external_data_helper.uses_external_data(t):
            info = external_data_helper.ExternalDataInfo(t)
            files.add(path.parent / info.location)
    return sorted(files)


def model_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model and its external data."""
    return sum(p.stat().st_size for p in model_files(path) if p.is_file())


def save_model_atomic(
    model: onnx.ModelProto, out: str | os.PathLike[str], *, external: bool | None = None
) -> list[str]:
    """Save ``model`` to ``out`` via a temp dir and rename (a crash leaves no half-written ``out``).

    Args:
        model: the model (weights loaded). With external data the proto is consumed (its tensors become
            references to the written file); do not reuse it.
        out: target ``.onnx`` path; its directory is created.
        external: store tensors in ``<out name>.data`` beside it; None decides by size (> 2 GB).

    Returns:
        the external data file names written beside ``out`` (empty if none).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        external = tensor_bytes(model) > INLINE_LIMIT
    data_name = out.name + EXTERNAL_SUFFIX
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        if external:
            onnx.save_model(
                model,
                str(tmp / out.name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
                convert_attribute=False,
            )
            os.replace(tmp / data_name, out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp / out.name))
        os.replace(tmp / out.name, out)
        if not external and (out.parent / data_name).exists():
            (out.parent / data_name).unlink()  # stale data of an earlier external save under this name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [data_name] if external else []


def copy_model(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[str]:
    """Copy a model (and its external data, re-homed beside ``out``) atomically."""
    return save_model_atomic(load_model(src), out)


# --- Gemm -> MatMul (+ Add) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmRewrite:
    """What :func:`rewrite_gemm_to_matmul` did: rewritten node names and skipped ones with the reason."""

    rewritten: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def load_gemm_weights(model: onnx.ModelProto, base: str | os.PathLike[str]) -> int:
    """Read in the external data of every Gemm's constant B (what :func:`rewrite_gemm_to_matmul` transposes)
    in a model loaded without weights; ``base`` is the model's folder. Returns how many tensors were read."""
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for n in model.graph.node:
        t = inits.get(n.input[1]) if n.op_type == "Gemm" and len(n.input) > 1 else None
        if t is not None and external_data_helper.uses_external_data(t):
            external_data_helper.load_external_data_for_tensor(t, str(base))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
            count += 1
    return count


def rewrite_gemm_to_matmul(model: onnx.ModelProto) -> GemmRewrite:
    """Rewrite ``Gemm(A, B, C)`` with constant 2-D B, alpha = beta = 1, transA = 0 to ``MatMul(A, B') (+ C)``.

    ``B' = B.T`` when transB = 1 (stored transposed as a new initializer, the old one dropped when no other
    node uses it). The product and the bias add are the same float32 operations, so onnxruntime computes
    bit-identical outputs (tested); Gemm nodes outside that pattern are left alone and listed as skipped.
    Modifies ``model`` in place (top-level graph only).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    taken = {o for n in graph.node for o in n.output} | set(inits) | {i.name for i in graph.input}
    new_nodes, rewritten, skipped = [], [], []
    for node in graph.node:
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        name = node.name or node.output[0]
        alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        trans_a, trans_b = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
        has_c = len(node.input) > 2 and node.input[2] != ""
        reason = None
        if node.input[1] not in inits:
            reason = "B is not an initializer"
        elif len(inits[node.input[1]].dims) != 2:
            reason = "B is not 2-D"
        elif trans_a:
            reason = "transA = 1"
        elif alpha != 1.0 or (has_c and beta != 1.0):
            reason = f"alpha = {alpha}, beta = {beta} (only 1, 1 is rewritten exactly)"
        if reason:
            skipped.append((name, reason))
            new_nodes.append(node)
            continue
        b_name = node.input[1]
        if trans_b:
            b = numpy_helper.to_array(inits[b_name])
            new_b = fresh_name(f"{b_name}_T", taken)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b.T), new_b))  # (K, N)
            uses[b_name] -= 1
            b_name = new_b
        out = node.output[0]
        if has_c:
            mm_out = fresh_name(f"{out}_matmul", taken)
            new_nodes.append(
                onnx.helper.make_node("MatMul", [node.input[0], b_name], [mm_out], name=f"{name}_MatMul")
            )
            new_nodes.append(onnx.helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{name}_Add"))
        else:
            new_nodes.append(
                onnx.helper.make_node("MatMul", [node.input[0], b_name], [out], name=f"{name}_MatMul")
            )
        rewritten.append(name)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    unused = {k for k, v in uses.items() if v == 0}
    keep = [t for t in graph.initializer if t.name not in unused]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    return GemmRewrite(tuple(rewritten), tuple(skipped))


def fresh_name(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


# --- MatMulNBits accuracy level -------------------------------------------------------------------------
def _nbits_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]


def set_nbits_accuracy_level(model: onnx.ModelProto, level: int | None) -> int:
    """Set (or with None, remove) ``accuracy_level`` on every MatMulNBits node; returns how many nodes."""
    nodes = _nbits_nodes(model)
    for n in nodes:
        keep = [a for a in n.attribute if a.name != "accuracy_level"]
        n.ClearField("attribute")
        n.attribute.extend(keep)
        if level is not None:
            n.attribute.append(onnx.helper.make_attribute("accuracy_level", int(level)))
    return len(nodes)


def check_nbits_accuracy(model: onnx.ModelProto, *, fix: bool = False, source: str = "model") -> list[str]:
    """Guard against 8-bit MatMulNBits without ``accuracy_level = 4`` (~20x slower than fp32 on CPU).

    Args:
        model: graph to check (modified only when ``fix``).
        fix: set accuracy_level 4 on the offending nodes (with a warning) instead of raising.
        source: file name for messages.

    Returns:
        names of the offending nodes (fixed when ``fix``).

    Raises:
        ExportError: offending nodes and ``fix`` is False (the message names the first).
    """
    bad = [n for n in _nbits_nodes(model) if _attr(n, "bits", 4) == 8 and _attr(n, "accuracy_level", 0) != 4]
    if bad and not fix:
        raise ExportError(
            f"{source}: MatMulNBits node '{bad[0].name}' (and {len(bad) - 1} more) has bits = 8 and "
            f"accuracy_level = {_attr(bad[0], 'accuracy_level', None)}; set accuracy_level 4 (int8 compute) "
            "or it runs ~20x slower than fp32"
        )
    for n in bad:
        keep = [a for a in n.attribute if a.name != "accuracy_level"]
        n.ClearField("attribute")
        n.attribute.extend([*keep, onnx.helper.make_attribute("accuracy_level", 4)])
    if bad:
        warnings.warn(
            f"{source}: set accuracy_level = 4 on {len(bad)} 8-bit MatMulNBits node(s)", stacklevel=2
        )
    return [n.name for n in bad]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """op_type -> number of nodes in the top-level graph."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def find_head_nodes(model: onnx.ModelProto, output: str = "logits") -> list[str]:
    """Names of the MatMul/Gemm nodes (constant weight) that produce graph output ``output``.

    Walks back from ``output`` through every producer, stopping at the first MatMul/Gemm on each path and
    never following shape-only inputs (Shape, Size), so the decoder body behind the head is not reached.

    Raises:
        ExportError: ``output`` is not a graph output, or no such node is found.
    """
    if output not in {o.name for o in model.graph.output}:
        raise ExportError(
            f"graph has no output '{output}' (outputs: {[o.name for o in model.graph.output][:8]})"
        )
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    heads, seen, stack = [], set(), [output]
    while stack:
        t = stack.pop()
        node = producer.get(t)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            heads.append(node.name)
            continue
        if node.op_type in ("Shape", "Size"):
            continue
        stack.extend(i for i in node.input if i)
    if not heads:
        raise ExportError(f"no MatMul/Gemm with a constant weight produces graph output '{output}'")
    return heads


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder the top-level nodes so every node follows its producers (the ONNX spec requires it; the fp16
    converter appends its boundary casts at the end). Stable: keeps the original order where it can.

    Raises:
        ExportError: the graph has a cycle or reads a tensor nothing produces.
    """
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    pending = {i: {x for x in n.input if x} for i, n in enumerate(nodes)}
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting: dict[str, list[int]] = {}
    missing = {}
    for i, needs in pending.items():
        left = {x for x in needs if x not in available}
        for x in left:
            if x not in produced_by:
                missing[x] = nodes[i].name
            waiting.setdefault(x, []).append(i)
        pending[i] = left
    if missing:
        name, node = next(iter(missing.items()))
        raise ExportError(f"node '{node}' reads tensor '{name}' that no node, input or initializer provides")
    ready = [i for i, left in pending.items() if not left]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for o in nodes[i].output:
            for j in waiting.pop(o, []):
                pending[j].discard(o)
                if not pending[j]:
                    heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ExportError(f"graph has a cycle: {len(nodes) - len(order)} node(s) never become ready")
    graph.ClearField("node")
    graph.node.extend(order)
