"""One error hierarchy for nora-edge.

Every failure a robot integrator can hit is a subclass of :class:`NoraEdgeError`; bad caller
input additionally subclasses :class:`ValueError` so generic handlers still catch it. Messages
name the file, field or value at fault.
"""

from __future__ import annotations


class NoraEdgeError(Exception):
    """Base class of every nora-edge error."""


class CheckpointError(NoraEdgeError):
    """A NORA checkpoint directory (or its FAST directory) is missing a piece or is inconsistent."""


class BundleError(NoraEdgeError):
    """A bundle is missing, incomplete, tampered with, or from an incompatible version."""


class ExportError(NoraEdgeError):
    """An export stage failed or its self-validation exceeded the stored tolerance."""


class DetokenizationError(NoraEdgeError):
    """A token sequence does not decode into exactly (T, D) FAST coefficients."""


class ProfileError(NoraEdgeError):
    """A device profile file is missing a field, a source, or holds an impossible number."""


class InputError(NoraEdgeError, ValueError):
    """Caller input is invalid (image, instruction, unnorm key, options)."""
