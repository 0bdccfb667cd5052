"""FastTokenizer.fit against the published construction, and the directory layout (save/load)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.fft import dct
from tokenizers import ByteLevelBPETokenizer, Tokenizer, trainers

from nora_edge.actions import FastTokenizer
from nora_edge.errors import InputError

from .reference import smooth_chunk, training_chunks


def published_fit_tokenizer(chunks, scale, vocab_size):
    """The published fit: scipy DCT, min/max over all data, ByteLevelBPETokenizer trained on the char strings."""
    coeffs = [np.around(dct(c, axis=0, norm="ortho").flatten() * scale) for c in chunks]
    flat = np.concatenate(coeffs)
    lo, hi = int(flat.min()), int(flat.max())
    bpe = ByteLevelBPETokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=[chr(i) for i in range(hi - lo + 1)],
        max_token_length=10000,
    )
    bpe._tokenizer.train_from_iterator(
        ("".join(map(chr, (c - lo).astype(int))) for c in coeffs), trainer=trainer
    )
    return bpe._tokenizer, lo


@pytest.mark.parametrize(
    ("seed", "shapes", "vocab"), [(5, [(5, 7), (10, 7)], 1024), (6, [(1, 7), (50, 3)], 2048)]
)
def test_fit_equals_published(seed, shapes, vocab):
    chunks = training_chunks(seed, shapes, 200)
    ours = FastTokenizer.fit(chunks, scale=10.0, vocab_size=vocab)
    ref_tok, ref_min = published_fit_tokenizer(chunks, 10.0, vocab)
    assert ours.min_token == ref_min
    assert json.loads(ours.tokenizer.to_str()) == json.loads(ref_tok.to_str())


def test_fit_accepts_batch_array_and_list_alike():
    arr = np.stack(training_chunks(7, [(5, 7)], 100))  # (B, T, D)
    a = FastTokenizer.fit(arr, vocab_size=512)
    b = FastTokenizer.fit(list(arr), vocab_size=512)
    assert a.tokenizer.to_str() == b.tokenizer.to_str() and a.min_token == b.min_token


def test_alphabet_covers_fitted_range(any_fast):
    # every char chr(0..max-min) of the fit is a token, so the inferred bound is at least the fitted span
    assert any_fast.table.alphabet_max >= 0
    vocab = any_fast.tokenizer.get_vocab()
    assert all(chr(i) in vocab for i in range(any_fast.table.alphabet_max + 1))


def test_fitted_span_equals_alphabet(fast_main):
    chunks = training_chunks(
        0, [(1, 7), (5, 7), (10, 7), (50, 7), (5, 1), (10, 14), (50, 14), (1, 14), (50, 1)], 300
    )
    coeffs = np.concatenate([np.around(dct(c, axis=0, norm="ortho") * 10).ravel() for c in chunks])
    assert fast_main.table.alphabet_max == int(coeffs.max() - coeffs.min())


def test_save_load_roundtrip(tmp_path, fast_h5):
    out = fast_h5.save_pretrained(tmp_path / "fast")
    assert sorted(p.name for p in out.iterdir()) == [
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    cfg = json.loads((out / "processor_config.json").read_text())
    assert cfg["processor_class"] == "UniversalActionProcessor"
    assert cfg["auto_map"] == {"AutoProcessor": "processing_action_tokenizer.UniversalActionProcessor"}
    assert (cfg["scale"], cfg["vocab_size"], cfg["min_token"]) == (10, 1024, fast_h5.min_token)
    assert (cfg["time_horizon"], cfg["action_dim"]) == (5, 7)
    assert (
        json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    assert Tokenizer.from_file(str(out / "tokenizer.json")).to_str() == fast_h5.tokenizer.to_str()
    loaded = FastTokenizer.from_pretrained(out)
    chunks = np.stack(training_chunks(9, [(5, 7)], 20))  # (B, T, D)
    ids = fast_h5.encode(chunks)
    assert loaded.encode(chunks) == ids
    np.testing.assert_array_equal(loaded.decode(ids), fast_h5.decode(ids))
    assert loaded.table.alphabet_max == fast_h5.table.alphabet_max


def test_null_shape_config_roundtrip(tmp_path, fast_main):
    loaded = FastTokenizer.from_pretrained(fast_main.save_pretrained(tmp_path))
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert cfg["time_horizon"] is None and cfg["action_dim"] is None
    assert loaded.time_horizon is None and loaded.action_dim is None
    with pytest.raises(InputError, match="time_horizon and action_dim"):
        loaded.decode([[1, 2]])


def test_save_overwrites_without_temp_leftovers(tmp_path, fast_main, fast_h5):
    fast_main.save_pretrained(tmp_path)
    fast_h5.save_pretrained(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert FastTokenizer.from_pretrained(tmp_path).min_token == fast_h5.min_token


def test_fit_vocab_too_small():
    chunks = [np.linspace(-5, 5, 10)[:, None]]  # coefficients span far more than 16 values
    with pytest.raises(InputError, match="vocab_size 16 is too small"):
        FastTokenizer.fit(chunks, vocab_size=16)


@pytest.mark.parametrize(
    ("chunks", "match"),
    [
        ([np.full((5, 2), np.nan)], "NaN"),
        ([np.zeros((5,))], "shape"),
        (np.zeros((2, 2, 2, 2)), "shape"),
        ([], "no chunks"),
    ],
)
def test_fit_bad_chunks(chunks, match):
    with pytest.raises(InputError, match=match):
        FastTokenizer.fit(chunks)


def test_fit_bad_scale():
    with pytest.raises(InputError, match="scale"):
        FastTokenizer.fit([smooth_chunk(np.random.default_rng(0), 5, 2)], scale=0.0)
