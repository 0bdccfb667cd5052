"""The bundle: the only contract between the export stage and the runtime (numpy + json only).

Data flow (write, export side): files written into a staging dir ``<out>.tmp-<random>`` ->
:meth:`nora_edge.export.bundle_writer.BundleWriter.commit` (the export stage) hashes every file (sha256 +
size) -> ``manifest.json`` written LAST and fsynced -> staging dir renamed to ``<out>``. A crash at any point leaves no directory at ``<out>`` that loads.

Data flow (read, runtime side): ``<out>/manifest.json`` -> schema/version check -> sha256 + size of every
listed file, no unlisted files -> :class:`Bundle` with typed sections (prompt, image, actions, generation,
codec, components) and :meth:`Bundle.info` for ``nora-edge info``.

Layout (names are the constants below)::

    manifest.json          schema below, written last
    vision.onnx            pixel_values (+ host index tensors unless specialised) -> image_embeds
    decoder.onnx (+.data)  inputs_embeds, position_ids, attention_mask, past KV -> logits (last pos), present KV
                           (+ logits_all, every new position, when exported with --multi-token; meta logits_all)
    embeddings.npy         (vocab, hidden) token embedding table (fp16 by default)
    tokenizer.json         the checkpoint's Qwen tokenizer (instruction -> ids)
    codec/                 FAST processor_config.json, tokenizer.json, byte_table.npz
    drafts.json            (--multi-token with calibration data) the model's own generated ids on calibration
                           frames, per instruction: the multi-token loop's first proposals (nora_edge.drafts)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from nora_edge.actions.normalize import NormStats
from nora_edge.actions.postprocess import Chain, default_chain
from nora_edge.atomic import read_json_object
from nora_edge.bundle_specs import (
    MANIFEST,
    ActionSpec,
    CodecSpec,
    ComponentSpec,
    GenerationSpec,
    PromptSpec,
    TensorSpec,
    compress_ranges,
    expand_ranges,
    require_field,
)
from nora_edge.errors import BundleError

SCHEMA_VERSION = 1

# --- files inside a bundle ---------------------------------------------------------------------------
VISION_ONNX = "vision.onnx"
DECODER_ONNX = "decoder.onnx"
EMBEDDINGS = "embeddings.npy"
DRAFTS = "drafts.json"
DRAFTS_SECTION = "drafts"  # manifest: {"file": DRAFTS, "chunks", "instructions", "source", "seconds"}
TOKENIZER = "tokenizer.json"
CODEC_DIR = "codec"
CODEC_PROCESSOR_CONFIG = "codec/processor_config.json"
CODEC_TOKENIZER = "codec/tokenizer.json"
CODEC_BYTE_TABLE = "codec/byte_table.npz"

# --- tensor names ------------------------------------------------------------------------------------
PIXEL_VALUES = "pixel_values"  # (patches, C*Tp*P*P) float32
ROTARY_POS_IDS = "rotary_pos_ids"  # (patches, 2) int64, (h, w) per patch in HF (unpermuted) order
WINDOW_INDEX = "window_index"  # (patches,) int64, window order -> patch (merge-unit permutation, per patch)
REVERSE_WINDOW_INDEX = "reverse_window_index"  # (patches,) int64, argsort(window_index)
WINDOW_SEGMENT_IDS = "window_segment_ids"  # (patches,) int64, window of each permuted patch
FULL_SEGMENT_IDS = "full_segment_ids"  # (patches,) int64, frame of each permuted patch
IMAGE_EMBEDS = "image_embeds"  # (merged, out_hidden) float32
INPUTS_EMBEDS = "inputs_embeds"  # (batch, seq, hidden) float32
POSITION_IDS = "position_ids"  # (3, batch, seq) int64 (mrope t/h/w)
ATTENTION_MASK = "attention_mask"  # (batch, past + seq) int64, 1 = attend
LOGITS = "logits"  # (batch, rows) float32, last position only
LOGITS_ALL = "logits_all"  # (batch, seq, rows) float32, every new position (--multi-token decoders only)


def past_key(i: int) -> str:
    """Decoder input name of layer ``i``'s past keys, (batch, kv_heads, past, head_dim)."""
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    """Decoder input name of layer ``i``'s past values, (batch, kv_heads, past, head_dim)."""
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    """Decoder output name of layer ``i``'s keys incl. this step, (batch, kv_heads, past + seq, head_dim)."""
    return f"present.{i}.key"


