"""TensorRT build settings shared by the runtime's TensorRT EP (sessions.py) and ``nora-edge build-engine``
(export/trt_engine.py): precision flags and optimization-profile shapes, one source for both (plain
Python: no onnxruntime, no tensorrt).

Data flow: manifest component (precision, meta) --:func:`trt_precision`--> strongly typed or FP16/INT8 flags;
manifest ``tensorrt.profiles.<component>`` --:func:`component_profile` / :func:`check_profile`--> input ->
min/opt/max shapes --:func:`format_shapes`--> ``name:1x2x3,name2:4`` (trtexec ``--minShapes`` and the EP's
``trt_profile_min_shapes`` share this syntax) --:func:`parse_shapes`--> back to shapes.

TensorRT precision (:func:`trt_precision`, shared with ``nora-edge build-engine``): an ``fp16`` component (the fp16
recipe: an fp16 graph with fp32 islands) is built strongly typed, i.e. with neither flag, so the islands' own types
hold (onnxruntime's TensorRT EP creates a STRONGLY_TYPED network when neither ``trt_fp16_enable`` nor
``trt_int8_enable`` is set, TensorRT >= 9: microsoft/onnxruntime PR 24298, tensorrt_execution_provider.cc; an
older EP builds it in fp32 precision, correct but slower); ``trt_fp16_enable`` when the precision names
"mixed" or another fp16 label; ``trt_int8_enable`` when it is a QDQ int8 graph (``int8-qdq``; dynamic int8 is a
CPU recipe). A component's ``meta["tensorrt"]`` dict overrides any option explicitly.

TensorRT profiles: a ``--target tensorrt`` bundle's manifest section ``tensorrt.profiles.<component>`` (input ->
min/opt/max shape; :func:`check_profile`) becomes the EP's ``trt_profile_{min,opt,max}_shapes`` options, format
``name:1x2x3,name2:4`` (onnxruntime docs, onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html,
section "Explicit range of dynamic input
shape for TRT optimization profiles": every dynamic input needs a range, and the engine cache is reused only
when the same three options are given again), so the EP builds one engine covering prefill and every decode step
instead of one per new shape. Such a component counts as built for TensorRT ("auto" offers it the TensorRT EP).
The engine cache lives outside the bundle (a verified bundle may not hold unlisted files).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nora_edge.bundle_specs import ComponentSpec, TensorSpec
from nora_edge.errors import BundleError, InputError

PROFILE_KEYS = ("min", "opt", "max")
_EP_PROFILE_OPTIONS = {k: f"trt_profile_{k}_shapes" for k in PROFILE_KEYS}
Profile = dict[str, dict[str, list[int]]]  # input name -> {"min"|"opt"|"max": shape}


@dataclass(frozen=True)
class TrtPrecision:
    """How TensorRT builds one component: a strongly typed network, or builder flags FP16 / INT8."""

    strongly_typed: bool
    fp16: bool
    int8: bool


def _flag(value: object) -> bool:
    return str(value).strip().lower() in ("true", "1")


def trt_precision(precision: str, meta: Mapping | None = None) -> TrtPrecision:
    """TensorRT precision of a component (module docstring); ``meta["tensorrt"]`` may set ``trt_fp16_enable`` /
    ``trt_int8_enable`` explicitly (either one set turns strong typing off, as in onnxruntime's EP)."""
    p = precision.lower()
    extra = ep_overrides(meta)
    typed = p == "fp16"  # the fp16 recipe: fp16 graph with fp32 islands, whose types must hold
    fp16 = (
        _flag(extra["trt_fp16_enable"])
        if "trt_fp16_enable" in extra
        else not typed and ("fp16" in p or "mixed" in p)
    )
    # explicit (QDQ) int8 only: dynamic int8 (MatMulInteger) and weight-only int4 are CPU/CUDA recipes
    int8 = _flag(extra["trt_int8_enable"]) if "trt_int8_enable" in extra else "qdq" in p
    return TrtPrecision(typed and not (fp16 or int8), fp16, int8)


def ep_overrides(meta: Mapping | None) -> Mapping:
    """The component meta's ``tensorrt`` option overrides ({} when absent); BundleError when not an object."""
    extra = meta.get("tensorrt", {}) if isinstance(meta, Mapping) else {}
    if not isinstance(extra, Mapping):
        raise BundleError(f"component meta 'tensorrt' must be an object, got {type(extra).__name__}")
    return extra


def check_profile(
    profile: object, inputs: Sequence[TensorSpec] | None = None, where: str = "profile"
) -> Profile:
    """Check one component's optimization profile (manifest ``tensorrt.profiles.<component>``).

    Args:
        profile: input name -> {"min", "opt", "max"}: shapes (lists of positive ints, equal rank, min <= opt <=
            max per axis).
        inputs: the component's manifest inputs; when given, every profile name must be one, its static axes
            must equal the profile's, and every input with a named (dynamic) axis must have a range.
        where: the manifest path named in errors.

    Returns:
        the profile as plain dicts of int lists.

    Raises:
        BundleError: naming the input and what is wrong.
    """
    if not isinstance(profile, Mapping):
        raise BundleError(
            f"{where}: must be an object of input -> min/opt/max shapes, got {type(profile).__name__}"
        )
    specs = {t.name: t for t in inputs} if inputs is not None else None
    out: Profile = {}
    for name, dims in profile.items():
        if not isinstance(dims, Mapping) or any(k not in dims for k in PROFILE_KEYS):
            raise BundleError(f"{where}.{name}: must hold 'min', 'opt' and 'max' shapes, got {dims!r:.80}")
        shapes = {}
        for k in PROFILE_KEYS:
            v = dims[k]
            if (
                not isinstance(v, list | tuple)
                or not v
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in v)
            ):
                raise BundleError(
                    f"{where}.{name}.{k}: must be a non-empty list of positive ints, got {v!r:.80}"
                )
            shapes[k] = [int(d) for d in v]
        lo, opt, hi = (shapes[k] for k in PROFILE_KEYS)
        if not len(lo) == len(opt) == len(hi):
            raise BundleError(f"{where}.{name}: min/opt/max ranks differ: {lo}, {opt}, {hi}")
        if any(not a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise BundleError(f"{where}.{name}: needs min <= opt <= max on every axis, got {lo}, {opt}, {hi}")
        if specs is not None:
            if name not in specs:
                raise BundleError(f"{where}.{name}: not an input of the graph ({sorted(specs)[:6]})")
            shape = specs[name].shape
            if len(shape) != len(lo) or any(
                isinstance(d, int) and not lo[a] == hi[a] == d for a, d in enumerate(shape)
            ):
                raise BundleError(
                    f"{where}.{name}: {lo}..{hi} does not fit the graph input's shape {list(shape)}"
                )
        out[str(name)] = shapes
    if specs is not None:
        missing = [
            n for n, t in specs.items() if any(not isinstance(d, int) for d in t.shape) and n not in out
        ]
        if missing:
            raise BundleError(
                f"{where}: no min/opt/max range for the dynamic input(s) {missing} (TensorRT needs one)"
            )
    return out


def format_shapes(profile: Mapping[str, Mapping[str, Sequence[int]]], key: str) -> str:
    """``"name:1x2x3,name2:4"``: one of the profile's shapes (``key`` = min/opt/max) per input, in the syntax of
    both trtexec's ``--{min,opt,max}Shapes`` and the EP's ``trt_profile_*_shapes``."""
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in dims[key])}" for name, dims in profile.items())


