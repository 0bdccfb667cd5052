"""Build the decoder graphs that ``bench/decoder_flavors.py`` compares, cached under ``<out>/<fixture>``.

Data flow: ``nora-edge tiny --preset medium --horizon 5 --seed 0`` (or the real-dimension slice: Qwen2.5-VL-3B
text dims, 4 layers, :data:`REAL_SLICE`) -> checkpoint (HF Qwen2.5-VL directory)
-> ``nora-edge export --no-validate`` -> fp32 bundle -> ``nora-edge quantize --recipe int4 --accept-degraded``
-> int4 bundle (MatMulNBits, block 128, asymmetric, accuracy_level 4); the same checkpoint ->
onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder -p int4 -e cpu --extra_options
exclude_embeds=true``: GroupQueryAttention, MRotaryEmbedding, SkipSimplifiedLayerNormalization, a full-vocabulary
lm_head) int4 with its defaults (block 32, symmetric), int4 with ours (block 128, asymmetric) and fp32 ->
:func:`ensure_head_sliced` (the block-128 graph's lm_head cut to our action-head rows: the builder adapted to our
bundle); our graphs -> onnxruntime.transformers' ``optimize_model`` (model_type "qwen3") -> "ours + ORT
transformers fusion" graphs.

Also the graph inspection the benchmark reports: :func:`node_counts` (file and after onnxruntime's optimizer)
and :func:`max_abs_diff` (same-input output differences), and :func:`markdown`, the report of a result.

Every step is skipped when its output exists (delete a folder to rebuild it). The CLI steps run as subprocesses
of this interpreter's ``nora-edge`` script / ``python -m``, so a failure leaves its full log in ``<out>/<fixture>/logs``.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from nora_edge.bundle_specs import expand_ranges
from nora_edge.errors import ExportError, InputError

FUSION_MODEL_TYPE = "qwen3"  # onnxruntime.transformers.optimizer: decoder-only with RoPE, GQA, RMSNorm
TOP_OPS = 8  # op types per flavor in the report
REUSE = {"ckpt": "kernels-bench/medium-ckpt", "bundle": "kernels-bench/medium-bundle"}


@dataclass(frozen=True)
class DecoderDims:
    """Text-decoder shapes read from a checkpoint's config.json.

    Attributes:
        hidden: width of ``inputs_embeds`` (B, S, hidden).
        layers: decoder layers (one past/present K and V pair each).
        heads: query heads.
        kv_heads: key/value heads; K/V caches are (B, kv_heads, P, head_dim).
        head_dim: hidden // heads.
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int


def dims_from_config(ckpt_dir: Path) -> DecoderDims:
    """Decoder dims of an HF checkpoint directory (flat transformers-4 layout or a ``text_config`` section).

    Raises:
        InputError: no config.json, or a field missing.
    """
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    cfg = json.loads(path.read_text())
    cfg = {**cfg, **cfg.get("text_config", {})}
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return DecoderDims(
            hidden=hidden,
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg["num_key_value_heads"]),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
        )
    except KeyError as e:
        raise InputError(f"{path}: missing {e.args[0]!r}") from e


def genai_available() -> tuple[bool, str]:
    """(True, version) when onnxruntime-genai's model builder is importable, else (False, the reason)."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return False, "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
    try:
        import onnxruntime_genai as og
        from onnxruntime_genai.models import builder  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken native wheel raises anything
        return False, f"onnxruntime-genai does not import: {type(e).__name__}: {e}"
    return True, str(getattr(og, "__version__", "unknown"))


def _run(cmd: list[str], log: Path) -> None:
    """Run ``cmd``, logging stdout+stderr to ``log``.

    Raises:
        ExportError: a non-zero exit, naming the command and its log's last lines.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise ExportError(f"{' '.join(cmd)} exited {rc}; log {log}:\n" + "\n".join(tail))


def _cli() -> str:
    return str(Path(sys.executable).with_name("nora-edge"))


# Qwen2.5-VL-3B text dims (hidden 2048, MLP 11008, 16 query / 2 KV heads of 128) with 4 of its 36 layers, the
# medium fixture's vocabulary (4096 base + specials + 2048 actions) and vision tower, fp32 (~1.3 GB).
# (export/fixtures.py Preset fields, imported lazily: that module pulls in torch)
REAL_SLICE = (4096, 2048, 11008, 4, 16, 2, 4, 512, 1368, 8, (1, 3), "float32", None, 8000)
FIXTURES = ("medium", "real-slice")


