"""Session fixtures of the runtime tests: bundles exported once from the shared tiny checkpoints, references.

  rt_bundle          export_bundle(tiny_ckpt, head="full", fp32 embeddings): exact HF-parity bundle (T=1)
  rt_bundle_h5       the same for tiny_ckpt_h5 (T=5, NORA-Long)
  rt_bundle_action   export_bundle(tiny_ckpt) with the defaults (action head, fp16 embeddings): production shape
  chain_ckpt         tiny_ckpt edited into a "bigram chain" model that usually emits a well-formed FAST chunk
  chain_bundle       its full-head fp32 bundle
  ref_tiny / ref_h5 / ref_chain   ReferencePolicy (HF PyTorch) of those checkpoints

The chain checkpoint exists because a random tiny model almost never emits a decodable FAST chunk, so "actions
equal the reference's wherever its decode is well formed" would test nothing. Scaling the input embeddings up
makes the last hidden state track the current token's embedding; untied lm_head rows pointing at the previous
token's embedding then chain  "\\n" -> FAST ids of a fixed chunk -> <|im_end|> (the plain tiny checkpoints
supply the malformed cases).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

CHAIN_CHUNK = [[0.3, -0.2, 0.1, 0.0, 0.5, -0.4, 1.0]]  # normalized (T=1, D=7) target of the chain model
CHAIN_INPUT_SCALE = 10.0
CHAIN_OUTPUT_SCALE = 20.0


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    import torch

    torch.set_num_threads(1)


def _export(ckpt: Path, out: Path, **kw) -> Path:
    from nora_edge.export.pipeline import export_bundle

    return export_bundle(ckpt, out, validate=False, progress=False, **kw)


@pytest.fixture(scope="session")
def rt_bundle(tiny_ckpt: Path, tmp_path_factory) -> Path:
    return _export(tiny_ckpt, tmp_path_factory.mktemp("rt") / "full", head="full", embeddings_dtype="float32")


@pytest.fixture(scope="session")
def rt_bundle_h5(tiny_ckpt_h5: Path, tmp_path_factory) -> Path:
    return _export(
        tiny_ckpt_h5, tmp_path_factory.mktemp("rt") / "full_h5", head="full", embeddings_dtype="float32"
    )


@pytest.fixture(scope="session")
def rt_bundle_action(tiny_ckpt: Path, tmp_path_factory) -> Path:
    return _export(tiny_ckpt, tmp_path_factory.mktemp("rt") / "action")


def make_chain_checkpoint(src: Path, dst: Path) -> Path:
    """Copy ``src`` and rewire its head into the bigram chain described in the module docstring."""
    from safetensors.numpy import load_file, save_file

    from nora_edge.actions.fast import FastTokenizer

    shutil.copytree(src, dst)
    added = json.loads((dst / "added_tokens.json").read_text())
    base, im_end = added["<robot_action_0>"], added["<|im_end|>"]
    tokenizer = json.loads((dst / "tokenizer.json").read_text())
    newline = tokenizer["model"]["vocab"]["Ċ"]  # byte-level "\n", the last prompt token
    fast_ids = FastTokenizer.from_pretrained(dst / "fast").encode(np.array(CHAIN_CHUNK))[0]
    weights = load_file(dst / "model.safetensors")
    emb = weights["model.embed_tokens.weight"].copy()  # (V, H)
    head = emb.copy()
    seq = [newline, *[base + int(f) for f in fast_ids], im_end]
    mean_norm = float(np.linalg.norm(emb, axis=1).mean())
    for prev, nxt in zip(seq[:-1], seq[1:], strict=True):
        head[nxt] = emb[prev] / np.linalg.norm(emb[prev]) * mean_norm * CHAIN_OUTPUT_SCALE
    weights["lm_head.weight"] = head
    weights["model.embed_tokens.weight"] = emb * CHAIN_INPUT_SCALE
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="session")
def chain_ckpt(tiny_ckpt: Path, tmp_path_factory) -> Path:
    return make_chain_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("chain") / "chain_h1")


@pytest.fixture(scope="session")
def chain_bundle(chain_ckpt: Path, tmp_path_factory) -> Path:
    return _export(
        chain_ckpt, tmp_path_factory.mktemp("rt") / "chain", head="full", embeddings_dtype="float32"
    )


def _reference(ckpt: Path):
    from nora_edge.export.reference import ReferencePolicy

    return ReferencePolicy.from_pretrained(ckpt)


@pytest.fixture(scope="session")
def ref_tiny(tiny_ckpt: Path):
    return _reference(tiny_ckpt)


@pytest.fixture(scope="session")
def ref_h5(tiny_ckpt_h5: Path):
    return _reference(tiny_ckpt_h5)


@pytest.fixture(scope="session")
def ref_chain(chain_ckpt: Path):
    return _reference(chain_ckpt)
