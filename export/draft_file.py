"""The bundle's ``drafts.json``: the model's own generated ids on calibration frames (``export --multi-token``).

Data flow: calibration samples (``--calibration`` folder of frames + instructions, or CalibrationSample objects)
--the staged bundle's own runtime, plain greedy loop (:func:`~nora_edge.export.validate_policy.staged_bundle`),
one chunk per sample--> generated Qwen ids per (instruction, chunk) --> ``drafts.json``
(:data:`nora_edge.drafts.DRAFTS_FORMAT`) + the manifest's ``drafts`` section. At load,
``NoraPolicy.load(decoding="multi-token")`` seeds its draft table from it, so a process's first chunk already has
proposals (without it, proposals come only from chunks the process has run).

Drafts are proposals: whatever the file holds, the verify call accepts only what plain greedy would pick, so a
draft file from other frames costs decoder rows, never an action. The ids are the exported fp32 model's; a
quantized bundle keeps its source's file (its own verify calls decide).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from nora_edge import bundle as B
from nora_edge.drafts import DRAFTS_FORMAT
from nora_edge.errors import InputError

DEFAULT_MAX_CHUNKS = 256  # calibration samples run for the file (~0.1-1 s each on a CPU for the fixtures)


def calibration_samples(calibration) -> list | None:
    """A ``--calibration`` folder (path) or a sequence of CalibrationSample -> the samples (None stays None).

    Raises:
        InputError: an empty sequence, or a folder that :func:`load_calibration_dir` refuses.
    """
    from nora_edge.export.quantize import load_calibration_dir

    if calibration is None:
        return None
    if isinstance(calibration, str | Path):
        return load_calibration_dir(calibration)
    samples = list(calibration)
    if not samples:
        raise InputError("calibration: an empty sequence of samples")
    return samples


def write_draft_file(writer, sections: dict, samples: Sequence, max_chunks: int = DEFAULT_MAX_CHUNKS) -> dict:
    """Run the staged bundle's plain loop on up to ``max_chunks`` samples; write ``drafts.json`` into the staging
    folder; return the manifest's ``drafts`` section.

    Args:
        writer: the export's :class:`~nora_edge.export.bundle_writer.BundleWriter` (its staging folder holds
            the graphs, tables and codec already).
        sections: the manifest sections so far (a provisional manifest is written and removed to load them).
        samples: CalibrationSample (image (H, W, 3) uint8, instruction).
        max_chunks: the most samples run (in order).

    Returns:
        {"file", "chunks", "instructions", "tokens", "source", "seconds"}.
    """
    from nora_edge.export.validate_policy import _chunk_ids, staged_bundle
    from nora_edge.policy import NoraPolicy

    if not isinstance(max_chunks, int) or max_chunks < 1:
        raise InputError(f"write_draft_file: max_chunks must be an int >= 1, got {max_chunks!r}")
    t0 = time.time()
    b = staged_bundle(writer.path, sections)
    key = sorted(b.norm_stats)[0] if b.norm_stats else None  # ids do not depend on the unnorm key
    chunks = []
    with NoraPolicy.load(b, providers="cpu", forced_tokens="flag") as policy:
        for s in list(samples)[:max_chunks]:
            ids = _chunk_ids(policy, s.image, s.instruction, key)
            chunks.append({"instruction": s.instruction, "ids": [int(i) for i in ids]})
    writer.write_json(B.DRAFTS, {"format": DRAFTS_FORMAT, "chunks": chunks})
    return {
        "file": B.DRAFTS,
        "chunks": len(chunks),
        "instructions": len({c["instruction"] for c in chunks}),
        "tokens": sum(len(c["ids"]) for c in chunks),
        "source": f"fp32 plain greedy on {len(chunks)} calibration samples",
        "seconds": round(time.time() - t0, 2),
    }
