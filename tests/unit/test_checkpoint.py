"""Checkpoint loader: reads the fixture like NORA ships it, and names the fault for every broken piece."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nora_edge import names
from nora_edge.checkpoint import NoraCheckpoint
from nora_edge.errors import CheckpointError, InputError


@pytest.fixture
def ckpt_copy(tiny_ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_loads_fixture_metadata(tiny_ckpt: Path) -> None:
    ck = NoraCheckpoint.load(tiny_ckpt)
    added = json.loads((tiny_ckpt / names.ADDED_TOKENS).read_text())
    # the action range is what the tokenizer says, independently recomputed here
    action = {t: i for t, i in added.items() if t.startswith("<robot_action_")}
    assert ck.action_base == min(action.values())
    assert ck.num_action_tokens == len(action) == names.NUM_ACTION_TOKENS
    assert ck.action_base + ck.num_action_tokens <= ck.vocab_size
    assert ck.token_ids["image_pad"] == added["<|image_pad|>"]
    assert ck.action_dim == 7
    assert ck.time_horizon == 1
    key, stats = next(iter(json.loads((tiny_ckpt / names.NORM_STATS).read_text()).items()))
    np.testing.assert_array_equal(ck.norm_stats_for(None).q01, stats["action"]["q01"])
    assert ck.norm_stats_for(key).key == key
    assert all(p.is_file() for p in ck.weight_files)


def test_horizon5_fixture(tiny_ckpt_h5: Path) -> None:
    assert NoraCheckpoint.load(tiny_ckpt_h5).time_horizon == 5


@pytest.mark.parametrize(
    "name", [names.CONFIG, names.NORM_STATS, names.TOKENIZER_JSON, names.GENERATION_CONFIG]
)
def test_missing_file_is_named(ckpt_copy: Path, name: str) -> None:
    (ckpt_copy / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        NoraCheckpoint.load(ckpt_copy)


def test_missing_weights(ckpt_copy: Path) -> None:
    for p in ckpt_copy.glob("*.safetensors"):
        p.unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        NoraCheckpoint.load(ckpt_copy)


def test_missing_fast_dir(ckpt_copy: Path) -> None:
    shutil.rmtree(ckpt_copy / names.FAST_SUBDIR)
    with pytest.raises(CheckpointError, match="processor_config.json"):
        NoraCheckpoint.load(ckpt_copy)


def test_unknown_and_ambiguous_norm_key(ckpt_copy: Path) -> None:
    ck = NoraCheckpoint.load(ckpt_copy)
    with pytest.raises(InputError, match="'no_such_robot'"):
        ck.norm_stats_for("no_such_robot")

    def add_key(d):
        d["second_robot"] = next(iter(d.values()))

    _edit_json(ckpt_copy / names.NORM_STATS, add_key)
    ck = NoraCheckpoint.load(ckpt_copy)
    with pytest.raises(InputError, match="unnorm_key is required"):
        ck.norm_stats_for(None)


def test_norm_stats_missing_field(ckpt_copy: Path) -> None:
    _edit_json(ckpt_copy / names.NORM_STATS, lambda d: next(iter(d.values()))["action"].pop("q99"))
    with pytest.raises(CheckpointError, match="q99"):
        NoraCheckpoint.load(ckpt_copy)


def test_non_contiguous_action_ids(ckpt_copy: Path) -> None:
    def swap(d):
        d["<robot_action_3>"], d["<robot_action_4>"] = d["<robot_action_4>"], d["<robot_action_3>"]

    _edit_json(ckpt_copy / names.ADDED_TOKENS, swap)
    with pytest.raises(CheckpointError, match=r"not contiguous: <robot_action_3>"):
        NoraCheckpoint.load(ckpt_copy)


def test_missing_action_index(ckpt_copy: Path) -> None:
    _edit_json(ckpt_copy / names.ADDED_TOKENS, lambda d: d.pop("<robot_action_7>"))
    with pytest.raises(CheckpointError, match=r"missing e\.g\. \[7\]"):
        NoraCheckpoint.load(ckpt_copy)


def test_fast_vocab_mismatch(ckpt_copy: Path) -> None:
    _edit_json(
        ckpt_copy / names.FAST_SUBDIR / names.FAST_PROCESSOR_CONFIG, lambda d: d.update(vocab_size=1024)
    )
    with pytest.raises(CheckpointError, match="FAST dir mismatch.*vocab_size"):
        NoraCheckpoint.load(ckpt_copy)


def test_fast_action_dim_mismatch(ckpt_copy: Path) -> None:
    _edit_json(ckpt_copy / names.FAST_SUBDIR / names.FAST_PROCESSOR_CONFIG, lambda d: d.update(action_dim=6))
    with pytest.raises(CheckpointError, match="FAST dir mismatch.*action_dim"):
        NoraCheckpoint.load(ckpt_copy)


def test_fast_plus_horizon_must_be_given(ckpt_copy: Path) -> None:
    _edit_json(
        ckpt_copy / names.FAST_SUBDIR / names.FAST_PROCESSOR_CONFIG, lambda d: d.update(time_horizon=None)
    )
    with pytest.raises(CheckpointError, match="time_horizon"):
        NoraCheckpoint.load(ckpt_copy)
    assert NoraCheckpoint.load(ckpt_copy, time_horizon=5).time_horizon == 5


def test_config_token_id_disagrees_with_tokenizer(ckpt_copy: Path) -> None:
    def bump(d):
        d["image_token_id"] = d.get("image_token_id", 0) + 1

    _edit_json(ckpt_copy / names.CONFIG, bump)
    with pytest.raises(CheckpointError, match="image_token_id"):
        NoraCheckpoint.load(ckpt_copy)
