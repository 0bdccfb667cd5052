"""TensorRT engines for a `--target tensorrt` bundle: the manifest's optimization profiles, the build plan, the
trtexec commands and the record of what was built.

Data flow: export (target tensorrt) --:func:`tensorrt_section`--> manifest ``tensorrt`` section: the TensorRT
versions whose operator tables the graphs passed (trt_support.py), the static KV length, and one optimization
profile (min / opt / max shape) per dynamic input: the decoder's sequence axis runs from 1 (a decode step, the shape
to optimize for) to the longest prompt (prefill); the vision graph and the KV buffers are static.

``nora-edge build-engine BUNDLE --profile DEVICE.toml`` --:func:`build_plan` (plain Python: manifest + device
name -> per component: ONNX path, plan path, checked profile, precision flags shared with the runtime's TensorRT
EP via :mod:`nora_edge.trt_profiles`, workspace bytes)--> either
  ``--print-trtexec``: :func:`trtexec_commands`, one ``trtexec`` command per graph from the same plan (TensorRT 10
  syntax: ``--memPoolSize=workspace:<MiB>`` replaced ``--workspace``; NVIDIA, "Migrating trtexec Usage from
  TensorRT 8.x to 10.x", docs.nvidia.com/deeplearning/tensorrt), or
  :func:`build_engines`: the tensorrt Python API (:mod:`nora_edge.export.trt_build`, the only code that imports
  tensorrt) builds ``<bundle>.engines/<device>/<component>.plan`` with ``timing.cache`` beside them, then
  :func:`engine_record` -> ``<bundle>.engines/<device>/engines.json`` (atomic write).

Why ``engines.json`` and not an ``engines`` section in the bundle's manifest: the engines record names the sha256
of the manifest it was built from (so a re-exported bundle's stale engines are detected), which a manifest cannot
hold about itself; the manifest's sha256 is the bundle's identity elsewhere (a quantized bundle records its fp32
source's, export/quantize/bundle_quant.py), and quantizing copies every unmanaged manifest section into the new
bundle, where an ``engines`` section would describe engines of other graphs; and engines live outside the hashed
bundle (``<bundle>.engines/``), built per device, so one read-only bundle can serve several devices.
"""

from __future__ import annotations

import importlib.util
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nora_edge import bundle as B
from nora_edge.atomic import read_json_object, write_json_atomic
from nora_edge.errors import BundleError, ExportError
from nora_edge.trt_profiles import PROFILE_KEYS, Profile, check_profile, format_shapes, trt_precision

DEFAULT_WORKSPACE_MIB = (
    1024  # a starting point on Jetson, whose GPU shares the system memory with everything else
)
ENGINE_SUFFIX = (
    ".engines"  # engines go beside the bundle (<bundle>.engines/<device>/): the bundle stays as hashed
)
TIMING_CACHE = "timing.cache"
ENGINES_JSON = "engines.json"
PLAN_SUFFIX = ".plan"
COMPONENTS = ("vision", "decoder")
RECORD_VERSION = 1


def tensorrt_section(hidden: int, longest_prompt: int, max_len: int, versions: tuple[str, ...]) -> dict:
    """The manifest ``tensorrt`` section of a static-KV bundle.

    Args:
        hidden: decoder hidden size H.
        longest_prompt: the longest prefill (tokens) the runtime may send.
        max_len: static KV slots.
        versions: TensorRT versions whose documented operator support both graphs passed.
    """
    from nora_edge.static_kv import CACHE_POSITION

    def seq(shape_of) -> dict:  # the sequence axis: 1 (decode, optimized) .. longest prompt (prefill)
        return {"min": shape_of(1), "opt": shape_of(1), "max": shape_of(longest_prompt)}

    return {
        "checked_versions": list(versions),
        "kv_cache": {"layout": "static", "max_len": max_len},
        "profiles": {
            "decoder": {
                B.INPUTS_EMBEDS: seq(lambda s: [1, s, hidden]),
                B.POSITION_IDS: seq(lambda s: [3, 1, s]),
                CACHE_POSITION: seq(lambda s: [s]),
            },
            "vision": {},  # specialised: every input is static
        },
    }


def engine_dir(b: B.Bundle, device: str) -> Path:
    """Where a device's engines go: ``<bundle>.engines/<device>/``, outside the hashed bundle."""
    return Path(b.path).parent / f"{Path(b.path).name}{ENGINE_SUFFIX}" / device


