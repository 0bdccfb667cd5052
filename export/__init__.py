"""nora-edge export stage (torch side): fixtures, ReferencePolicy, graph export, quantization, validation.

Data flow: NORA checkpoint dir -> (fixtures.py writes synthetic ones) -> ReferencePolicy (declare-lab/nora
semantics on the PyTorch model) -> exported bundle. Heavy imports (torch, transformers) happen on first use
of a name below, so ``import nora_edge.export.<module>`` stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ReferencePolicy": "reference",
    "ReferenceResult": "reference",
    "build_fixture": "fixtures",
    "PRESETS": "fixtures",
    "load_processor": "processor",
    "NoraProcessor": "processor",
    "random_rgb_image": "images",
    "export_bundle": "pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
