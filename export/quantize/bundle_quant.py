"""fp32 bundle -> quantized bundle, with calibration from the fp32 graphs and a gated fidelity report.

Data flow: fp32 bundle --:func:`record_feeds` (calibration samples through NoraPolicy, CPU)--> feeds per graph
--:func:`apply_recipe` per graph (vision, decoder with its head)--> quantized graphs; embeddings table ->
recipe dtype; every other bundle file copied -> hidden temp bundle (manifest: per-component precision and a
``quantization`` section with each :class:`QuantResult`; its ``validation`` is never the fp32 export's)
--:func:`fidelity_report` vs the fp32 bundle on held-out samples--> :func:`check_fidelity` against the
recipe's :class:`FidelityThresholds` --> a failed metric raises :class:`FidelityGateError` (nothing at
``out``) unless ``accept_degraded`` --> final bundle = temp files moved + ``fidelity_report.json`` / ``.md``,
manifest (``validation``: the quantized bundle's own numbers, thresholds, pass/fail, the fp32 source's name
and manifest sha256) last, atomic rename to ``out``. The fp32 bundle is never modified.

A ``--target tensorrt`` source (manifest ``tensorrt`` section, static-KV decoder) takes only recipes whose graphs
are standard ONNX (``check_tensorrt_recipe``: fp16, int8-qdq, int4-qdq); its quantized graphs are checked against
the TensorRT operator tables the source passed, before the fidelity runs (``trt_quant``), and the section is kept
with the versions they passed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nora_edge import bundle as B
from nora_edge.bundle import Bundle, ComponentSpec
from nora_edge.errors import ExportError, InputError
from nora_edge.export.bundle_writer import BundleWriter, check_target

from .apply import apply_recipe
from .calibration import CalibrationSample, record_feeds, synthetic_samples
from .embeddings import quantize_embedding_table
from .recipes import BundleRecipe
from .registry import get_recipe
from .thresholds import VALIDATION_KIND, FidelityGateError, check_fidelity, gate_message, validation_section
from .trt_quant import check_quantized_graphs, check_tensorrt_recipe
from .trt_quant import tensorrt_section as trt_section

_EMB_DTYPE = {"fp32": "float32", "fp16": "float16"}
_MANAGED = ("schema_version", "nora_edge_version", "files")


def _component_files(manifest: dict) -> set[str]:
    out = set()
    for comp in manifest["components"].values():
        out.add(comp["file"])
        out.update(comp.get("data_files", []))
    return out


def check_source(src: Bundle, recipe: BundleRecipe) -> None:
    """The source must be an fp32 bundle and the recipe's embedding storage loadable by the runtime.

    Raises:
        ExportError: naming the component or option at fault.
    """
    for name in ("vision", "decoder"):
        p = src.components[name].precision
        if p != "fp32":
            raise ExportError(
                f"{src.path}: components.{name}.precision is {p!r}; quantize from an fp32 bundle"
            )
    if recipe.embeddings.dtype not in _EMB_DTYPE:
        raise ExportError(
            f"recipe '{recipe.name}': embeddings dtype {recipe.embeddings.dtype!r} needs per-row scale support in "
            "the runtime's embedding lookup (nora_edge.generate.Decoder), which it does not have yet"
        )


def source_identity(src: Bundle) -> dict:
    """The fp32 bundle a quantized one was made from: directory name and manifest sha256 (provenance)."""
    return {
        "bundle": src.path.name,
        "manifest_sha256": B.sha256_file(src.path / B.MANIFEST),
        "precision": "fp32",
    }


def quantize_bundle(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    recipe: str | BundleRecipe,
    *,
    calibration: Sequence[CalibrationSample] | None = None,
    held_out: Sequence[CalibrationSample] | None = None,
    n_calibration: int = 8,
    n_fidelity: int = 8,
    seed: int = 0,
    unnorm_key: str | None = None,
    overwrite: bool = False,
    accept_degraded: bool = False,
) -> Path:
    """Write a quantized copy of an fp32 bundle, gated by the recipe's fidelity thresholds.

    Args:
        src: fp32 bundle directory.
        out: bundle directory to create.
        recipe: registry name or :class:`BundleRecipe` (its ``fidelity`` holds the thresholds).
        calibration: calibration samples (default: ``n_calibration`` synthetic frames, seed ``seed``).
        held_out: fidelity samples (default: ``n_fidelity`` synthetic frames, seed ``seed + 1``; 0 measures
            nothing, which needs ``accept_degraded``).
        unnorm_key: norm-stats key for the runs (default: the first key).
        overwrite: replace an existing bundle at ``out`` (a failed gate leaves the existing one untouched).
        accept_degraded: write the bundle even when a metric misses its threshold (or nothing was measured);
            its manifest ``validation`` then says ``accepted_despite_failure`` and lists the failed metrics.

    Returns:
        ``out`` (loads with ``NoraPolicy.load``).

    Raises:
        FidelityGateError: (an ExportError) a metric missed its threshold; names metric and component; nothing
            is written at ``out``.
        ExportError: non-fp32 source, unsupported option, a failed recipe or parity check.
        InputError: no held-out samples without ``accept_degraded``.
    """
    src_b = Bundle.load(src)
    r = get_recipe(recipe)
    check_source(src_b, r)
    trt = src_b.manifest.get("tensorrt")
    if trt is not None:  # a --target tensorrt source: only recipes writing standard ONNX ops
        check_tensorrt_recipe(r)
    out = Path(out)
    check_target(out, overwrite=overwrite)
    samples = list(calibration) if calibration is not None else synthetic_samples(n_calibration, seed)
    if held_out is not None:
        held = list(held_out)
    else:
        held = synthetic_samples(n_fidelity, seed + 1) if n_fidelity else []
    if not held and not accept_degraded:
        raise InputError(
            f"quantize {out}: no held-out samples, so the quantized bundle's fidelity cannot be measured; give "
            "held-out samples (n_fidelity >= 1) or pass accept_degraded=True to write it unvalidated"
        )
    source = source_identity(src_b)
    if unnorm_key is not None or not src_b.postprocess.takes_unnorm_key:
        key = unnorm_key  # fixed statistics in the chain take no key
    else:
        key = sorted(src_b.norm_stats)[0]
    feeds = record_feeds(src_b.path, samples, unnorm_key=key)
    tmp = out.parent / f".{out.name}.quant-{secrets.token_hex(4)}"
    try:
        sections = _write_quantized(src_b, tmp, r, feeds, len(samples), source)
        if trt is not None:  # before the (slow) fidelity runs: every graph inside TensorRT's tables
            sections["tensorrt"] = _check_tensorrt(tmp, sections, r, trt)
        report = None
        if held:
            from nora_edge.export.fidelity import REPORT_JSON, fidelity_report

            report = fidelity_report(
                src_b.path,
                tmp,
                held,
                unnorm_key=key,
                labels=(f"{src_b.path.name} (fp32)", f"{out.name} ({r.name})"),
            )
            checks = check_fidelity(r.fidelity, report["aggregates"])
            multi = _multi_token_check(tmp, held, key)
            validation = validation_section(
                checks, report["aggregates"], recipe=r.name, source=source, accepted=accept_degraded,
                report=REPORT_JSON,
            )  # fmt: skip
            if multi is not None:  # this bundle's own multi-token loop vs its own plain loop
                validation["multi_token"] = report["multi_token"] = multi
            report["validation"] = validation
            failures = [c for c in checks if c.passed is False]
            if multi is not None and not multi["passed"]:
                raise ExportError(
                    f"quantize {out}: multi-token decoding gave other ids than the plain loop on "
                    f"{multi['compared'] - multi['ids_equal']} of {multi['compared']} held-out chunks: {multi}"
                )
            if failures:
                message = gate_message(str(out), r.name, src_b.path.name, len(held), failures)
                if not accept_degraded:
                    raise FidelityGateError(message, failures=failures, validation=validation, report=report)
                warnings.warn(f"accepted despite failure: {message}", UserWarning, stacklevel=2)
        else:
            validation = validation_section(
                None, None, recipe=r.name, source=source, accepted=True, report=None
            )
            warnings.warn(f"{out}: written without fidelity validation (accepted)", UserWarning, stacklevel=2)
        return _finalize(tmp, out, {**sections, "validation": validation}, report, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_quantized(
    src: Bundle, tmp: Path, r: BundleRecipe, feeds: dict, n_samples: int, source: dict
) -> dict:
    """Quantize graphs + embeddings into a committed bundle at ``tmp``; return its manifest sections."""
    manifest = src.manifest
    with BundleWriter(tmp) as w:
        comps = dict(manifest["components"])
        results = {}
        for name in ("vision", "decoder"):
            spec = src.components[name]
            res = apply_recipe(name, src.file(spec.file), w.path / spec.file, r, feeds[name])
            results[name] = {k: v for k, v in res.to_json().items() if k != "output_path"}
            comps[name] = ComponentSpec(
                file=spec.file, data_files=res.data_files, precision=res.precision,
                inputs=spec.inputs, outputs=spec.outputs, meta=spec.meta,
            ).to_json()  # fmt: skip
        emb = src.embeddings
        table = np.load(src.file(emb["file"]), allow_pickle=False).astype(np.float32)  # (V, H)
        stored = quantize_embedding_table(table, r.embeddings)
        np.save(w.path / emb["file"], stored.table, allow_pickle=False)
        comps["embeddings"] = {**emb, "dtype": _EMB_DTYPE[stored.dtype], "shape": list(stored.table.shape)}
        skip = _component_files(manifest) | {emb["file"], "fidelity_report.json", "fidelity_report.md"}
        for rel in manifest["files"]:
            if rel not in skip:
                w.copy_file(rel, src.path / rel)
        sections = {k: v for k, v in manifest.items() if k not in _MANAGED}
        sections["components"] = comps
        # the fp32 export's validation describes the fp32 graphs, not these: never carried over
        sections["validation"] = {"kind": VALIDATION_KIND, "status": "pending", "passed": False}
        sections["quantization"] = {
            "recipe": r.describe(),
            "source_bundle": src.path.name,
            "source_manifest_sha256": source["manifest_sha256"],
            "calibration": {"samples": n_samples, **{k: len(v) for k, v in feeds.items()}},
            "components": results,
            "embeddings": {"dtype": stored.dtype, "bytes": stored.nbytes},
        }
        sections["export"] = {**manifest.get("export", {}), "precision": r.name}
        w.commit(sections)
    return sections


def _multi_token_check(tmp: Path, held: Sequence[CalibrationSample], key: str | None) -> dict | None:
    """For a ``--multi-token`` decoder: its multi-token ids vs its plain ids on the held-out samples, else None."""
    b = Bundle.load(tmp)
    if not b.components["decoder"].meta.get("logits_all"):
        return None
    from nora_edge.export.validate_policy import compare_multi_token

    return compare_multi_token(b, [(s.image, s.instruction, key) for s in held])


def _check_tensorrt(tmp: Path, sections: dict, r: BundleRecipe, trt: dict) -> dict:
    """Every quantized graph against the TensorRT versions the fp32 source passed; the new ``tensorrt`` section.

    Raises:
        ExportError: a graph holds an op or dtype a checked version's table refuses (node named).
    """
    comps = sections["components"]
    paths = {name: tmp / comps[name]["file"] for name in ("vision", "decoder")}
    checks = check_quantized_graphs(paths, trt.get("checked_versions", []))
    return trt_section(trt, r.name, checks)


def _finalize(tmp: Path, out: Path, sections: dict, report: dict | None, overwrite: bool) -> Path:
    """Move the temp bundle's files into a new bundle at ``out`` with the fidelity report; commit."""
    from nora_edge.export.fidelity import REPORT_JSON, REPORT_MD, render_markdown

    with BundleWriter(out, overwrite=overwrite) as w:
        for rel in B.list_files(tmp):
            dst = w.path / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, dst)
        if report is not None:
            w.write_json(REPORT_JSON, report)
            w.write_bytes(REPORT_MD, render_markdown(report).encode("utf-8"))
            sections = {
                **sections,
                "quantization": {**sections["quantization"], "fidelity": report["aggregates"]},
            }
        return w.commit(sections)