def _write_real_slice(ckpt: Path, log: Path) -> None:
    """The real-dimension slice checkpoint via export/fixtures.py's writer (seed 0, horizon 5)."""
    from nora_edge.export.fixtures import Preset, write_checkpoint_files

    preset = Preset(*REAL_SLICE)
    tmp = ckpt.parent / f"{ckpt.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_checkpoint_files(tmp, preset, 5, 0, (), False)
    tmp.rename(ckpt)
    log.write_text(f"wrote {ckpt} with {preset} in {time.perf_counter() - t0:.1f} s\n")


def ensure_ours(out: Path, fixture: str = "medium") -> dict[str, Path]:
    """Fixture checkpoint (seed 0, horizon 5), fp32 bundle and int4 bundle under ``out/<fixture>``.

    "medium" reuses ``<out>/../kernels-bench/medium-{ckpt,bundle}`` when present (same preset, seed, horizon).

    Returns:
        {"dir": out/<fixture>, "ckpt": dir, "fp32" / "int4" / "fused-fp32" / "fused-int4": decoder.onnx}
        (the portable export and the fused one, ``--decoder-graph fused``, each quantized by our int4 recipe) and
        "fused-int4-b32" (the fused one through the int4-b32 recipe: the builder's default blocks).

    Raises:
        InputError: unknown fixture.
        ExportError: a step failed (its log named).
    """
    if fixture not in FIXTURES:
        raise InputError(f"fixture {fixture!r}: choose from {FIXTURES}")
    root = Path(out) / fixture
    logs = root / "logs"
    paths = {"ckpt": root / "ckpt", "bundle": root / "bundle"}
    if fixture == "medium":
        for key, marker in (("ckpt", "config.json"), ("bundle", "manifest.json")):
            reuse = Path(out).parent / REUSE[key]
            if (reuse / marker).exists():
                paths[key] = reuse
    if not (paths["ckpt"] / "config.json").exists():
        if fixture == "medium":
            cmd = [_cli(), "tiny", str(paths["ckpt"]), "--preset", "medium", "--horizon", "5", "--seed", "0"]
            _run(cmd, logs / "tiny.log")
        else:
            _write_real_slice(paths["ckpt"], logs / "tiny.log")
    if not (paths["bundle"] / "manifest.json").exists():
        _run(
            [_cli(), "export", str(paths["ckpt"]), "--out", str(paths["bundle"]), "--no-validate"],
            logs / "export.log",
        )
    fused = root / "fused-bundle"  # the product's fused onnxruntime flavor (export --decoder-graph fused)
    if not (fused / "manifest.json").exists():
        cmd = [_cli(), "export", str(paths["ckpt"]), "--out", str(fused), "--no-validate"]
        _run([*cmd, "--decoder-graph", "fused"], logs / "export-fused.log")
    for src, int4, recipe in (
        (paths["bundle"], root / "int4", "int4"),
        (fused, root / "fused-int4", "int4"),
        (fused, root / "fused-int4-b32", "int4-b32"),  # the builder's default blocks, through our recipe
    ):
        if not (int4 / "manifest.json").exists():
            cmd = [_cli(), "quantize", str(src), "--out", str(int4), "--recipe", recipe, "--accept-degraded"]
            _run(cmd, logs / f"quantize-{int4.name}.log")
    return {
        "dir": root,
        "ckpt": paths["ckpt"],
        "fp32": paths["bundle"] / "decoder.onnx",
        "int4": root / "int4" / "decoder.onnx",
        "fused-fp32": fused / "decoder.onnx",
        "fused-int4": root / "fused-int4" / "decoder.onnx",
        "fused-int4-b32": root / "fused-int4-b32" / "decoder.onnx",
    }


BUILDER_VARIANTS = {
    # name: (precision, extra options beyond exclude_embeds=true, which makes inputs_embeds the input like ours)
    "builder-int4": ("int4", []),  # the builder's defaults: block 32, symmetric, accuracy_level 4
    "builder-int4-b128": ("int4", ["block_size=128", "is_symmetric=false"]),  # our int4 recipe's blocks
    "builder-fp32": ("fp32", []),  # parity reference: same math as ours-fp32 up to float rounding
}