def present_value(i: int) -> str:
    """Decoder output name of layer ``i``'s values incl. this step, (batch, kv_heads, past + seq, head_dim)."""
    return f"present.{i}.value"


REQUIRED_SECTIONS = (
    "schema_version",
    "nora_edge_version",
    "source_checkpoint",
    "files",
    "components",
    "prompt",
    "image",
    "actions",
    "generation",
    "codec",
    "norm_stats",
    "validation",
)


# --- hashing ------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_files(root: Path) -> list[str]:
    """Every regular file under ``root`` (posix paths relative to it), manifest excluded, sorted."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise BundleError(f"{p}: symlinks are not allowed in a bundle")
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return out


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- reading ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory.

    Attributes:
        path: bundle directory.
        manifest: the raw manifest dict (every section; see module docstring).
        components: "vision", "decoder" -> ComponentSpec ("embeddings" stays in ``manifest``).
        prompt, actions, generation, codec: typed sections.
        image: the ``image`` section (size, patch_size, temporal_patch_size, merge_size, image_mean,
            image_std, rescale_factor, do_rescale, do_normalize, resample, min_pixels, max_pixels).
        norm_stats: unnorm key -> NormStats.
        postprocess: the action post-processing chain (manifest section ``postprocess``; a manifest without it
            holds the default chain, q01_q99 by the caller's unnorm key), validated against ``codec.action_dim``.
    """

    path: Path
    manifest: dict
    components: dict[str, ComponentSpec]
    prompt: PromptSpec
    image: dict
    actions: ActionSpec
    generation: GenerationSpec
    codec: CodecSpec
    norm_stats: dict[str, NormStats]
    postprocess: Chain = default_chain()

    def file(self, rel: str) -> Path:
        """Absolute path of a manifest-listed file."""
        if rel not in self.manifest["files"]:
            raise BundleError(f"{self.path}: '{rel}' is not listed in {MANIFEST}")
        return self.path / rel

    @property
    def embeddings(self) -> dict:
        """The embeddings component: {file, dtype, shape}."""
        return self.manifest["components"]["embeddings"]

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
        """Read and check a bundle.

        Args:
            path: bundle directory.
            verify: True checks sha256 + size of every file; False checks presence and size only.

        Raises:
            BundleError: missing/unreadable manifest, wrong schema version, a missing, resized, tampered or
                unlisted file (the message names it), or a malformed section.
        """
        root = Path(path)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"bundle directory not found: {root}")
        if not mpath.is_file():
            raise BundleError(f"{mpath}: missing (incomplete export? the manifest is written last)")
        manifest = read_json_object(mpath, BundleError)
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{mpath}: schema_version {version!r}; this nora-edge reads {SCHEMA_VERSION}")
        for key in REQUIRED_SECTIONS:
            if key not in manifest:
                raise BundleError(f"{mpath}: missing section '{key}'")
        verify_files(root, manifest["files"], hash_files=verify)
        comps = manifest["components"]
        components = {
            name: ComponentSpec.from_json(
                require_field(comps, name, "components", dict), f"components.{name}"
            )
            for name in ("vision", "decoder")
        }
        require_field(comps, "embeddings", "components", dict)
        norm_stats = {
            k: NormStats.from_json(k, v, f"{mpath} norm_stats") for k, v in manifest["norm_stats"].items()
        }
        codec = CodecSpec.from_json(manifest["codec"])
        chain = default_chain()
        if "postprocess" in manifest:
            chain = Chain.from_json(manifest["postprocess"], BundleError, f"{mpath}: postprocess")
        chain.validate(codec.action_dim, norm_stats, BundleError, f"{mpath}: postprocess")
        return cls(
            path=root,
            manifest=manifest,
            components=components,
            prompt=PromptSpec.from_json(manifest["prompt"]),
            image=manifest["image"],
            actions=ActionSpec.from_json(manifest["actions"]),
            generation=GenerationSpec.from_json(manifest["generation"]),
            codec=codec,
            norm_stats=norm_stats,
            postprocess=chain,
        )

    def info(self) -> dict:
        """A summary for ``nora-edge info``: versions, source, components, sizes, validation."""
        m = self.manifest
        total = sum(int(f["size"]) for f in m["files"].values())
        comps = {}
        for name, spec in self.components.items():
            size = sum(int(m["files"][f]["size"]) for f in (spec.file, *spec.data_files))
            comps[name] = {
                "file": spec.file,
                "precision": spec.precision,
                "size_bytes": size,
                "inputs": {t.name: [t.dtype, list(t.shape)] for t in spec.inputs},
                "outputs": {t.name: [t.dtype, list(t.shape)] for t in spec.outputs},
                **{k: v for k, v in spec.meta.items() if k != "note"},
            }
        emb = self.embeddings
        comps["embeddings"] = {
            "file": emb["file"],
            "dtype": emb["dtype"],
            "shape": emb["shape"],
            "size_bytes": int(m["files"][emb["file"]]["size"]),
        }
        return {
            "path": str(self.path),
            "schema_version": m["schema_version"],
            "nora_edge_version": m["nora_edge_version"],
            "created_utc": m.get("created_utc"),
            "source_checkpoint": m["source_checkpoint"],
            "total_size_bytes": total,
            "components": comps,
            "actions": {
                "base": self.actions.base,
                "count": self.actions.count,
                "head": self.actions.head,
                "head_rows": int(self.actions.head_rows.size),
                "end_ids": list(self.actions.end_ids),
            },
            "codec": {
                "time_horizon": self.codec.time_horizon,
                "action_dim": self.codec.action_dim,
                "scale": self.codec.scale,
                "native": self.codec.native,
            },
            "unnorm_keys": sorted(self.norm_stats),
            "postprocess": self.postprocess.to_json(),
            "generation": m["generation"],
            "validation": m["validation"],
            **({DRAFTS_SECTION: m[DRAFTS_SECTION]} if m.get(DRAFTS_SECTION) else {}),
        }


