"""Session-wide test fixtures: NORA-format checkpoints built once per session, and deterministic images.

Fixture names are a contract other test folders rely on:
  tiny_ckpt           tiny preset, horizon 1 (NORA), one unnorm key ("fixture_robot")
  tiny_ckpt_h5        tiny preset, horizon 5 (NORA-Long)
  tiny_ckpt_multikey  tiny preset, horizon 1, unnorm keys "fixture_robot", "other_robot"
  medium_ckpt         medium preset (91.9 M params), horizon 5; built only when a test asks for it
  tiny_trained_ckpt    tiny preset, horizon 1, seed 0, trained (train_fixture.FIXTURE_TRAIN_STEPS[1] steps) so the
                       reference's greedy output is a well-formed FAST chunk on most inputs (~15-30 s to build)
  tiny_trained_ckpt_h5 the same for horizon 5 (NORA-Long)
  make_rgb_image      callable (seed=0, height=224, width=224) -> (H, W, 3) uint8
Each builds lazily (pytest only creates a session fixture when a test requests it) and the export stage is
imported inside the fixture, so runtime-only tests never import torch.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs) -> Path:
    from nora_edge.export.fixtures import build_fixture

    return build_fixture(tmp_path_factory.mktemp("ckpt") / name, progress=False, **kwargs)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny NORA-format checkpoint, FAST time horizon 1, seed 0."""
    return _build(tmp_path_factory, "tiny_h1", preset="tiny", horizon=1, seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny NORA-format checkpoint, FAST time horizon 5 (NORA-Long), seed 0."""
    return _build(tmp_path_factory, "tiny_h5", preset="tiny", horizon=5, seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_multikey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoint whose norm_stats.json has two keys ("fixture_robot", "other_robot")."""
    return _build(
        tmp_path_factory, "tiny_multikey", preset="tiny", horizon=1, seed=0, extra_norm_keys=("other_robot",)
    )


@pytest.fixture(scope="session")
def medium_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Medium (91.9 M params) NORA-format checkpoint, horizon 5, seed 0; ~3 s to build."""
    return _build(tmp_path_factory, "medium_h5", preset="medium", horizon=5, seed=0)


def _build_trained(tmp_path_factory: pytest.TempPathFactory, name: str, horizon: int) -> Path:
    from nora_edge.export.train_fixture import FIXTURE_TRAIN_STEPS

    steps = FIXTURE_TRAIN_STEPS[horizon]
    return _build(tmp_path_factory, name, preset="tiny", horizon=horizon, seed=0, train_steps=steps)


@pytest.fixture(scope="session")
def tiny_trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoint, horizon 1, seed 0, trained on the synthetic task (well-formed greedy chunks)."""
    return _build_trained(tmp_path_factory, "tiny_trained_h1", 1)


@pytest.fixture(scope="session")
def tiny_trained_ckpt_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoint, horizon 5, seed 0, trained on the synthetic task (well-formed greedy chunks)."""
    return _build_trained(tmp_path_factory, "tiny_trained_h5", 5)


@pytest.fixture(scope="session")
def tiny_bundle_h5(tiny_ckpt_h5: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 bundle of ``tiny_ckpt_h5`` (horizon 5, action head, 224-specialised vision)."""
    import torch

    from nora_edge.export.pipeline import export_bundle

    torch.set_num_threads(1)
    return export_bundle(
        tiny_ckpt_h5, tmp_path_factory.mktemp("bench") / "tiny_h5_fp32", validate=False, progress=False
    )


@pytest.fixture(scope="session")
def fused_trained_bundle(tiny_trained_ckpt_h5: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``export --decoder-graph fused`` of ``tiny_trained_ckpt_h5``, validated (4 held-out pairs of its task)."""
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.synthetic_task import instruction_list

    out = tmp_path_factory.mktemp("fused") / "fused"
    return export_bundle(
        tiny_trained_ckpt_h5, out, decoder_graph="fused", progress=False,
        validation_prompts=4, validation_instructions=instruction_list(),
    )  # fmt: skip


@pytest.fixture(scope="session")
def make_rgb_image():
    """Factory for deterministic test images: ``make_rgb_image(seed=0, height=224, width=224)``."""
    from nora_edge.export.images import random_rgb_image

    return random_rgb_image
