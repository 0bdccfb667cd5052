"""Execute a :class:`~nora_edge.export.trt_engine.BuildPlan` with the tensorrt Python API: the only module that
imports tensorrt (needs an NVIDIA GPU; nothing here has run in this project's CI, which has neither).

Data flow, per component of the plan: ``trt.Builder`` -> network (``STRONGLY_TYPED`` flag when the plan says so)
<- ``trt.OnnxParser.parse_from_file`` (external weights beside the .onnx are found by the parser; every parser
error listed with its node) -> every dynamic network input checked against the plan's profile -> builder config:
workspace pool limit, FP16 / INT8 flags (weakly typed only), the optimization profile (min/opt/max per dynamic
input), the timing cache loaded from ``timing.cache`` -> ``build_serialized_network`` -> ``<component>.plan``
written atomically (sha256 computed from the same buffer) and the timing cache saved back after each engine.

API sources (NVIDIA TensorRT Python API reference, docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api):
Builder.create_network / NetworkDefinitionCreationFlag.STRONGLY_TYPED (infer/Core/Builder.html; TensorRT 10
networks are always explicit batch, TensorRT 8 needs EXPLICIT_BATCH, TensorRT 11 makes every network strongly
typed), OnnxParser.parse_from_file / get_error (parsers/Onnx/pyOnnx.html), IBuilderConfig.set_memory_pool_limit
(MemoryPoolType.WORKSPACE), create_timing_cache / set_timing_cache / get_timing_cache (infer/Core/BuilderConfig.html,
infer/Core/TimingCache.html), IOptimizationProfile.set_shape (infer/Core/OptimizationProfile.html). The GPU's
name and compute capability come from the CUDA driver API (cuDeviceGetName, cuDeviceGetAttribute with
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR/MINOR = 75/76; docs.nvidia.com/cuda/cuda-driver-api, "Device
Management"), loaded with ctypes so no CUDA Python package is needed.
"""

from __future__ import annotations

import ctypes
import hashlib
import time
from collections.abc import Callable

from nora_edge.atomic import atomic_path, write_bytes_atomic
from nora_edge.errors import ExportError
from nora_edge.export.trt_engine import BuildPlan, ComponentPlan

_CC_MAJOR, _CC_MINOR = 75, 76  # CUdevice_attribute values in cuda.h


def gpu_info(device: int = 0, library: str = "libcuda.so.1") -> dict:
    """Name and compute capability of CUDA device ``device`` from the driver API.

    Returns:
        {"name": str | None, "compute_capability": "8.7" | None, "source": str}: None fields (with the reason in
        ``source``) when the driver library is missing or the call fails; never raises.
    """
    try:
        cuda = ctypes.CDLL(library)
    except OSError as e:
        return {"name": None, "compute_capability": None, "source": f"{library} not loadable ({e})"}
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    calls = (
        ("cuInit", lambda: cuda.cuInit(0)),
        ("cuDeviceGet", lambda: cuda.cuDeviceGet(ctypes.byref(dev), device)),
        ("cuDeviceGetName", lambda: cuda.cuDeviceGetName(name, len(name), dev)),
        ("cuDeviceGetAttribute", lambda: cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)),
        ("cuDeviceGetAttribute", lambda: cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)),
    )
    for fn, call in calls:
        status = call()
        if status != 0:
            return {"name": None, "compute_capability": None, "source": f"{library}: {fn} returned {status}"}
    return {
        "name": name.value.decode("utf-8", "replace"),
        "compute_capability": f"{major.value}.{minor.value}",
        "source": f"CUDA driver API ({library}), device {device}",
    }


def parser_errors(parser) -> list[str]:
    """Every error of a failed ``OnnxParser`` parse, each with its node (index, name and operator when this
    TensorRT version reports them)."""
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = f"node {err.node()}"
        for attr, fmt in (("node_name", " '{}'"), ("node_operator", " ({})")):
            getter = getattr(err, attr, None)
            if getter is not None and getter():
                node += fmt.format(getter())
        out.append(f"{node}: {err.desc()} [{err.code()}]")
    return out


