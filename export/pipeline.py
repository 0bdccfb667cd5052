"""NORA checkpoint -> validated ONNX bundle, component by component, freeing memory as it goes.

Data flow (each step a progress-bar stage):
  checkpoint dir --NoraCheckpoint (metadata, no torch)--> fp32 HF model + processor
  --references (only with validate): NORA's own inference (ReferencePolicy: HF generate over the full
  vocabulary with the checkpoint's generation_config) on held-out (frame, instruction) pairs, plus HF image
  features and logits for the graph checks (validate.py)--> embeddings.npy (fp16) --> vision.onnx (HF vision
  tower freed) --> decoder.onnx (+ .data; HF layers freed while copied) --> recipes step (quantization hook;
  fp32 = as exported) --> codec files + tokenizer --> validation (torch model gone): the graphs in onnxruntime
  vs HF, then the shipped runtime (NoraPolicy on the staged files) vs the references --> manifest.json LAST
  --> atomic rename to ``out``.

Everything is written into ``<out>.tmp-<random>`` by :class:`nora_edge.export.bundle_writer.BundleWriter`; an exception
(or a kill) anywhere leaves nothing at ``out`` that loads.
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nora_edge import bundle, names
from nora_edge.checkpoint import NoraCheckpoint
from nora_edge.errors import ExportError
from nora_edge.export.bundle_writer import BundleWriter

TARGETS = ("onnxruntime", "tensorrt")
DECODER_GRAPHS = (
    "portable",
    "fused",
)  # onnxruntime target: traced standard ops | builder-fused (decoder_fused.py)
TRT_MAX_INSTRUCTION_TOKENS = 128  # a robot instruction; the static KV cache is sized for it
TRT_CHECK_VERSIONS = ("10.3", "latest")  # JetPack 6's TensorRT and the newest documented
STAGES = ("load", "reference", "embeddings", "vision", "decoder", "recipes", "codec", "validate", "manifest")
FIDELITY_REPORT = "fidelity_report.json"


@contextlib.contextmanager
def stage_progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(stage)``: a rich progress bar over STAGES (or a no-op)."""
    if not enabled:
        yield lambda stage: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("export: {task.description:<11}"), BarColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(STAGES[0], total=len(STAGES))

        def advance(stage: str) -> None:
            bar.update(task, description=stage, completed=STAGES.index(stage))

        yield advance
        bar.update(task, description="done", completed=len(STAGES))


def check_options(
    precision: str, image_size: int, head: str, embeddings_dtype: str, validation_prompts: int = 3
) -> None:
    """Raise ExportError on an option this exporter cannot honour (before any heavy work)."""
    if precision != "fp32":
        from nora_edge.errors import InputError
        from nora_edge.export.quantize import get_recipe

        try:
            get_recipe(precision)  # fail before any heavy work on an unknown recipe name
        except InputError as e:
            raise ExportError(str(e)) from e
    if not isinstance(image_size, int) or image_size < 56 or image_size % 28:
        raise ExportError(
            f"image_size must be a multiple of 28 (patch 14 x merge 2) >= 56, got {image_size!r}"
        )
    if head not in ("action", "full"):
        raise ExportError(f"head must be 'action' or 'full', got {head!r}")
    if embeddings_dtype not in ("float16", "float32"):
        raise ExportError(f"embeddings_dtype must be 'float16' or 'float32', got {embeddings_dtype!r}")
    n = validation_prompts
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ExportError(f"validation_prompts must be a positive int, got {n!r}")