@dataclass(frozen=True)
class ComponentPlan:
    """How one graph is built.

    Attributes:
        name: "vision" or "decoder".
        onnx: the bundle's graph file (external data beside it).
        onnx_sha256: its sha256 as the manifest lists it.
        plan: the serialized engine to write.
        precision: the component's manifest precision.
        profile: input -> {"min", "opt", "max"} shapes for every dynamic input ({} = all static).
        strongly_typed / fp16 / int8: network flag or builder flags (:func:`nora_edge.trt_profiles.trt_precision`).
    """

    name: str
    onnx: Path
    onnx_sha256: str
    plan: Path
    precision: str
    profile: Profile
    strongly_typed: bool
    fp16: bool
    int8: bool

    def settings(self) -> dict:
        """The JSON the engines record keeps for this component (paths relative to the bundle / engine dir)."""
        return {
            "onnx": self.onnx.name,
            "onnx_sha256": self.onnx_sha256,
            "plan": self.plan.name,
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "fp16": self.fp16,
            "int8": self.int8,
            "profile": self.profile,
        }


@dataclass(frozen=True)
class BuildPlan:
    """Everything :mod:`nora_edge.export.trt_build` needs, decided without TensorRT.

    Attributes:
        bundle: the bundle directory.
        manifest_sha256: sha256 of its manifest.json (the record ties the engines to it).
        device: the device profile's name.
        out_dir: ``<bundle>.engines/<device>/``.
        timing_cache: ``out_dir / timing.cache``, loaded when present and saved after every engine.
        workspace_mib: the builder's workspace pool limit (MiB); ``workspace_bytes`` in bytes.
        components: vision, decoder.
    """

    bundle: Path
    manifest_sha256: str
    device: str
    out_dir: Path
    timing_cache: Path
    workspace_mib: int
    components: tuple[ComponentPlan, ...]

    @property
    def workspace_bytes(self) -> int:
        return self.workspace_mib << 20


def build_plan(b: B.Bundle, device: str, workspace_mib: int = DEFAULT_WORKSPACE_MIB) -> BuildPlan:
    """The build plan of a ``--target tensorrt`` bundle for one device (no TensorRT: the manifest and
    its sha256 only).

    Raises:
        ExportError: the bundle was not exported for TensorRT, a bad device name, or a non-positive workspace.
        BundleError: a malformed ``tensorrt`` section or a profile that misses a dynamic input (named).
    """
    section = b.manifest.get("tensorrt")
    if section is None:
        raise ExportError(
            f"{b.path}: no 'tensorrt' manifest section: export the checkpoint with `--target tensorrt` first"
        )
    if isinstance(workspace_mib, bool) or not isinstance(workspace_mib, int) or workspace_mib < 1:
        raise ExportError(f"workspace must be a positive number of MiB, got {workspace_mib}")
    if not device or Path(device).name != device:
        raise ExportError(f"device name {device!r} must be a plain folder name")
    profiles = section.get("profiles") if isinstance(section, dict) else None
    if not isinstance(profiles, dict):
        raise BundleError(f"{b.path / B.MANIFEST}: field 'tensorrt.profiles' is missing or not an object")
    out = engine_dir(b, device)
    comps = []
    for name in COMPONENTS:
        spec = b.components[name]
        where = f"{b.path / B.MANIFEST}: tensorrt.profiles.{name}"
        flags = trt_precision(spec.precision, spec.meta)
        comps.append(
            ComponentPlan(
                name=name,
                onnx=b.file(spec.file),
                onnx_sha256=str(b.manifest["files"][spec.file]["sha256"]),
                plan=out / f"{name}{PLAN_SUFFIX}",
                precision=spec.precision,
                profile=check_profile(profiles.get(name, {}), spec.inputs, where),
                strongly_typed=flags.strongly_typed,
                fp16=flags.fp16,
                int8=flags.int8,
            )
        )
    return BuildPlan(
        bundle=Path(b.path), manifest_sha256=B.sha256_file(Path(b.path) / B.MANIFEST), device=device,
        out_dir=out, timing_cache=out / TIMING_CACHE, workspace_mib=workspace_mib, components=tuple(comps),
    )  # fmt: skip


def trtexec_args(plan: BuildPlan, comp: ComponentPlan) -> list[str]:
    """The ``trtexec`` arguments building ``comp`` as :func:`build_engines` does (same shapes, flags, workspace,
    timing cache; trtexec flags per NVIDIA's "trtexec" page, docs.nvidia.com/deeplearning/tensorrt: ``--stronglyTyped``,
    ``--fp16``, ``--int8``, ``--minShapes/--optShapes/--maxShapes``)."""
    args = [
        "trtexec",
        f"--onnx={comp.onnx}",
        f"--saveEngine={comp.plan}",
        f"--timingCacheFile={plan.timing_cache}",
        f"--memPoolSize=workspace:{plan.workspace_mib}",
        "--buildOnly",
    ]
    if comp.strongly_typed:
        args.append("--stronglyTyped")
    args += [flag for flag, on in (("--fp16", comp.fp16), ("--int8", comp.int8)) if on]
    if comp.profile:
        args += [f"--{k}Shapes={format_shapes(comp.profile, k)}" for k in PROFILE_KEYS]
    return args


