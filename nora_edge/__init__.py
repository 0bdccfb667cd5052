"""nora-edge: run the NORA vision-language-action policy on robots.

Data flow: NORA checkpoint (HF dir) --export stage (torch)--> bundle dir (manifest + ONNX + codec)
--runtime (numpy, onnxruntime, tokenizers)--> actions (T, D). This package is the runtime and the CLI;
it never imports torch or ``nora_edge.export`` at module level, and ``import nora_edge`` does not import
onnxruntime: ``nora_edge.NoraPolicy`` is resolved on first access (PEP 562 module ``__getattr__``).
"""

from nora_edge.errors import (
    BundleError,
    CheckpointError,
    DetokenizationError,
    ExportError,
    ForcedTokenError,
    InputError,
    NoraEdgeError,
    ProfileError,
)

__version__ = "0.1.0"

_LAZY = {"NoraPolicy": "nora_edge.policy", "ChunkOutput": "nora_edge.policy"}


def __getattr__(name: str):
    """``from nora_edge import NoraPolicy`` imports the runtime (and onnxruntime) only when asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nora_edge' has no attribute {name!r}")


__all__ = [
    "BundleError",
    "ChunkOutput",
    "CheckpointError",
    "DetokenizationError",
    "ExportError",
    "ForcedTokenError",
    "InputError",
    "NoraEdgeError",
    "NoraPolicy",
    "ProfileError",
    "__version__",
]
