"""Bench test fixtures: the tiny NORA-Long fixture exported once per session (fp32, no validation)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle_h5(tiny_ckpt_h5: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 bundle of ``tiny_ckpt_h5`` (horizon 5, action head, 224-specialised vision)."""
    import torch

    from nora_edge.export.pipeline import export_bundle

    torch.set_num_threads(1)
    return export_bundle(
        tiny_ckpt_h5, tmp_path_factory.mktemp("bench") / "tiny_h5_fp32", validate=False, progress=False
    )