def parse_shapes(text: str) -> dict[str, list[int]]:
    """Inverse of :func:`format_shapes` for one key: ``"a:1x2,b:3"`` -> {"a": [1, 2], "b": [3]}.

    Raises:
        InputError: a malformed entry (named).
    """
    out: dict[str, list[int]] = {}
    for entry in filter(None, text.split(",")):
        name, sep, dims = entry.rpartition(":")
        try:
            shape = [int(d) for d in dims.split("x")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or name in out:
            raise InputError(
                f"malformed shape entry {entry!r} in {text!r} (expected name:1x2x3, each name once)"
            )
        out[name] = shape
    return out


def profile_options(profile: Mapping | None) -> dict[str, str]:
    """The EP's ``trt_profile_{min,opt,max}_shapes`` options of a profile ({} for none or an empty one)."""
    if not profile:
        return {}
    return {opt: format_shapes(profile, key) for key, opt in _EP_PROFILE_OPTIONS.items()}


def component_profile(section: Mapping | None, name: str, spec: ComponentSpec) -> Profile | None:
    """The checked profile of component ``name`` from a bundle's manifest ``tensorrt`` section (None: no section,
    or the section does not list the component).

    Raises:
        BundleError: a malformed section or profile (named).
    """
    if section is None:
        return None
    profiles = section.get("profiles") if isinstance(section, Mapping) else None
    if not isinstance(profiles, Mapping):
        raise BundleError("manifest.json: field 'tensorrt.profiles' is missing or not an object")
    if name not in profiles:
        return None
    return check_profile(profiles[name], spec.inputs, f"manifest.json: tensorrt.profiles.{name}")