def verify_files(root: Path, files: dict, *, hash_files: bool = True) -> None:
    """Check every listed file's size (and sha256) and that no unlisted file is present.

    Raises:
        BundleError: naming the first missing, resized, tampered or unlisted file.
    """
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{root / MANIFEST}: section 'files' is empty or not an object")
    for rel, entry in files.items():
        p = root / rel
        if not p.is_file():
            raise BundleError(f"{p}: listed in {MANIFEST} but missing")
        size = p.stat().st_size
        if size != entry.get("size"):
            raise BundleError(f"{p}: size {size} != {entry.get('size')} recorded in {MANIFEST} (tampered?)")
        if hash_files and sha256_file(p) != entry.get("sha256"):
            raise BundleError(f"{p}: sha256 does not match {MANIFEST} (tampered or corrupted)")
    extra = sorted(set(list_files(root)) - set(files))
    if extra:
        raise BundleError(f"{root / extra[0]}: not listed in {MANIFEST} ({len(extra)} unlisted file(s))")


def format_info(info: dict) -> str:
    """Human-readable text of :meth:`Bundle.info` for ``nora-edge info``."""
    lines = [
        f"bundle         {info['path']}",
        f"schema         v{info['schema_version']} (written by nora-edge {info['nora_edge_version']})",
        f"source         {info['source_checkpoint'].get('path')}",
        f"total size     {info['total_size_bytes'] / 2**20:.1f} MiB",
    ]
    for name, comp in info["components"].items():
        size = comp.get("size_bytes")
        size_txt = f"{size / 2**20:.1f} MiB" if size is not None else ""
        lines.append(f"{name:<14} {comp['file']}  {comp.get('precision', comp.get('dtype', ''))}  {size_txt}")
        for kind in ("inputs", "outputs"):
            for tname, (dtype, shape) in list(comp.get(kind, {}).items())[:4]:
                lines.append(f"{'':<16}{kind[:-1]:<7}{tname} {dtype} {shape}")
            extra = len(comp.get(kind, {})) - 4
            if extra > 0:
                lines.append(f"{'':<16}{kind[:-1]:<7}... {extra} more")
    act, codec = info["actions"], info["codec"]
    lines.append(
        f"actions        ids {act['base']}..{act['base'] + act['count'] - 1}, head '{act['head']}' "
        f"({act['head_rows']} rows), end ids {act['end_ids']}"
    )
    native = codec.get("native") or "none (exported before kernels/: the runtime builds them in memory)"
    lines.append(f"codec          T={codec['time_horizon']} D={codec['action_dim']} scale={codec['scale']}")
    lines.append(f"native tables  {native}")
    lines.append(f"unnorm keys    {', '.join(info['unnorm_keys'])}")
    if "postprocess" in info:
        steps = Chain.from_json(info["postprocess"], BundleError, "postprocess").describe()
        lines += [f"{'postprocess' if i == 0 else '':<15}{i + 1}. {t}" for i, t in enumerate(steps)]
    if info["components"]["decoder"].get("logits_all"):
        lines.append(f"multi-token    {multi_token_line(info['validation'].get('multi_token'))}")
        if info.get(DRAFTS_SECTION):
            d = info[DRAFTS_SECTION]
            lines.append(
                f"{'':<15}drafts: {d.get('file')}, {d.get('chunks')} chunks over {d.get('instructions')} "
                f"instruction(s) ({d.get('source')})"
            )
    if info["validation"].get("kind") == QUANTIZED_VALIDATION:
        return "\n".join(lines + format_quantized_validation(info["validation"]))
    for stage, res in info["validation"].items():
        if isinstance(res, dict) and "passed" in res:
            status = "passed" if res["passed"] else "FAILED"
            err = res.get("max_rel_err")
            err_txt = f" max rel err {err:.2e} (tol {res.get('tolerance')})" if err is not None else ""
            if "well_formed" in res:  # the shipped runtime vs NORA's reference (export/validate_policy.py)
                tc = res.get("token_classes", {})
                err_txt = (
                    f" ({res['pairs']} pairs, {res['well_formed']} well formed, {res.get('ids_equal')} ids equal,"
                    f" max action err {res.get('max_action_abs_err', 0.0):.2e} (tol {res.get('action_tolerance')}),"
                    f" repaired {tc.get('repaired', 0)}, forced {tc.get('forced_continue', 0)})"
                )
            lines.append(f"validation     {stage}: {status}{err_txt}")
    return "\n".join(lines)