def trtexec_commands(b: B.Bundle, device: str, workspace_mib: int = DEFAULT_WORKSPACE_MIB) -> list[str]:
    """One ``trtexec`` build command per graph of a ``--target tensorrt`` bundle (paths absolute).

    Raises:
        ExportError / BundleError: as :func:`build_plan`.
    """
    plan = build_plan(b, device, workspace_mib)
    return [shlex.join(trtexec_args(plan, c)) for c in plan.components]


def engine_record(plan: BuildPlan, built: dict[str, dict], tensorrt_version: str, gpu: dict) -> dict:
    """The ``engines.json`` record of a finished build.

    Args:
        plan: what was built.
        built: component -> {"sha256", "size", "seconds"} of each written plan file.
        tensorrt_version: ``tensorrt.__version__`` of the builder.
        gpu: {"name", "compute_capability", ...} of the device that built them (trt_build.gpu_info).
    """
    from nora_edge import __version__

    missing = [c.name for c in plan.components if c.name not in built]
    if missing:
        raise ExportError(f"engine record: no build result for {missing}")
    return {
        "record_version": RECORD_VERSION,
        "device": plan.device,
        "bundle": plan.bundle.name,
        "bundle_manifest_sha256": plan.manifest_sha256,
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,
        "nora_edge_version": __version__,
        "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"workspace_mib": plan.workspace_mib, "timing_cache": plan.timing_cache.name},
        "engines": {c.name: {**c.settings(), **built[c.name]} for c in plan.components},
    }


def write_engine_record(plan: BuildPlan, record: dict) -> Path:
    """Write ``engines.json`` atomically into the plan's engine folder."""
    return write_json_atomic(plan.out_dir / ENGINES_JSON, record)


def load_engine_record(b: B.Bundle, device: str, *, verify: bool = True) -> dict:
    """Read a device's ``engines.json`` and check it still describes this bundle's engines.

    Raises:
        BundleError: no record, a record of another manifest (re-exported bundle: rebuild), or a missing,
            resized or (``verify``) tampered plan file, each named.
    """
    folder = engine_dir(b, device)
    record = read_json_object(folder / ENGINES_JSON, BundleError)
    want = B.sha256_file(Path(b.path) / B.MANIFEST)
    if record.get("bundle_manifest_sha256") != want:
        raise BundleError(
            f"{folder / ENGINES_JSON}: built from another manifest.json (sha256 "
            f"{str(record.get('bundle_manifest_sha256'))[:12]}..., the bundle's is {want[:12]}...): rebuild"
        )
    engines = record.get("engines")
    if not isinstance(engines, dict) or set(engines) != set(COMPONENTS):
        raise BundleError(f"{folder / ENGINES_JSON}: 'engines' must list {list(COMPONENTS)}")
    for name, entry in engines.items():
        p = folder / str(entry.get("plan"))
        if not p.is_file() or p.stat().st_size != entry.get("size"):
            raise BundleError(f"{p}: engine of '{name}' missing or resized since {ENGINES_JSON} was written")
        if verify and B.sha256_file(p) != entry.get("sha256"):
            raise BundleError(f"{p}: sha256 does not match {ENGINES_JSON} (tampered or corrupted)")
    return record


def build_engines(
    b: B.Bundle,
    device: str,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Build one engine per graph with the tensorrt Python API and record them (module docstring).

    Args:
        log: progress lines (one per engine).

    Returns:
        the written ``engines.json``.

    Raises:
        ExportError: tensorrt is not importable here (the message points to ``--print-trtexec``), a parse or
            build failure (parser errors listed with their nodes), or no usable GPU.
        BundleError: as :func:`build_plan`.
    """
    plan = build_plan(b, device, workspace_mib)  # checked first: a bad bundle fails the same way everywhere
    if importlib.util.find_spec("tensorrt") is None:
        raise ExportError(
            "the tensorrt Python package is not installed on this machine (`import tensorrt` fails; TensorRT runs "
            "on NVIDIA GPUs and ships with JetPack): run `nora-edge build-engine BUNDLE --profile DEVICE.toml "
            "--print-trtexec` and run the printed commands on the device"
        )
    from nora_edge.export.trt_build import execute_plan

    built, version, gpu = execute_plan(plan, log)
    return write_engine_record(plan, engine_record(plan, built, version, gpu))
