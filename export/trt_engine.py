"""TensorRT engines for a `--target tensorrt` bundle: the manifest's optimization profiles and the build commands.

Data flow: export (target tensorrt) --:func:`tensorrt_section`--> manifest ``tensorrt`` section: the TensorRT versions
whose operator tables the graphs passed (trt_support.py), the static KV length, and one optimization profile
(min / opt / max shape) per dynamic input: the decoder's sequence axis runs from 1 (a decode step, the shape to
optimize for) to the longest prompt (prefill); the vision graph and the KV buffers are static.
``nora-edge build-engine BUNDLE --profile DEVICE.toml --print-trtexec`` --:func:`trtexec_commands`--> one
``trtexec`` command per graph, engines into ``<bundle>.engines/<device>/`` (TensorRT 10 syntax: ``--memPoolSize=workspace:<MiB>`` replaced ``--workspace``;
NVIDIA, "Migrating trtexec Usage from TensorRT 8.x to 10.x", docs.nvidia.com/deeplearning/tensorrt) to run on the
device. Building through the tensorrt Python API is not implemented: :func:`build_engines` says so, naming the
commands to use instead.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

from nora_edge import bundle as B
from nora_edge.errors import ExportError

DEFAULT_WORKSPACE_MIB = (
    1024  # a starting point on Jetson, whose GPU shares the system memory with everything else
)
ENGINE_SUFFIX = (
    ".engines"  # engines go beside the bundle (<bundle>.engines/<device>/): the bundle stays as hashed
)


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


def _shapes(profile: dict, key: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims[key])}" for name, dims in profile.items())


def trtexec_commands(b: B.Bundle, device: str, workspace_mib: int = DEFAULT_WORKSPACE_MIB) -> list[str]:
    """One ``trtexec`` build command per graph of a ``--target tensorrt`` bundle (paths absolute).

    Raises:
        ExportError: the bundle was not exported for TensorRT, or the workspace is not positive.
    """
    section = b.manifest.get("tensorrt")
    if section is None:
        raise ExportError(
            f"{b.path}: no 'tensorrt' manifest section: export the checkpoint with `--target tensorrt` first"
        )
    if workspace_mib < 1:
        raise ExportError(f"workspace must be a positive number of MiB, got {workspace_mib}")
    out = engine_dir(b, device)
    cmds = []
    for name in ("vision", "decoder"):
        args = [
            "trtexec",
            f"--onnx={b.file(b.components[name].file)}",
            f"--saveEngine={out / f'{name}.plan'}",
            f"--timingCacheFile={out / 'timing.cache'}",
            f"--memPoolSize=workspace:{workspace_mib}",
            "--buildOnly",
        ]
        profile = section["profiles"].get(name) or {}
        if profile:
            args += [f"--{k}Shapes={_shapes(profile, k)}" for k in ("min", "opt", "max")]
        cmds.append(shlex.join(args))
    return cmds


def build_engines(b: B.Bundle, device: str) -> None:
    """Build engines with the tensorrt Python API.

    Raises:
        ExportError: always for now: TensorRT is not importable here, or the API build is not implemented yet;
            the message points to ``--print-trtexec``.
    """
    if importlib.util.find_spec("tensorrt") is None:
        raise ExportError(
            "the tensorrt Python package is not installed on this machine (TensorRT runs on NVIDIA GPUs; it cannot "
            "be installed here): run `nora-edge build-engine BUNDLE --profile DEVICE.toml --print-trtexec` and "
            "run the printed commands on the device"
        )
    raise ExportError(
        "building engines through the tensorrt Python API is not implemented yet: use --print-trtexec and run "
        f"the printed trtexec commands (engines go to {engine_dir(b, device)})"
    )
