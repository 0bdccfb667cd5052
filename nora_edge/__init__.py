"""nora-edge: run the NORA vision-language-action policy on robots.

Data flow: NORA checkpoint (HF dir) --export stage (torch)--> bundle dir (manifest + ONNX + codec)
--runtime (numpy, onnxruntime, tokenizers)--> actions (T, D). This package is the runtime and the CLI;
it never imports torch or ``nora_edge.export`` at module level.
"""

from nora_edge.errors import (
    BundleError,
    CheckpointError,
    DetokenizationError,
    ExportError,
    InputError,
    NoraEdgeError,
    ProfileError,
)

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "CheckpointError",
    "DetokenizationError",
    "ExportError",
    "InputError",
    "NoraEdgeError",
    "ProfileError",
    "__version__",
]