def network_flags(trt, strongly_typed: bool) -> int:
    """``create_network`` flags: STRONGLY_TYPED when asked (TensorRT >= 9), EXPLICIT_BATCH on TensorRT 8."""
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if int(trt.__version__.split(".")[0]) < 10 and hasattr(creation, "EXPLICIT_BATCH"):
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if strongly_typed:
        if not hasattr(creation, "STRONGLY_TYPED"):
            raise ExportError(
                f"TensorRT {trt.__version__} has no strongly typed networks (TensorRT >= 9): the fp16 component "
                "needs them to keep its fp32 islands"
            )
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


def _check_dynamic_inputs(network, comp: ComponentPlan) -> int:
    """Every network input with a -1 axis must have a profile entry; returns how many inputs are dynamic."""
    dynamic = 0
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            dynamic += 1
            if tensor.name not in comp.profile:
                raise ExportError(
                    f"{comp.onnx}: input '{tensor.name}' has dynamic shape {shape} but the manifest's "
                    f"tensorrt.profiles.{comp.name} gives it no min/opt/max range"
                )
    return dynamic


def build_component(trt, builder, logger, plan: BuildPlan, comp: ComponentPlan, cache: bytes) -> tuple:
    """Build one engine; returns (serialized engine, updated timing cache bytes)."""
    network = builder.create_network(network_flags(trt, comp.strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(comp.onnx)):
        errors = parser_errors(parser)
        raise ExportError(
            f"{comp.onnx}: TensorRT {trt.__version__}'s ONNX parser failed with {len(errors)} error(s):\n  "
            + "\n  ".join(errors)
        )
    _check_dynamic_inputs(network, comp)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    if not comp.strongly_typed:  # precision flags are not allowed on a strongly typed network
        for flag, on in (("FP16", comp.fp16), ("INT8", comp.int8)):
            if on:
                config.set_flag(getattr(trt.BuilderFlag, flag))
    timing = config.create_timing_cache(cache)
    if not config.set_timing_cache(timing, False):  # a cache of another TensorRT version or GPU: start empty
        timing = config.create_timing_cache(b"")
        config.set_timing_cache(timing, False)
    if comp.profile:
        profile = builder.create_optimization_profile()
        for name, dims in comp.profile.items():
            profile.set_shape(name, dims["min"], dims["opt"], dims["max"])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"{comp.onnx}: TensorRT {trt.__version__} could not build the engine (see the TensorRT log above; "
            f"a larger --workspace-mib than {plan.workspace_mib} may help)"
        )
    return serialized, bytes(memoryview(config.get_timing_cache().serialize()))


def execute_plan(plan: BuildPlan, log: Callable[[str], None] | None = None) -> tuple[dict, str, dict]:
    """Build every engine of ``plan``.

    Returns:
        (component -> {"sha256", "size", "seconds"}, tensorrt.__version__, :func:`gpu_info`).

    Raises:
        ExportError: no usable GPU, a parse or build failure (named).
    """
    import tensorrt as trt

    say = log or (lambda _msg: None)
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # tensorrt raises a bare TypeError/RuntimeError without a CUDA device
        raise ExportError(
            f"TensorRT {trt.__version__} cannot create a builder here (no usable CUDA GPU?): {e}"
        ) from e
    if builder is None:
        raise ExportError(f"TensorRT {trt.__version__} cannot create a builder here (no usable CUDA GPU?)")
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    cache = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
    built = {}
    for comp in plan.components:
        say(f"building {comp.name} ({comp.onnx.name}) -> {comp.plan}")
        start = time.perf_counter()
        serialized, cache = build_component(trt, builder, logger, plan, comp, cache)
        view = memoryview(serialized)
        with atomic_path(comp.plan) as tmp, open(tmp, "wb") as f:
            f.write(view)
        write_bytes_atomic(plan.timing_cache, cache)
        seconds = round(time.perf_counter() - start, 3)
        built[comp.name] = {
            "sha256": hashlib.sha256(view).hexdigest(),
            "size": view.nbytes,
            "seconds": seconds,
        }
        say(f"  {comp.name}: {view.nbytes / 2**20:.1f} MiB in {seconds:.1f} s")
        del view, serialized
    return built, str(trt.__version__), gpu_info()