def multi_token_line(mt: dict | None) -> str:
    """``nora-edge info``'s line for a ``--multi-token`` decoder: its own multi-token check, if validated."""
    if not mt:
        return "decoder has logits_all (decoding='multi-token'); not validated (exported with validation off)"
    gap = mt.get("batched_vs_sequential", {}).get("max_abs")
    how = "guaranteed by the tie margin" if mt.get("guaranteed") else "equal where measured, not guaranteed"
    return (
        f"ids equal to the plain loop on {mt.get('ids_equal')}/{mt.get('compared')} chunks, decoder calls "
        f"{mt.get('plain_decoder_calls')} -> {mt.get('decoder_calls')}; batched vs sequential logits max "
        f"{gap:.2g} ({how})"
    )


# validation.kind of a quantized bundle (written by nora_edge.export.quantize.thresholds)
QUANTIZED_VALIDATION = "quantized-fidelity"


def format_quantized_validation(v: dict) -> list[str]:
    """Lines of a quantized bundle's own validation: fidelity vs its fp32 source, metric by metric."""
    ref = v.get("reference") or {}
    sha = str(ref.get("manifest_sha256") or "?")[:12]
    lines = [
        f"validation     {v.get('status', '?').upper()}: fidelity vs fp32 bundle '{ref.get('bundle')}' "
        f"(manifest sha256 {sha}...), recipe '{v.get('recipe')}', {v.get('samples', 0)} held-out samples",
    ]
    for m in v.get("metrics", []):
        value = "not measured" if m["value"] is None else f"{m['value']:.6g}"
        if m["threshold"] is None:
            limit, verdict = "not gated", "-"
        else:
            limit, verdict = f"{m['op']} {m['threshold']:g}", "pass" if m["passed"] else "FAIL"
        lines.append(f"{'':<15}{m['component']:<11} {m['metric']:<30} {value:>12}  {limit:<10} {verdict}")
    for key, value in (v.get("reported") or {}).items():
        if value is not None:
            vals = value if isinstance(value, list) else [value]
            txt = ", ".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in vals)
            lines.append(f"{'':<15}{'measured':<11} {key:<30} {txt}")
    failed = v.get("failed_metrics") or []
    accepted = "yes" if v.get("accepted_despite_failure") else "no"
    failed_txt = f" (failed: {', '.join(failed)})" if failed else ""
    lines.append(f"{'':<15}accepted despite failure: {accepted}{failed_txt}")
    return lines


__all__ = [
    "MANIFEST",
    "ActionSpec",
    "Bundle",
    "CodecSpec",
    "GenerationSpec",
    "PromptSpec",
    "compress_ranges",
    "expand_ranges",
    "ComponentSpec",
    "TensorSpec",
    "format_info",
    "verify_files",
]