def ensure_builder(ckpt: Path, root: Path, variant: str) -> Path:
    """onnxruntime-genai builder CPU decoder (``variant`` of BUILDER_VARIANTS) for ``ckpt``; returns its model.onnx.

    Raises:
        InputError: unknown variant.
        ExportError: the builder failed (its log's tail in the message).
    """
    if variant not in BUILDER_VARIANTS:
        raise InputError(f"builder variant {variant!r}: choose from {sorted(BUILDER_VARIANTS)}")
    precision, extra = BUILDER_VARIANTS[variant]
    dst = Path(root) / variant
    model = dst / "model.onnx"
    if not model.exists():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(dst)]
        cmd += ["-p", precision, "-e", "cpu", "-c", str(Path(root) / "builder-cache")]
        cmd += ["--extra_options", "exclude_embeds=true", *extra]
        _run(cmd, Path(root) / "logs" / f"{variant}.log")
    return model


def ensure_head_sliced(src: Path, rows: np.ndarray, dst_dir: Path) -> Path:
    """A builder graph whose lm_head computes only ``rows`` (our action head's vocabulary ids), as adapting the
    builder's output to our bundle would: the MatMulNBits blob / scales / zero points (N-major) or the MatMul
    weight (K, N) keep those rows in order and ``logits`` becomes (B, S, len(rows)).

    Returns:
        dst_dir/model.onnx (weights in model.onnx.data).

    Raises:
        ExportError: no MatMul / MatMulNBits node writes ``logits``.
    """
    from onnx import numpy_helper

    model_path = Path(dst_dir) / "model.onnx"
    if model_path.exists():
        return model_path
    model = onnx.load(str(src))
    head = next((n for n in model.graph.node if "logits" in n.output), None)
    if head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        raise ExportError(
            f"{src}: no MatMul/MatMulNBits node writes 'logits' (found {head and head.op_type})"
        )
    inits = {i.name: i for i in model.graph.initializer}
    axis = 1 if head.op_type == "MatMul" else 0
    for name in head.input[1:]:
        if name in inits:
            arr = np.take(numpy_helper.to_array(inits[name]), rows, axis=axis)
            inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    for a in head.attribute:
        if a.name == "N":
            a.i = int(rows.size)
    out = next(o for o in model.graph.output if o.name == "logits")
    out.type.tensor_type.shape.dim[-1].Clear()
    out.type.tensor_type.shape.dim[-1].dim_value = int(rows.size)
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(model_path), save_as_external_data=True, location="model.onnx.data")
    return model_path


def head_rows(bundle_dir: Path) -> np.ndarray:
    """int64 (rows,) vocabulary id of each row of our decoder's logits, from the bundle manifest."""
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    return expand_ranges(manifest["actions"]["head_rows"], "actions.head_rows")


def ensure_fused(src: Path, dst: Path, dims: DecoderDims) -> tuple[Path, dict[str, int]]:
    """Our decoder through onnxruntime.transformers' fusion passes (model_type "qwen3", opt_level 0).

    Returns:
        (the fused model path, {fused op type: count} as the optimizer reports it, zeros dropped).
    """
    dst = Path(dst)
    stats_file = dst.with_suffix(".fusions.json")
    if dst.exists() and stats_file.exists():
        return dst, json.loads(stats_file.read_text())
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("symbolic_shape_infer").setLevel(logging.ERROR)
    model = optimize_model(
        str(src),
        model_type=FUSION_MODEL_TYPE,
        num_heads=dims.heads,
        hidden_size=dims.hidden,
        opt_level=0,
        optimization_options=FusionOptions(FUSION_MODEL_TYPE),
    )
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    dst.parent.mkdir(parents=True, exist_ok=True)
    big = Path(src).stat().st_size > 1_800_000_000  # protobuf's 2 GB limit
    model.save_model_to_file(str(dst), use_external_data_format=big)
    stats_file.write_text(json.dumps(stats, indent=1))
    return dst, stats