def load_model(ckpt: NoraCheckpoint):
    """fp32 HF model (eval) with the checkpoint's generation_config, greedy, and its processor."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from nora_edge.export.processor import load_processor

    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt.path), dtype=torch.float32)
    except Exception as e:  # transformers raises OSError/ValueError/RuntimeError for broken checkpoints
        raise ExportError(f"{ckpt.path}: transformers cannot load the model ({e})") from e
    model.eval()
    model.generation_config = GenerationConfig.from_pretrained(str(ckpt.path))
    model.generation_config.do_sample = False
    return model, load_processor(ckpt.path)


def apply_recipes(staging: Path, components: dict[str, bundle.ComponentSpec], precision: str) -> dict:
    """Quantization hook between export and bundle write: rewrite graphs in ``staging`` for ``precision``.

    fp32 returns the components unchanged. A recipe must replace the files in place (or add new ones and
    delete the old), return updated ComponentSpecs (file, data_files, precision) and leave validation to the
    caller.
    """
    if precision == "fp32":
        return components
    raise ExportError(f"precision {precision!r}: int8/int4 land with the quantization issue")


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    *,
    fast_dir: str | Path | None = None,
    time_horizon: int | None = None,
    precision: str = "fp32",
    image_size: int = 224,
    specialise_224: bool = True,
    head: str = "action",
    embeddings_dtype: str = "float16",
    validate: bool = True,
    validation_prompts: int = 3,
    validation_instructions: Sequence[str] | None = None,
    report: bool = False,
    calibration: str | Path | None = None,
    accept_degraded: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    weights: str | Path | None = None,
    weights_format: str = "auto",
    allow_partial: Sequence[str] = (),
    _fail_after: str | None = None,
    _overlay: dict | None = None,
    stats: str | Path | None = None,
    stats_key: str = "action",
    norm_mode: str = "min_max",
    gripper: Sequence[str] = (),
    mask: Sequence[bool] | None = None,
    target: str = "onnxruntime",
    decoder_graph: str = "portable",
    multi_token: bool = False,
) -> Path:
    """Export a NORA checkpoint to a bundle directory.

    Args:
        checkpoint: NORA checkpoint directory (HF format).
        out: bundle directory to create.
        fast_dir: FAST tokenizer directory (default ``checkpoint/fast``).
        time_horizon: T when the FAST config leaves it null (1 NORA, 5 NORA-Long).
        precision: "fp32", or a quantization recipe name (``nora-edge recipes``): the fp32 bundle is exported
            and validated in a temporary directory, then quantized into ``out`` with its fidelity report.
        image_size: square frame size NORA resizes to (224); a multiple of 28.
        specialise_224: fold the vision index tensors for the ``image_size`` grid into the graph
            (input pixel_values only); False exports a resolution-dynamic vision graph.
        head: "action" (logits rows = action ids + end ids) or "full" (every Qwen id).
        embeddings_dtype: "float16" (default) or "float32" for embeddings.npy.
        validate: check the ONNX graphs against PyTorch and the shipped runtime (``NoraPolicy`` on the staged
            bundle) against NORA's reference (``ReferencePolicy``, generating exactly as NORA does with the
            checkpoint's generation_config); refuse (ExportError) on a failed check (validate.py).
        validation_prompts: held-out (frame, instruction) pairs the checks run on.
        validation_instructions: instructions the held-out pairs draw from (default validate.INSTRUCTIONS;
            pass your task's instructions so the reference's chunks are well formed and their ids compared).
        report: also write ``fidelity_report.json`` (the validation results) into an fp32 bundle
            (quantized bundles always carry their fidelity report).
        calibration: folder of images + instructions.jsonl (or a sequence of CalibrationSample): the frames
            calibrated recipes record (default: synthetic frames) and, with ``multi_token``, the frames the
            bundle's ``drafts.json`` is built from (the model's own chunks on them: draft_file.py; without
            calibration there is no draft file and proposals come only from chunks the runtime has run).
        accept_degraded: quantized recipes only: write the bundle even when it misses the recipe's fidelity
            thresholds vs the fp32 bundle (``quantize_bundle``; recorded in its manifest).
        overwrite: replace an existing bundle at ``out``.
        progress: show a rich progress bar.
        weights: fine-tuned weights to overlay onto ``checkpoint`` (then the base directory): a safetensors
            file, an index, or the directory accelerate's ``save_state`` wrote (weights_overlay.py); every key
            must match a base parameter. The overlaid checkpoint lives in a temporary sibling of ``out``
            (removed whatever happens); its record goes into the manifest's ``source_checkpoint.overlay``.
        weights_format: "auto", "safetensors" or "accelerate".
        allow_partial: base parameter names or prefixes the weights may omit (they keep the base's values).
        _fail_after: testing hook: raise ExportError right after this stage (simulates a crash).
        stats: a LeRobot dataset root or ``meta/stats.json``-shaped file: the manifest's ``postprocess`` chain
            unnormalizes with its ``stats_key`` feature in ``norm_mode`` ("min_max" as NORA's LeRobot fine-tuning,
            or "mean_std"); None keeps NORA's q01/q99 by the caller's unnorm key.
        gripper: gripper steps appended to the chain in order, ``"OP[:DIM]"`` (rescale, binarize, invert).
        mask: (D,) per-dimension unnormalize mask: False leaves that dimension as the model produced it.
        target: "onnxruntime" (default) or "tensorrt" (precisions fp32, fp16, int8-qdq, int4-qdq, others refused
            by quantize.trt_quant; only standard ONNX ops, a static KV cache of ``max_len`` slots written at ``cache_position``
            (decoder_static.py), both graphs checked against TensorRT's operator tables (trt_support.py), the
            instruction limited to :data:`TRT_MAX_INSTRUCTION_TOKENS` tokens).
        decoder_graph: onnxruntime target: "portable" (the traced graph, standard ops, KV grown by concatenation)
            or "fused" (onnxruntime-genai's builder graph adapted to the bundle: GroupQueryAttention over fixed
            KV buffers updated in place, MRotaryEmbedding, fused RMSNorm; decoder_fused.py).
        multi_token: the decoder (portable, fused or static) also outputs ``logits_all`` (the head at every new
            position) for lossless multi-token decoding (``NoraPolicy.load(..., decoding="multi-token")``); validated against HF at every
            prompt position, and the multi-token loop against the plain loop's ids.

    Returns:
        ``out`` as a Path (a bundle that ``nora_edge.bundle.Bundle.load`` accepts).
    """
    args = dict(locals())  # every parameter, for the call on the overlaid checkpoint below
    check_options(precision, image_size, head, embeddings_dtype, validation_prompts)
    from nora_edge.export.draft_file import calibration_samples, write_draft_file

    # read only where used (recipes, the draft file); InputError on a bad folder before any stage runs
    samples = calibration_samples(calibration) if multi_token or precision != "fp32" else None
    if target not in TARGETS:
        raise ExportError(f"target must be one of {TARGETS}, got {target!r}")
    if decoder_graph not in DECODER_GRAPHS:
        raise ExportError(f"decoder_graph must be one of {DECODER_GRAPHS}, got {decoder_graph!r}")
    if decoder_graph == "fused" and target != "onnxruntime":
        raise ExportError(
            f"decoder_graph 'fused' uses onnxruntime's contrib ops (com.microsoft): target 'onnxruntime' only, "
            f"got target {target!r}"
        )
    if target == "tensorrt" and not specialise_224:
        raise ExportError(
            "target 'tensorrt' needs the specialised vision graph (static input shape): specialise_224=True"
        )
    if target == "tensorrt" and precision != "fp32":
        from nora_edge.export.quantize import check_tensorrt_recipe

        check_tensorrt_recipe(precision)  # ExportError naming the recipe and the TensorRT-ready ones
    if weights is not None:
        from nora_edge.export.weights_overlay import overlaid_checkpoint

        fast = fast_dir if fast_dir is not None else Path(checkpoint) / names.FAST_SUBDIR
        with overlaid_checkpoint(
            checkpoint, weights, out, fmt=weights_format, allow_partial=allow_partial
        ) as (overlaid, record):
            args.update(checkpoint=overlaid, fast_dir=fast, weights=None, _overlay=record)
            return export_bundle(**args)
    if precision != "fp32":
        return export_quantized(
            checkpoint,
            out,
            precision,
            calibration=samples,
            accept_degraded=accept_degraded,
            overwrite=overwrite,
            fp32_options=dict(
                calibration=samples if multi_token else None,
                fast_dir=fast_dir,
                time_horizon=time_horizon,
                image_size=image_size,
                specialise_224=specialise_224,
                head=head,
                embeddings_dtype=embeddings_dtype,
                validate=validate,
                validation_prompts=validation_prompts,
                validation_instructions=validation_instructions,
                progress=progress,
                _overlay=_overlay,
                stats=stats,
                stats_key=stats_key,
                norm_mode=norm_mode,
                gripper=tuple(gripper),
                mask=mask,
                decoder_graph=decoder_graph,
                target=target,
                multi_token=multi_token,
            ),
        )
    ckpt = NoraCheckpoint.load(checkpoint, fast_dir, time_horizon=time_horizon)
    from nora_edge.export.manifest_sections import postprocess_section, write_native_codec

    # the action chain: stats/gripper errors (ExportError) surface before any stage runs
    chain = postprocess_section(ckpt, stats, stats_key, norm_mode, gripper, mask)
    t0 = time.time()
    with stage_progress(progress) as advance, BundleWriter(out, overwrite=overwrite) as writer:
        staging = writer.path
        seconds: dict[str, float] = {}
        last = [time.time()]

        def done(stage: str) -> None:
            seconds[stage] = round(time.time() - last[0], 2)
            last[0] = time.time()
            if _fail_after == stage:
                raise ExportError(f"simulated failure after stage '{stage}'")
            if stage != STAGES[-1]:
                advance(STAGES[STAGES.index(stage) + 1])

        opts = ExportOptions(
            image_size,
            specialise_224,
            head,
            embeddings_dtype,
            validate,
            validation_prompts,
            tuple(validation_instructions) if validation_instructions is not None else None,
            target,
            decoder_graph,
            multi_token,
        )
        sections = export_graphs(ckpt, staging, opts, done)
        if _overlay is not None:  # the base directory is the source; the overlaid copy was temporary
            sections["source_checkpoint"].update(path=_overlay["base_dir"], overlay=_overlay)
        sections["postprocess"] = chain  # after validation, which compares NORA's q01/q99 actions
        # the C library's tables (kernels/): byte table, automaton, head rows, the chain compiled per unnorm key
        sections["codec"]["files"]["native"] = write_native_codec(staging, sections)
        if multi_token and samples:  # the model's own chunks on the calibration frames: first proposals
            sections[bundle.DRAFTS_SECTION] = write_draft_file(writer, sections, samples)
        if report:
            writer.write_json(FIDELITY_REPORT, {"precision": precision, "validation": sections["validation"]})
        sections["export"] = {
            "seconds": round(time.time() - t0, 1),
            "stage_seconds": seconds,
            "process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "precision": precision,
            "specialised_vision": specialise_224,
            "head": head,
            "target": target,
            "decoder_graph": decoder_graph,
            "multi_token": multi_token,
        }
        path = writer.commit(sections)
        done("manifest")
    return path


@dataclass(frozen=True)
class ExportOptions:
    """The graph-shaping options of :func:`export_bundle` (see its docstring)."""

    image_size: int
    specialise: bool
    head: str
    embeddings_dtype: str
    validate: bool
    validation_prompts: int
    validation_instructions: tuple[str, ...] | None
    target: str = "onnxruntime"
    decoder_graph: str = "portable"
    multi_token: bool = False


def export_graphs(
    ckpt: NoraCheckpoint, staging: Path, opts: ExportOptions, done: Callable[[str], None]
) -> dict:
    """Every stage up to (not including) the manifest; returns the manifest sections."""
    image_size, specialise, head, emb_dtype = (
        opts.image_size,
        opts.specialise,
        opts.head,
        opts.embeddings_dtype,
    )
    validate = opts.validate
    from nora_edge.export import manifest_sections as ms
    from nora_edge.export.decoder import export_decoder, head_rows_for
    from nora_edge.export.embeddings import export_embeddings
    from nora_edge.export.validate import validate_export, vision_cases
    from nora_edge.export.vision import export_vision

    model, processor = load_model(ckpt)
    vocab = int(model.config.text_config.vocab_size)
    meta = {
        "action_base": ckpt.action_base,
        "num_action_tokens": ckpt.num_action_tokens,
        "end_ids": ms.end_ids(ckpt),
    }
    rows = head_rows_for(meta, head, vocab)
    sections = {
        "source_checkpoint": ms.source_checkpoint(ckpt),
        "prompt": ms.prompt_section(processor, ckpt, image_size),
        "image": ms.image_section(ckpt, image_size),
        "actions": ms.actions_section(ckpt, head, rows),
        "generation": ms.generation_section(ckpt),
        "codec": ms.codec_section(ckpt),
        "norm_stats": ms.norm_stats_section(ckpt),
    }
    done("load")
    patch = int(ckpt.vision_config["patch_size"])
    grid = (1, image_size // patch, image_size // patch)  # the frame's (t, h, w) in patches
    vrefs = prefs = None
    if validate:
        grids = [grid] if specialise else [grid, (1, 12, 20), (1, 18, 22)]
        vrefs = vision_cases(model, grids)
        prefs = policy_references(ckpt, model, processor, rows, opts)
    done("reference")
    emb = export_embeddings(model, staging / bundle.EMBEDDINGS, dtype=emb_dtype)
    # a view, not a copy: it keeps only the (fp32) embedding storage alive once the model is deleted
    table = model.get_input_embeddings().weight.detach().numpy() if validate else None
    done("embeddings")
    vspec = export_vision(
        model, staging / bundle.VISION_ONNX, specialise_grid=grid if specialise else None, free_source=True
    )
    model.model.visual = None
    gc.collect()
    done("vision")
    if opts.target == "tensorrt":
        dspec = export_static_decoder(model, staging, sections, rows, ckpt, grid, head, opts.multi_token)
    elif opts.decoder_graph == "fused":
        from nora_edge.export.decoder_fused import export_decoder_fused

        text = model.config.text_config
        dims = {
            "num_layers": text.num_hidden_layers,
            "num_kv_heads": text.num_key_value_heads,
            "head_dim": text.hidden_size // text.num_attention_heads,
            "hidden_size": text.hidden_size,
        }
        model = None  # freed before the builder (a subprocess) loads its own copy of the checkpoint
        gc.collect()
        dspec = export_decoder_fused(
            ckpt.path, staging / bundle.DECODER_ONNX, rows, dims, head=head, logits_all=opts.multi_token
        )
    else:
        dspec = export_decoder(
            model,
            staging / bundle.DECODER_ONNX,
            rows,
            head=head,
            free_source=True,
            logits_all=opts.multi_token,
        )
    del model
    gc.collect()
    done("decoder")
    comps = apply_recipes(staging, {"vision": vspec, "decoder": dspec}, "fp32")
    done("recipes")
    sections["codec"]["bpe_vocab_size"] = ms.write_codec_files(ckpt, staging)
    sections["components"] = {
        "vision": comps["vision"].to_json(),
        "decoder": comps["decoder"].to_json(),
        "embeddings": {"file": emb["file"], "dtype": emb["dtype"], "shape": emb["shape"]},
    }
    done("codec")
    validation: dict = {"embeddings": {**emb["conversion"], "dtype": emb_dtype}}
    if validate:
        validation.update(
            validate_export(staging, sections, comps, vision_refs=vrefs, cases=prefs, table=table)
        )
    else:
        validation["skipped"] = True
    sections["validation"] = validation
    done("validate")
    json.dumps(sections)  # fail here, not half-way through the manifest write, on a non-JSON value
    return sections


def policy_references(ckpt: NoraCheckpoint, model, processor, rows: list[int], opts: ExportOptions) -> list:
    """NORA's reference results (+ HF tensors for the graph checks) on the held-out pairs (validate.py).

    The ReferencePolicy wraps the loaded fp32 model (the checkpoint's generation_config, as ``load_model``
    sets it) and is dropped on return, so the model can be freed once its graphs are exported.
    """
    from nora_edge.actions.fast import FastTokenizer
    from nora_edge.export.reference import ReferencePolicy
    from nora_edge.export.validate import INSTRUCTIONS, held_out_pairs, reference_cases

    reference = ReferencePolicy(ckpt, model, processor, FastTokenizer.from_pretrained(ckpt.fast.path))
    pairs = held_out_pairs(opts.validation_prompts, opts.validation_instructions or INSTRUCTIONS)
    return reference_cases(
        reference, rows, pairs, table_dtype=opts.embeddings_dtype, every_position=opts.multi_token
    )


def export_quantized(
    checkpoint: str | Path,
    out: str | Path,
    precision: str,
    *,
    calibration,
    accept_degraded: bool,
    overwrite: bool,
    fp32_options: dict,
) -> Path:
    """fp32 export (validated) into a temporary sibling of ``out``, then the recipe into ``out``.

    The quantizer needs a runnable fp32 bundle to record calibration feeds and to measure fidelity, so the
    fp32 bundle is a real (temporary) bundle; it is removed whatever happens. With ``fp32_options["target"]``
    "tensorrt" it has the static-KV decoder and the ``tensorrt`` manifest section, which ``quantize_bundle``
    keeps after checking the quantized graphs against the same TensorRT tables.
    """
    import shutil
    import tempfile

    from nora_edge.export.draft_file import calibration_samples
    from nora_edge.export.quantize import quantize_bundle

    samples = calibration_samples(calibration)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.fp32-", dir=out.parent))
    try:
        fp32 = export_bundle(checkpoint, tmp_root / "fp32", precision="fp32", **fp32_options)
        return quantize_bundle(
            fp32, out, precision, calibration=samples, overwrite=overwrite, accept_degraded=accept_degraded
        )
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def export_static_decoder(
    model, staging: Path, sections: dict, rows: list[int], ckpt, grid, head: str, logits_all: bool = False
):
    """The TensorRT-flavor decoder (static KV) sized for this bundle's longest prompt; also checks the staged
    vision graph against TensorRT's tables. Sets ``prompt.max_instruction_tokens`` (the runtime's limit)."""
    from nora_edge.export.decoder_static import export_decoder_static, static_max_len
    from nora_edge.export.trt_support import assert_tensorrt_compatible

    merge = int(ckpt.vision_config["spatial_merge_size"])
    image_tokens = grid[0] * grid[1] * grid[2] // (merge * merge)
    prompt = sections["prompt"]
    prompt["max_instruction_tokens"] = TRT_MAX_INSTRUCTION_TOKENS
    longest = (
        len(prompt["prefix_ids"]) + image_tokens + 1 + TRT_MAX_INSTRUCTION_TOKENS + len(prompt["suffix_ids"])
    )
    max_len = static_max_len(longest, ckpt.time_horizon, ckpt.action_dim)
    for version in TRT_CHECK_VERSIONS:
        assert_tensorrt_compatible(staging / bundle.VISION_ONNX, version)
    spec = export_decoder_static(
        model, staging / bundle.DECODER_ONNX, rows, max_len, head=head, free_source=True,
        check_versions=TRT_CHECK_VERSIONS, logits_all=logits_all,
    )  # fmt: skip
    from nora_edge.export.trt_engine import tensorrt_section

    sections["tensorrt"] = tensorrt_section(
        int(spec.meta["hidden_size"]), longest, max_len, TRT_CHECK_VERSIONS
    )
    return spec
