"""ONNX Runtime sessions for the bundle's graphs: provider choice, threads, IO binding.

Data flow: bundle component (file + manifest I/O spec + precision) + providers request ("auto", a name or a
list) + the bundle's ``tensorrt`` section -> :func:`resolve_providers` ("auto": TensorRT EP only for a component
built for it, with an engine cache, precision flags and the manifest's optimization profile -> CUDA EP -> CPU EP,
keeping only what this onnxruntime build offers) -> ``InferenceSession`` checked against the manifest's
input/output names -> :class:`GraphSession.run`: feeds (numpy or OrtValue) bound with IO
binding, outputs bound on the session's device; outputs named in ``keep`` stay OrtValues (the KV cache never
round-trips through numpy, and on a GPU never leaves it), the rest come back as numpy.

TensorRT EP options (:func:`tensorrt_options`): engine + timing cache outside the bundle (a verified bundle may not
hold unlisted files), precision flags and optimization-profile shapes from :mod:`nora_edge.trt_profiles`; a
component is built for TensorRT when its meta has a ``tensorrt`` section or the bundle's ``tensorrt.profiles``
lists it.

Threads: each session gets ``threads`` intra-op threads with spinning OFF by default (a robot computer runs
control loops beside the policy; an idle spinning pool burns a core). ``shared_pool=True`` puts every session on
onnxruntime's process-wide pool instead; its Python API cannot turn that pool's spinning off (measured here,
onnxruntime 1.32, a MatMul run every 10 ms: process CPU/wall 0.45 with the shared pool whatever the session says,
0.05 with per-session pools and spinning off, 0.48 with spinning on), so spinning stays on there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nora_edge.bundle import ComponentSpec
from nora_edge.errors import BundleError, InputError
from nora_edge.trt_profiles import component_profile, ep_overrides, profile_options, trt_precision

TRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
AUTO_ORDER = (TRT_EP, CUDA_EP, CPU_EP)
_GPU_EPS = (TRT_EP, CUDA_EP)
_ORT_STATE = ort.capi.onnxruntime_pybind11_state
_ORT_LOAD_ERRORS = (
    _ORT_STATE.Fail,
    _ORT_STATE.InvalidGraph,
    _ORT_STATE.InvalidProtobuf,
    _ORT_STATE.NoSuchFile,
)


def default_cache_dir() -> Path:
    """Where TensorRT engines are cached: ``$NORA_EDGE_CACHE`` or ``~/.cache/nora-edge``, then ``/trt``."""
    root = os.environ.get("NORA_EDGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nora-edge")
    return Path(root) / "trt"


def tensorrt_options(precision: str, meta: Mapping, cache_dir: Path, profile: Mapping | None = None) -> dict:
    """TensorRT EP options for one component.

    Args:
        precision: the component's precision/recipe name from the manifest.
        meta: the component's manifest ``meta``; ``meta["tensorrt"]`` (dict) overrides options.
        cache_dir: engine + timing cache folder.
        profile: the component's optimization profile (manifest ``tensorrt.profiles.<component>``, checked by
            :func:`nora_edge.trt_profiles.check_profile`); its shapes become
            ``trt_profile_{min,opt,max}_shapes``.

    Returns:
        option name -> value (strings, as the EP expects).
    """
    flags = trt_precision(precision, meta)
    opts = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": str(flags.fp16),
        "trt_int8_enable": str(flags.int8),
        **profile_options(profile),
    }
    opts.update({str(k): str(v) for k, v in ep_overrides(meta).items()})
    return opts


def built_for_tensorrt(meta: Mapping | None, profile: Mapping | None = None) -> bool:
    """A component is built for TensorRT when its manifest meta carries a ``tensorrt`` section or the bundle's
    ``tensorrt.profiles`` lists it (``profile`` not None; ``{}`` = every input static)."""
    return profile is not None or (isinstance(meta, Mapping) and isinstance(meta.get("tensorrt"), Mapping))


def resolve_providers(
    providers: str | Sequence[str],
    *,
    precision: str = "fp32",
    meta: Mapping | None = None,
    cache_dir: Path | None = None,
    available: Sequence[str] | None = None,
    profile: Mapping | None = None,
) -> list[tuple[str, dict]]:
    """Pick execution providers with their options.

    Args:
        providers: "auto" (TensorRT if the component was built for it, then CUDA, then CPU, whatever is
            available), one provider name, a short name ("tensorrt", "cuda", "cpu"), or a list of those in
            priority order (naming TensorRT explicitly tries it on any graph).
        precision: component precision (drives the TensorRT fp16/int8 flags).
        meta: component meta (``tensorrt`` overrides).
        cache_dir: TensorRT engine cache; default :func:`default_cache_dir`.
        available: providers of this onnxruntime build (default ``ort.get_available_providers()``).
        profile: the component's TensorRT optimization profile from the bundle manifest
            (:func:`~nora_edge.trt_profiles.component_profile`; None: the bundle has none for it). A profile (even
            ``{}``) marks the component built for TensorRT.

    Returns:
        [(provider name, options)], CPU last as the fallback ORT itself needs for unsupported nodes.

    Raises:
        InputError: an unknown provider, or an explicitly requested one this build does not have.
    """
    avail = list(available if available is not None else ort.get_available_providers())
    short = {"tensorrt": TRT_EP, "trt": TRT_EP, "cuda": CUDA_EP, "cpu": CPU_EP}
    if isinstance(providers, str) and providers == "auto":
        wanted = [p for p in AUTO_ORDER if p in avail and (p != TRT_EP or built_for_tensorrt(meta, profile))]
    else:
        names = [providers] if isinstance(providers, str) else list(providers)
        if not names:
            raise InputError("providers list is empty; pass 'auto' or e.g. ['cpu']")
        wanted = []
        for n in names:
            full = short.get(str(n).lower(), str(n))
            if full not in AUTO_ORDER and full not in avail:
                raise InputError(f"unknown execution provider {n!r}; known: {list(short)} or {AUTO_ORDER}")
            if full not in avail:
                raise InputError(
                    f"execution provider {full} is not available in this onnxruntime build ({avail})"
                )
            wanted.append(full)
    if CPU_EP not in wanted:
        wanted.append(CPU_EP)
    out = []
    for p in wanted:
        if p == TRT_EP:
            cdir = cache_dir or default_cache_dir()
            cdir.mkdir(parents=True, exist_ok=True)
            out.append((p, tensorrt_options(precision, meta or {}, cdir, profile)))
        else:
            out.append((p, {}))
    return out


_shared_pool_threads: list[int] = []  # the size the process-wide pool was created with (at most one entry)


def check_threads(threads: object) -> int | None:
    """``threads`` must be a positive int or None (InputError otherwise)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be a positive int or None, got {threads!r}")
    return threads


