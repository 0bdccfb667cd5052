"""The MetaWorld policy's architecture and its NORA-format checkpoint files (before training).

Data flow: preset name -> ``export.fixtures.Preset`` (Qwen2.5-VL shapes, scaled down) -> config.json /
generation_config.json / preprocessor_config.json / tokenizer files exactly as the fixtures write them (NORA's
layout, see ``export.fixtures``), norm_stats.json from the demonstrations, ``fast/`` fitted on them, random
initial weights -> a directory that ``ReferencePolicy.from_pretrained`` loads and ``sim.train`` trains.
"""

from __future__ import annotations

from pathlib import Path

from nora_edge import names
from nora_edge.actions.fast import FastTokenizer
from nora_edge.errors import ExportError
from nora_edge.export import fixture_weights
from nora_edge.export.fixtures import Preset, generation_config, model_config, preprocessor_config
from nora_edge.export.text_tokenizer import build_text_tokenizer, write_json, write_tokenizer_files

# Preset fields: base_vocab, hidden, intermediate, layers, heads, kv_heads, vision_depth, vision_hidden,
# vision_intermediate, vision_heads, fullatt_blocks, dtype, shard_bytes, corpus_size
SIM_PRESETS = {
    "sim": Preset(512, 192, 512, 4, 6, 2, 4, 96, 256, 4, (1, 3), "float32", None, 4000),
    "sim-small": Preset(512, 128, 384, 2, 4, 2, 4, 64, 128, 4, (1,), "float32", None, 4000),
}


def write_sim_checkpoint(out: Path, preset: str, norm_stats: dict, fast: FastTokenizer, seed: int) -> Path:
    """Write every checkpoint file into the new directory ``out`` (random weights from ``seed``)."""
    if preset not in SIM_PRESETS:
        raise ExportError(f"unknown policy preset {preset!r}; choose from {sorted(SIM_PRESETS)}")
    p = SIM_PRESETS[preset]
    out.mkdir(parents=True)
    write_tokenizer_files(build_text_tokenizer(p.base_vocab, seed=seed, corpus_size=p.corpus_size), out)
    config = model_config(p)
    write_json(out / names.CONFIG, config)
    write_json(out / names.GENERATION_CONFIG, generation_config(p.base_vocab))
    write_json(out / names.PREPROCESSOR_CONFIG, preprocessor_config())
    write_json(out / names.NORM_STATS, norm_stats)
    fast.save_pretrained(out / names.FAST_SUBDIR)
    fixture_weights.write_weights(out, config, seed=seed, dtype=p.dtype, shard_bytes=p.shard_bytes)
    return out