def op_counts(model) -> dict[str, int]:
    """{op type: count} of an ``onnx.ModelProto``'s main graph, most frequent first."""
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def node_counts(model_path: Path, work_dir: Path | None = None) -> dict:
    """Nodes and op types of ``model_path`` as stored and after onnxruntime's ORT_ENABLE_ALL optimizer (CPU EP).

    Returns:
        {"file": {"nodes": n, "ops": {op: count}}, "optimized": {"nodes": n, "ops": {op: count}}}.
    """
    model_path = Path(model_path)
    raw = onnx.load(str(model_path), load_external_data=False)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3  # not the warning that the written model is tuned to this CPU: counted only
        # weights go to a side file so a large model does not hit protobuf's 2 GB limit
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.data"
        )
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return {
        "file": {"nodes": len(raw.graph.node), "ops": op_counts(raw)},
        "optimized": {"nodes": len(opt.graph.node), "ops": op_counts(opt)},
    }


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Max |a - b| of logits and of all presents together (None where not compared), over the outputs both have.

    Raises:
        InputError: no common output, or shapes that differ.
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise InputError("the two output sets share no name")
    diff: dict = {"logits": None, "present": None, "compared": 0}
    for name in common:
        if a[name].shape != b[name].shape:
            raise InputError(f"{name}: shapes {a[name].shape} and {b[name].shape} differ")
        key = "logits" if name == "logits" else "present"
        d = float(np.max(np.abs(a[name].astype(np.float64) - b[name])))
        diff[key] = d if diff[key] is None else max(diff[key], d)
        diff["compared"] += int(a[name].size)
    return diff


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _precision(name: str) -> str:
    return "int4" if "int4" in name else "fp32"


def _ratio(timing: dict, a: str, b: str) -> str:
    if a in timing and b in timing:
        return f"{timing[a]['median'] / timing[b]['median']:.3f}"
    return "-"


def markdown(result: dict) -> str:
    """Report tables: node counts (file / after ORT) with top op types, ms per step per thread count, ratios."""
    lines = [f"# Decoder flavors: one decode step ({result['fixture']} fixture)", ""]
    d = result["dims"]
    lines += [
        f"Past {result['past']} positions, {result['steps']} interleaved steps per flavor; dims {d}; "
        f"share-buffer cache length {result['cache_len']}; onnxruntime {result['notes']['onnxruntime']}, "
        f"onnxruntime-genai {result['notes']['onnxruntime_genai']}.",
        "",
        "| flavor | nodes (file) | nodes (after ORT_ENABLE_ALL) | top ops after ORT |",
        "|---|---|---|---|",
    ]
    for name, n in result["nodes"].items():
        top = ", ".join(f"{op} {c}" for op, c in list(n["optimized"]["ops"].items())[:TOP_OPS])
        lines.append(f"| {name} | {n['file']['nodes']} | {n['optimized']['nodes']} | {top} |")
    lines += ["", "| flavor | " + " | ".join(f"{t} thr median ms | p99 ms" for t in result["timing"]) + " |"]
    lines.append("|---|" + "---|---|" * len(result["timing"]))
    names = list(next(iter(result["timing"].values()), {}))
    for name in names:
        cells = [f"{tm[name]['median']:.3f} | {tm[name]['p99']:.3f}" for tm in result["timing"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    pairs = [
        (a, b)
        for a in names
        if a.startswith(("ours", "fused"))
        for b in names
        if b.startswith("builder") and _precision(a) == _precision(b)
    ]
    lines += [
        "",
        "Ratios of medians (ours or fused / builder):",
        "",
        "| pair | " + " | ".join(f"{t} thr" for t in result["timing"]) + " |",
    ]
    lines.append("|---|" + "---|" * len(result["timing"]))
    for a, b in pairs:
        lines.append(
            f"| {a} / {b} | " + " | ".join(_ratio(tm, a, b) for tm in result["timing"].values()) + " |"
        )
    if result["notes"]["fusions"]:
        lines += ["", "ORT transformers fusions that fired: " + json.dumps(result["notes"]["fusions"])]
    lines += ["", f"Same inputs, position_ids t/h/w = P - {tuple(result['equality_offsets'])}:"]
    for name, eq in result["equality"].items():
        lines.append(
            f"- {name}: max |logits diff| {_g(eq['logits'])}, "
            f"max |present diff| {_g(eq['present'])} over {eq['compared']} values"
        )
    if result.get("profile"):
        lines += [
            "",
            f"onnxruntime profiler, {result['threads'][0]} thread(s), graphs run round-robin, ms per step by op "
            "type (profiling adds per-node overhead; compare flavors with each other, not with the timings above):",
            "",
            "| flavor | run | all nodes | top op types |",
            "|---|---|---|---|",
        ]
        for name, prof in result["profile"].items():
            ops = [(k, v) for k, v in prof.items() if not k.startswith("(")][:TOP_OPS]
            top = ", ".join(f"{k} {v:.3f}" for k, v in ops)
            lines.append(f"| {name} | {prof['(run)']:.3f} | {prof['(all nodes)']:.3f} | {top} |")
    for name, err in result["notes"]["errors"].items():
        lines.append(f"- {name} not measured: {err}")
    return "\n".join(lines) + "\n"