def ensure_shared_pool(threads: int | None) -> None:
    """Create onnxruntime's process-wide intra-op pool once (``threads`` or 0 = one per core).

    Raises:
        InputError: the pool already exists with another size (it cannot be resized in a running process).
    """
    size = check_threads(threads) or 0
    if _shared_pool_threads:
        if _shared_pool_threads[0] != size:
            raise InputError(
                f"the shared thread pool already has threads={_shared_pool_threads[0] or None}; "
                f"cannot use threads={threads} in the same process"
            )
        return
    ort.capi.onnxruntime_pybind11_state.set_global_thread_pool_sizes(size, 1)
    _shared_pool_threads.append(size)


def session_options(
    threads: int | None, *, spinning: bool = False, shared_pool: bool = False
) -> ort.SessionOptions:
    """Session options: full graph optimization, ``threads`` intra-op threads (None = ORT's default),
    thread-pool spinning on or off, or the process-wide shared pool (module docstring)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    check_threads(threads)
    if not isinstance(spinning, bool):
        raise InputError(f"spinning must be a bool, got {spinning!r}")
    if shared_pool:
        ensure_shared_pool(threads)
        so.use_per_session_threads = False
        return so
    flag = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


class GraphSession:
    """One ONNX graph, run with IO binding.

    Attributes:
        name: component name ("vision", "decoder").
        session: the ``ort.InferenceSession``.
        device: "cuda" when a GPU provider runs it, else "cpu" (where bound outputs live).
        providers: the providers the session actually uses.
        requested: the (provider, options) list handed to onnxruntime (:func:`resolve_providers`).
    """

    def __init__(
        self, name: str, session: ort.InferenceSession, requested: Sequence[tuple[str, dict]] = ()
    ) -> None:
        self.name = name
        self.session = session
        self.requested = list(requested)
        self.providers = session.get_providers()
        self.device = "cuda" if any(p in _GPU_EPS for p in self.providers) else "cpu"
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(
        self,
        feeds: Mapping[str, np.ndarray | ort.OrtValue],
        fetch: Sequence[str] | None = None,
        keep: frozenset[str] | set[str] = frozenset(),
    ) -> dict[str, np.ndarray | ort.OrtValue]:
        """Run the graph.

        Args:
            feeds: input name -> numpy array or OrtValue (an OrtValue from a previous ``keep`` is not copied).
            fetch: outputs to return (default all).
            keep: outputs returned as OrtValues on the session's device instead of numpy.

        Returns:
            output name -> numpy array (or OrtValue for names in ``keep``).
        """
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        names = list(fetch) if fetch is not None else self.output_names
        for name in names:
            binding.bind_output(name, self.device if name in keep else "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {n: (v if n in keep else v.numpy()) for n, v in zip(names, values, strict=True)}


def check_io(session: ort.InferenceSession, spec: ComponentSpec, path: Path) -> None:
    """The graph's input/output names must be the manifest's (order free).

    Raises:
        BundleError: naming the file and the first missing/unexpected tensor.
    """
    got_in = {i.name for i in session.get_inputs()}
    got_out = {o.name for o in session.get_outputs()}
    for kind, got, want in (
        ("input", got_in, set(spec.input_names)),
        ("output", got_out, set(spec.output_names)),
    ):
        if got != want:
            missing, extra = sorted(want - got), sorted(got - want)
            raise BundleError(
                f"{path}: graph {kind}s disagree with manifest.json: missing {missing[:4]}, unexpected {extra[:4]}"
            )


def open_session(
    name: str,
    path: Path,
    spec: ComponentSpec,
    *,
    providers: str | Sequence[str] = "auto",
    threads: int | None = None,
    cache_dir: Path | None = None,
    spinning: bool = False,
    shared_pool: bool = False,
    tensorrt: Mapping | None = None,
) -> GraphSession:
    """Create and check the session of one bundle component (threading: see :func:`session_options`).

    Args:
        tensorrt: the bundle manifest's ``tensorrt`` section (``--target tensorrt`` bundles): the component's
            optimization profile there configures the TensorRT EP
            (:func:`~nora_edge.trt_profiles.component_profile`).

    Raises:
        BundleError: the graph does not load, its I/O disagrees with the manifest, or a malformed profile.
        InputError: a bad providers/threads request.
    """
    chosen = resolve_providers(
        providers, precision=spec.precision, meta=spec.meta, cache_dir=cache_dir,
        profile=component_profile(tensorrt, name, spec),
    )  # fmt: skip
    try:
        opts = session_options(threads, spinning=spinning, shared_pool=shared_pool)
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
    except _ORT_LOAD_ERRORS as e:
        raise BundleError(f"{path}: onnxruntime cannot load the graph ({e})") from e
    check_io(sess, spec, path)
    return GraphSession(name, sess, chosen)
