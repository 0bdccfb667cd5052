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


class ForcedTokenError(DetokenizationError):
    """A decodable chunk was refused because the model did not choose all of its tokens.

    Constrained decoding emitted tokens the model's own top choice disagreed with ("forced_continue": the model
    chose to end early; "repaired": its choice would have broken the chunk) beyond what the policy accepts.

    Attributes:
        ids: (N,) generated Qwen ids.
        token_classes: one class per id ("model", "repaired", "forced_continue").
        step: index of the first token that broke the policy's rule.
        output: the refused chunk (a ``nora_edge.policy.ChunkOutput``), for logs; never send it to a robot
            without deciding to.
    """

    def __init__(self, message: str, *, ids, token_classes, step: int, output) -> None:
        super().__init__(message)
        self.ids = ids
        self.token_classes = tuple(token_classes)
        self.step = int(step)
        self.output = output


class ProfileError(NoraEdgeError):
    """A device profile file is missing a field, a source, or holds an impossible number."""


class InputError(NoraEdgeError, ValueError):
    """Caller input is invalid (image, instruction, unnorm key, options)."""
