"""The fused onnxruntime decoder: onnxruntime-genai's model builder output, adapted to the bundle's contract.

Data flow: checkpoint directory (HF Qwen2.5-VL) --:func:`run_builder` (``python -m
onnxruntime_genai.models.builder -p fp32 -e cpu --extra_options exclude_embeds=true``, a subprocess so its
copy of the model is freed on exit)--> builder graph: per layer SimplifiedLayerNormalization /
SkipSimplifiedLayerNormalization (RMSNorm + residual), MatMul q/k/v + bias, ``MRotaryEmbedding`` (Qwen2.5-VL's
t/h/w rotary sections), ``GroupQueryAttention`` over the grouped KV heads (no expanded K/V), SwiGLU MLP; a
full-vocabulary lm_head over every position --:func:`adapt_builder_graph`--> the lm_head cut to the bundle's
head rows and applied to the LAST position only (logits (B, rows), like the portable graph), the rotary
cos/sin caches cut from the config's context length (128k rows) to the KV slots, dims renamed -> decoder.onnx.

Interface (same names as the portable graph, nora_edge/bundle.py): inputs_embeds (B, S, H), position_ids
(3, B, S), attention_mask (B, L+S) of ones, past_key_values.{i}.key/value (B, kv_heads, SLOTS, hd) ->
logits (B, rows), present.{i}.key/value (B, kv_heads, SLOTS, hd). The KV tensors are fixed buffers of
``max_len`` slots (meta ``kv_cache`` = "shared"): GroupQueryAttention writes the S new rows at slots L..L+S-1
(it reads L from attention_mask) and, when the runtime binds each present to its past buffer, updates it in
place (GroupQueryAttention's past_present_share_buffer mode; the runtime loop is nora_edge/static_kv.py).

Why the builder, not our own fused emitter: measured side by side (``make bench-decoder-flavors``), the
builder's int4 graph was 1.16-1.25x faster per decode step than our traced graph on this CPU, and its 92
nodes after onnxruntime's optimizer against our 425 are the fused ops onnxruntime's CPU and CUDA kernels
exist for; adapting it costs a head cut and a Gather, writing the same emitter again would duplicate it.
The builder's source: github.com/microsoft/onnxruntime-genai, src/python/py/models/builder.py.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nora_edge import bundle
from nora_edge.errors import ExportError

KV_LAYOUT = (
    "shared"  # components.decoder.meta.kv_cache: fixed buffers, GroupQueryAttention writes at L..L+S-1
)
DEFAULT_KV_SLOTS = 1024  # prompt (prefix + 64 image tokens at 224 px + instruction + suffix) + new tokens
GENAI_PIN = "onnxruntime-genai>=0.18,<0.19"  # the builder version whose graph this adapter was written for
ROTARY_CACHES = ("cos_cache", "sin_cache")
BUILDER_FUSED_OPS = ("GroupQueryAttention", "MRotaryEmbedding", "SkipSimplifiedLayerNormalization")


def builder_version() -> str:
    """onnxruntime-genai's version.

    Raises:
        ExportError: the package is missing (it comes with the ``export`` extra) or does not import.
    """
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise ExportError(
            f"the fused decoder graph needs onnxruntime-genai's model builder: pip install '{GENAI_PIN}' "
            "(part of nora-edge[export]), or export the portable graph (--decoder-graph portable)"
        )
    try:
        import onnxruntime_genai as og
    except Exception as e:  # noqa: BLE001 - a broken native wheel raises anything
        raise ExportError(f"onnxruntime-genai does not import: {type(e).__name__}: {e}") from e
    return str(getattr(og, "__version__", "unknown"))


def run_builder(checkpoint: Path, out_dir: Path, log: Path) -> Path:
    """Run the model builder (fp32, CPU, embeddings excluded) on ``checkpoint``; returns its model.onnx.

    Raises:
        ExportError: the builder exited non-zero (the log's last lines in the message) or wrote no model.
    """
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(checkpoint),
        "-o",
        str(out_dir),
    ]
    cmd += ["-p", "fp32", "-e", "cpu", "-c", str(out_dir / "cache"), "--extra_options", "exclude_embeds=true"]
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    model = out_dir / "model.onnx"
    if rc or not model.exists():
        tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-12:]
        raise ExportError(f"onnxruntime-genai's builder exited {rc} on {checkpoint}:\n" + "\n".join(tail))
    return model


def _set_shape(value: onnx.ValueInfoProto, dims: tuple) -> None:
    shape = value.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = int(d)


def _cut_head(model: onnx.ModelProto, rows: list[int], every: bool = False) -> None:
    """lm_head: keep ``rows`` of the weight (H, V) -> (H, rows) and apply it to the last position only; with
    ``every`` to every position (output ``logits_all`` (B, S, rows)), ``logits`` being its last row."""
    g = model.graph
    head = next((n for n in g.node if bundle.LOGITS in n.output), None)
    inits = {t.name: t for t in g.initializer}
    if head is None or head.op_type != "MatMul" or head.input[1] not in inits:
        raise ExportError(
            f"builder graph: no MatMul with a constant weight writes '{bundle.LOGITS}' "
            f"(found {head.op_type if head is not None else None}); is this onnxruntime-genai's fp32 output?"
        )
    weight = numpy_helper.to_array(inits[head.input[1]])  # (H, V)
    if max(rows) >= weight.shape[1]:
        raise ExportError(f"head row {max(rows)} is outside the builder lm_head's {weight.shape[1]} columns")
    inits[head.input[1]].CopyFrom(
        numpy_helper.from_array(np.ascontiguousarray(weight[:, rows]), head.input[1])
    )
    last, picked = "/model/lm_head/last_position", "/model/lm_head/last_position/output_0"
    g.initializer.append(numpy_helper.from_array(np.array(-1, np.int64), last))
    if every:  # head over every position -> logits_all; Gather its last row -> logits
        head.output[0] = bundle.LOGITS_ALL
        at = list(g.node).index(head) + 1
        g.node.insert(
            at,
            helper.make_node(
                "Gather", [bundle.LOGITS_ALL, last], [bundle.LOGITS], name="/model/lm_head/Gather", axis=1
            ),
        )  # (B, S, rows) -> (B, rows)
        outs = list(g.output)
        pos = next(i for i, o in enumerate(outs) if o.name == bundle.LOGITS) + 1
        g.output.insert(pos, helper.make_tensor_value_info(bundle.LOGITS_ALL, onnx.TensorProto.FLOAT, None))
        return
    g.node.insert(
        list(g.node).index(head),
        helper.make_node("Gather", [head.input[0], last], [picked], name="/model/lm_head/Gather", axis=1),
    )  # (B, S, H) -> (B, H)
    head.input[0] = picked


def _cut_rotary(model: onnx.ModelProto, slots: int) -> None:
    inits = {t.name: t for t in model.graph.initializer}
    for name in ROTARY_CACHES:
        if name not in inits:
            raise ExportError(f"builder graph has no '{name}' initializer (MRotaryEmbedding's table)")
        table = numpy_helper.to_array(inits[name])  # (context_length, hd/2)
        if table.shape[0] < slots:
            raise ExportError(f"builder {name} has {table.shape[0]} positions, fewer than {slots} KV slots")
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(table[:slots]), name))


def adapt_builder_graph(
    model: onnx.ModelProto,
    rows: list[int],
    slots: int,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    every: bool = False,
) -> tuple[list[bundle.TensorSpec], list[bundle.TensorSpec]]:
    """Adapt the builder's graph in place (module docstring) and return its (inputs, outputs) TensorSpecs;
    ``every``: the head on every position too (``logits_all``, for multi-token decoding).

    Raises:
        ExportError: the graph is not the builder's shape this adapter knows (a fused op, the head or an
            input missing), naming what is missing.
    """
    ops = {n.op_type for n in model.graph.node}
    missing = [op for op in BUILDER_FUSED_OPS if op not in ops]
    if missing:
        raise ExportError(
            f"builder graph lacks {missing}: not the onnxruntime-genai output this adapter knows"
        )
    _cut_head(model, rows, every)
    _cut_rotary(model, slots)
    del model.graph.value_info[
        :
    ]  # the builder's recorded shapes (128k-row caches, full-vocabulary logits) are stale
    hidden = {
        i.name: i.type.tensor_type.shape.dim[2].dim_value
        for i in model.graph.input
        if i.name == bundle.INPUTS_EMBEDS
    }
    if not hidden:
        raise ExportError(
            f"builder graph has no '{bundle.INPUTS_EMBEDS}' input (exclude_embeds=true missing?)"
        )
    kv = ("batch", kv_heads, "slots", head_dim)
    ins = [
        bundle.TensorSpec(bundle.INPUTS_EMBEDS, "float32", ("batch", "seq", hidden[bundle.INPUTS_EMBEDS])),
        bundle.TensorSpec(bundle.POSITION_IDS, "int64", (3, "batch", "seq")),
        bundle.TensorSpec(bundle.ATTENTION_MASK, "int64", ("batch", "total")),
    ]
    outs = [bundle.TensorSpec(bundle.LOGITS, "float32", ("batch", len(rows)))]
    if every:
        outs.append(bundle.TensorSpec(bundle.LOGITS_ALL, "float32", ("batch", "seq", len(rows))))
    for i in range(num_layers):
        ins += [bundle.TensorSpec(f(i), "float32", kv) for f in (bundle.past_key, bundle.past_value)]
        outs += [bundle.TensorSpec(f(i), "float32", kv) for f in (bundle.present_key, bundle.present_value)]
    values = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for spec in [*ins, *outs]:
        if spec.name not in values:
            raise ExportError(f"builder graph has no tensor '{spec.name}' (layers {num_layers} expected)")
        _set_shape(values[spec.name], spec.shape)
    return ins, outs


def export_decoder_fused(
    checkpoint: Path,
    out_path: Path,
    rows: list[int],
    dims: dict,
    *,
    head: str = "action",
    slots: int = DEFAULT_KV_SLOTS,
    logits_all: bool = False,
) -> bundle.ComponentSpec:
    """Build, adapt and save the fused decoder; returns its manifest ComponentSpec.

    Args:
        checkpoint: the HF checkpoint directory (the builder reads it itself).
        out_path: decoder.onnx in the staging directory.
        rows: Qwen id of each logits row.
        dims: num_layers, num_kv_heads, head_dim, hidden_size of the text model.
        head: "action" or "full" (meta).
        slots: KV buffer length (max prompt + new tokens a request may hold).
        logits_all: also output the head at every new position (meta ``logits_all: true``).

    Raises:
        ExportError: onnxruntime-genai missing, the builder failed, or its graph is not the expected one.
    """
    from nora_edge.export.decoder import decoder_spec
    from nora_edge.export.quantize.graph import save_model_atomic

    if slots < 16:
        raise ExportError(f"kv slots must be >= 16, got {slots}")
    version = builder_version()
    work = Path(tempfile.mkdtemp(prefix=".builder-", dir=Path(out_path).parent.parent))
    try:
        src = run_builder(Path(checkpoint), work / "model", work / "builder.log")
        model = onnx.load(str(src))
        ins, outs = adapt_builder_graph(
            model, rows, slots, int(dims["num_layers"]), int(dims["num_kv_heads"]), int(dims["head_dim"]),
            logits_all,
        )  # fmt: skip
        data_files = save_model_atomic(model, out_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return decoder_spec(
        dims, out_path, data_files, ins, outs, head, len(rows),
        kv_cache=KV_LAYOUT, max_len=int(slots), graph="fused",
        builder={"package": "onnxruntime-genai", "version": version},
        **({"logits_all": True} if logits_all else {}),
    )  # fmt: skip
