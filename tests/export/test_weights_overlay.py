"""Overlaying fine-tuned weights onto a base checkpoint, with weights files written the way NORA's scripts write them.

The fine-tuned model is the tiny fixture loaded with transformers, every parameter moved by seeded noise ("briefly
fine-tuned"), then saved by accelerate's own ``Accelerator.save_state`` (declare-lab/nora ``training/train.py``),
by ``save_pretrained`` (sharded), and as a ``module.``-prefixed file. The reference is transformers loading the
overlaid directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nora_edge.errors import CheckpointError
from nora_edge.export.weights_files import resolve_weights
from nora_edge.export.weights_overlay import overlay_weights

torch = pytest.importorskip("torch")
EMBED = "model.language_model.embed_tokens.weight"  # in-memory name of the (tied) token embedding


def _load(path: Path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def tuned(tiny_ckpt, tmp_path_factory):
    """(perturbed params by in-memory name, base params, accelerate save_state dir, save_pretrained dir)."""
    from accelerate import Accelerator

    model = _load(tiny_ckpt)
    base = _params(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # the tied lm_head/embed_tokens tensor is moved once
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    root = tmp_path_factory.mktemp("tuned")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    accelerator = Accelerator(cpu=True)
    prepared, _ = accelerator.prepare(model, optimizer)
    accelerator.save_state(str(root / "steps_2"))
    model.save_pretrained(str(root / "pretrained"), max_shard_size="1MB")
    return _params(model), base, root / "steps_2", root / "pretrained"


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save(tensors: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def test_accelerate_state_overlay_loads_as_the_finetuned_model(tiny_ckpt, tuned, tmp_path):
    params, base, state_dir, _ = tuned
    assert {"model.safetensors", "optimizer.bin"} <= {p.name for p in state_dir.iterdir()}
    record = overlay_weights(tiny_ckpt, state_dir, tmp_path / "ckpt")
    assert record["format"] == "accelerate" and record["key_names"].startswith("in-memory")
    assert record["counts"]["kept_from_base"] == 0 and record["wrapper_prefix"] is None
    model = _load(tmp_path / "ckpt")
    loaded = _params(model)
    assert loaded.keys() == params.keys()
    same = [k for k in params if torch.equal(loaded[k], params[k])]
    moved = [k for k in params if not torch.equal(params[k], base[k])]
    assert len(same) == len(params) == len(moved) == record["counts"]["overlaid"] > 50
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as in the base
    others = sorted(p.relative_to(tiny_ckpt) for p in tiny_ckpt.rglob("*") if p.name != "model.safetensors")
    assert sorted(p.relative_to(tmp_path / "ckpt") for p in (tmp_path / "ckpt").rglob("*")) == sorted(
        [*others, Path("model.safetensors")]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left beside it


def test_save_pretrained_sharded_module_prefix_and_lm_head_only(tiny_ckpt, tuned, tmp_path):
    _, _, state_dir, pretrained = tuned
    reference = overlay_weights(tiny_ckpt, state_dir, tmp_path / "ref")
    expected = _tensors(tmp_path / "ref" / "model.safetensors")
    assert (pretrained / "model.safetensors.index.json").is_file()
    full = _tensors(state_dir / "model.safetensors")
    full["lm_head.weight"] = full[EMBED].clone()  # tied, both written
    lm_head_only = {k: v for k, v in full.items() if k != EMBED}
    cases = {
        "pretrained": pretrained,
        "module": _save({f"module.{k}": v for k, v in full.items()}, tmp_path / "w" / "module.safetensors"),
        "lm_head_only": _save(lm_head_only, tmp_path / "w" / "lm_head.safetensors"),
    }
    compared, records = 0, {}
    for name, weights in cases.items():
        record = records[name] = overlay_weights(tiny_ckpt, weights, tmp_path / name)
        got = _tensors(tmp_path / name / "model.safetensors")
        assert got.keys() == expected.keys(), name
        compared += sum(torch.equal(got[k], expected[k]) for k in expected)
        assert record["counts"]["overlaid"] == reference["counts"]["overlaid"], name
    assert compared == 3 * len(expected)
    assert records["module"]["wrapper_prefix"] == "module." and records["pretrained"]["sharded"]
    assert "equal to" in records["module"]["tied"]["lm_head.weight"]
    assert records["lm_head_only"]["tied"]["lm_head.weight"].startswith("only lm_head.weight in the file")
    assert records["pretrained"]["key_names"].startswith("save_pretrained")


def _expect_error(tiny_ckpt, weights, out: Path, *needles: str, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        overlay_weights(tiny_ckpt, weights, out, **kwargs)
    for needle in needles:
        assert needle in str(info.value)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return str(info.value)


def test_renamed_misshaped_and_missing_keys_fail_naming_them(tiny_ckpt, tuned, tmp_path):
    _, _, state_dir, _ = tuned
    good = _tensors(state_dir / "model.safetensors")
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    renamed = dict(good)
    renamed["model.language_model.layers.0.mlp.upproj.weight"] = renamed.pop(key)
    msg = _expect_error(
        tiny_ckpt,
        _save(renamed, tmp_path / "w" / "renamed.safetensors"),
        tmp_path / "o",
        "model.language_model.layers.0.mlp.upproj.weight",
        "1 unexpected keys",
        "1 missing",
    )
    assert key in msg
    bad_shape = {**good, key: good[key][:-1]}
    _expect_error(
        tiny_ckpt,
        _save(bad_shape, tmp_path / "w" / "shape.safetensors"),
        tmp_path / "o",
        f"1 mis-shaped keys (file vs model): {key} F32",
    )
    as_int = {**good, key: good[key].to(torch.int32)}
    _expect_error(tiny_ckpt, _save(as_int, tmp_path / "w" / "int.safetensors"), tmp_path / "o", f"{key} I32")
    differs = {**good, "lm_head.weight": good[EMBED] + 1}
    _expect_error(
        tiny_ckpt,
        _save(differs, tmp_path / "w" / "untied.safetensors"),
        tmp_path / "o",
        "lm_head.weight and model.language_model.embed_tokens.weight differ",
    )
    _expect_error(tiny_ckpt, state_dir, tmp_path / "o", "names no parameter", allow_partial=("vision_tower",))


def test_missing_keys_allowed_partial_keep_base_values_and_are_recorded(tiny_ckpt, tuned, tmp_path):
    params, base, state_dir, _ = tuned
    text_only = {k: v for k, v in _tensors(state_dir / "model.safetensors").items() if ".visual." not in k}
    weights = _save(text_only, tmp_path / "w" / "text.safetensors")
    n_visual = sum(".visual." in k for k in params)
    msg = _expect_error(tiny_ckpt, weights, tmp_path / "o", f"{n_visual} missing model parameters")
    assert "model.visual.blocks.0" in msg
    record = overlay_weights(tiny_ckpt, weights, tmp_path / "o", allow_partial=("visual",))
    assert record["allow_partial"] == ["visual"] and record["counts"]["kept_from_base"] == n_visual > 10
    assert all(".visual." in k for k in record["kept_from_base"])
    loaded = _params(_load(tmp_path / "o"))
    kept = [k for k in loaded if ".visual." in k and torch.equal(loaded[k], base[k])]
    tuned_ok = [k for k in loaded if ".visual." not in k and torch.equal(loaded[k], params[k])]
    assert len(kept) == n_visual and len(tuned_ok) == len(params) - n_visual


def test_resolve_weights_refuses_ambiguous_or_pickled_sources(tuned, tmp_path):
    _, _, state_dir, _ = tuned
    two = tmp_path / "two"
    shutil.copytree(state_dir, two)
    shutil.copy(two / "model.safetensors", two / "model_1.safetensors")
    with pytest.raises(CheckpointError, match="several prepared models"):
        resolve_weights(two)
    assert resolve_weights(two / "model.safetensors").files == (two / "model.safetensors",)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickled torch weights"):
        resolve_weights(pickled)
    with pytest.raises(CheckpointError, match="save_state"):
        resolve_weights(state_dir / "model.safetensors", "accelerate")
    with pytest.raises(CheckpointError, match="not an accelerate save_state"):
        resolve_weights(tuned[3], "accelerate")


def test_cli_export_with_weights_records_the_overlay(tiny_ckpt, tuned, tmp_path):
    import numpy as np
    from typer.testing import CliRunner

    from nora_edge.bundle import sha256_file
    from nora_edge.cli import app

    params, _, state_dir, _ = tuned
    out = tmp_path / "bundle"
    args = ["export", str(tiny_ckpt), "--out", str(out), "--weights", str(state_dir), "--no-validate"]
    result = CliRunner().invoke(app, [*args, "--weights-format", "accelerate"])
    assert result.exit_code == 0, result.output
    source = json.loads((out / "manifest.json").read_text())["source_checkpoint"]
    assert source["path"] == str(tiny_ckpt.resolve())
    (entry,) = source["overlay"]["files"]
    assert entry["sha256"] == sha256_file(state_dir / "model.safetensors")
    assert source["overlay"]["format"] == "accelerate"
    table = np.load(out / "embeddings.npy")  # the bundle was exported from the fine-tuned weights
    assert np.array_equal(table, params[EMBED].numpy().astype(table.dtype))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the overlaid copy is gone
    bad = {
        k.replace("mlp.up_proj", "mlp.upproj"): v
        for k, v in _tensors(state_dir / "model.safetensors").items()
    }
    bad_file = _save(bad, tmp_path / "w" / "bad.safetensors")
    args = [
        "export",
        str(tiny_ckpt),
        "--out",
        str(tmp_path / "b2"),
        "--weights",
        str(bad_file),
        "--no-validate",
    ]
    failed = CliRunner().invoke(app, args)
    assert failed.exit_code == 2 and "CheckpointError" in failed.output and "mlp.upproj" in failed.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "w"]  # nothing half-written


def _untied_sharded_base(tiny_ckpt: Path, dest: Path) -> Path:
    """The tiny base with tie_word_embeddings false, its own lm_head, and weights in two shards + an index."""
    shutil.copytree(
        tiny_ckpt, dest, ignore=lambda d, ns: {"model.safetensors"} if Path(d) == tiny_ckpt else set()
    )
    config = json.loads((dest / "config.json").read_text())
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    (dest / "config.json").write_text(json.dumps(config))
    weights = _tensors(tiny_ckpt / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] * 0.5
    weight_map = {}
    for shard, keep in (
        ("model-00001-of-00002.safetensors", True),
        ("model-00002-of-00002.safetensors", False),
    ):
        part = {k: v for k, v in weights.items() if k.startswith("visual.") == keep}
        _save(part, dest / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


def test_untied_sharded_base_needs_lm_head_and_keeps_its_shards(tiny_ckpt, tuned, tmp_path):
    params, _, state_dir, _ = tuned
    base = _untied_sharded_base(tiny_ckpt, tmp_path / "base")
    base_params = _params(_load(base))
    assert not torch.equal(base_params["lm_head.weight"], base_params[EMBED])  # transformers loads it untied
    _expect_error(base, state_dir, tmp_path / "o", "1 missing", "lm_head.weight")
    head = params[EMBED] - 1.0
    weights = {**_tensors(state_dir / "model.safetensors"), "lm_head.weight": head}
    record = overlay_weights(base, _save(weights, tmp_path / "w" / "untied.safetensors"), tmp_path / "o")
    assert record["tied"] == {} and record["counts"]["overlaid"] == len(params) + 1 == len(weights)
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    )
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in weights.values())
    loaded = _params(_load(tmp_path / "o"))
    assert torch.equal(loaded["lm_head.weight"], head) and len(loaded) == len(params) + 1
    same = [k for k in params if torch.equal(loaded[k], params[k])]
    assert len(same) == len(params)
