"""A Qwen2-style text tokenizer for NORA-format fixtures, trained offline on synthetic robot instructions.

Data flow: seed -> synthetic instruction corpus -> byte-level BPE (Qwen2 split regex, NFC, ByteLevel
pre-tokenizer/decoder) trained to at most ``base_vocab_size`` entries -> padded with unreachable filler
entries to exactly ``base_vocab_size`` -> the 22 Qwen special tokens (ids ``base .. base+21``) -> the
``<robot_action_i>`` tokens (ids contiguous right after) -> tokenizer.json, tokenizer_config.json,
added_tokens.json, vocab.json, merges.txt, chat_template.json in the checkpoint directory.

The layout mirrors Qwen2.5-VL + NORA: real Qwen has 151643 BPE entries, then the specials from 151643,
then NORA's 2048 action tokens from 151665.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from nora_edge import names
from nora_edge.errors import ExportError

# Qwen2's pre-tokenization regex (public; the same string transformers' Qwen2Tokenizer uses).
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen2.5 marks these added tokens as special; the tool/FIM tokens after them are plain added tokens.
_NUM_MARKED_SPECIAL = names.QWEN_SPECIAL_TOKENS.index("<|video_pad|>") + 1
FILLER_FORMAT = "<unused_bpe_{}>"  # never produced by a merge, so unreachable from text

# Our own chat template (Jinja). For one user message with an image then text and
# add_generation_prompt=True it renders exactly NORA's prompt (declare-lab/nora inference/nora.py applies the
# Qwen2.5-VL chat template to [image, instruction] with add_generation_prompt=True).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n' + default_system_prompt + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
).replace("default_system_prompt", repr(names.DEFAULT_SYSTEM_PROMPT))

_COLORS = ("red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink", "brown", "gray")
_OBJECTS = (
    "block", "cube", "bowl", "cup", "mug", "plate", "spoon", "fork", "knife", "sponge", "towel", "can",
    "bottle", "carrot", "banana", "apple", "lid", "pot", "pan", "drawer", "book", "marker", "ball", "toy",
)  # fmt: skip
_PLACES = (
    "in the bowl", "on the plate", "into the drawer", "on the table", "in the sink", "on the shelf",
    "next to the cup", "behind the pot", "in front of the mug", "on top of the book", "into the basket",
    "to the left of the pan", "to the right of the towel", "inside the box", "on the stove",
)  # fmt: skip
_TEMPLATES = (
    "pick up the {c} {o} and place it {p}",
    "put the {c} {o} {p}",
    "move the {o} {p}",
    "push the {c} {o} to the {side}",
    "open the {o}",
    "close the {o}",
    "stack the {c} {o} on the {c2} {o2}",
    "wipe the table with the {c} {o}",
    "turn on the stove and put the {o} on it",
    "grasp the {o} by its handle",
    "slide the {c} {o} {p}",
    "lift the {o} {n} centimeters",
    "rotate the {c} {o} {n} degrees",
    "Pick up the {o}, then place it {p}.",
)
_SIDES = ("left", "right", "front", "back", "edge")


def robot_instruction_corpus(n: int, seed: int) -> list[str]:
    """Generate ``n`` synthetic robot instructions ("pick up the red block and place it in the bowl").

    Args:
        n: number of sentences.
        seed: RNG seed; the corpus is a pure function of (n, seed).

    Returns:
        list of n strings.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        out.append(
            template.format(
                c=_COLORS[rng.integers(len(_COLORS))],
                c2=_COLORS[rng.integers(len(_COLORS))],
                o=_OBJECTS[rng.integers(len(_OBJECTS))],
                o2=_OBJECTS[rng.integers(len(_OBJECTS))],
                p=_PLACES[rng.integers(len(_PLACES))],
                side=_SIDES[rng.integers(len(_SIDES))],
                n=int(rng.integers(1, 360)),
            )
        )
    return out


def apply_qwen2_pipeline(tok: Tokenizer) -> Tokenizer:
    """Set Qwen2's normalizer (NFC), pre-tokenizer (split regex + ByteLevel) and decoder (ByteLevel)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _empty_bpe(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None) -> Tokenizer:
    model = BPE(
        vocab=vocab or {},
        merges=merges or [],
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    return apply_qwen2_pipeline(Tokenizer(model))


def train_base_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on ``corpus`` with at most ``vocab_size`` entries (256 bytes + merges).

    Returns:
        (vocab token -> id with ids 0..n-1, merges in rank order).
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet):
        raise ExportError(f"base vocab size {vocab_size} is smaller than the byte alphabet ({len(alphabet)})")
    tok = _empty_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def pad_vocab(vocab: dict[str, int], size: int) -> dict[str, int]:
    """Append unreachable filler entries (``<unused_bpe_i>``) so the BPE vocab has exactly ``size`` ids.

    The fillers are never the result of a merge and ``ignore_merges`` is off, so no text maps to them;
    they only make the id layout match the real Qwen vocabulary size.
    """
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ExportError("trained BPE vocab ids are not contiguous from 0")
    if len(vocab) > size:
        raise ExportError(f"trained BPE vocab has {len(vocab)} entries, more than the requested {size}")
    out = dict(vocab)
    i = 0
    while len(out) < size:
        filler = FILLER_FORMAT.format(i)
        if filler not in out:
            out[filler] = len(out)
        i += 1
    return out


def build_text_tokenizer(
    base_vocab_size: int,
    num_action_tokens: int = names.NUM_ACTION_TOKENS,
    *,
    seed: int = 0,
    corpus_size: int = 4000,
) -> Tokenizer:
    """Build the full fixture tokenizer: base BPE, 22 Qwen specials, then the action tokens.

    Args:
        base_vocab_size: BPE entries before the specials (Qwen2.5: 151643).
        num_action_tokens: number of ``<robot_action_i>`` tokens (NORA: 2048).
        seed: corpus seed.
        corpus_size: synthetic sentences to train on.

    Returns:
        a ``tokenizers.Tokenizer`` whose specials have ids ``base..base+21`` and action token i has id
        ``base + 22 + i``.

    Raises:
        ExportError: the ids did not come out in that layout.
    """
    corpus = robot_instruction_corpus(corpus_size, seed)
    vocab, merges = train_base_bpe(corpus, base_vocab_size)
    tok = _empty_bpe(pad_vocab(vocab, base_vocab_size), merges)
    specials = [
        AddedToken(t, special=i < _NUM_MARKED_SPECIAL, normalized=False)
        for i, t in enumerate(names.QWEN_SPECIAL_TOKENS)
    ]
    tok.add_special_tokens(specials)
    actions = [names.ACTION_TOKEN_FORMAT.format(i) for i in range(num_action_tokens)]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in actions])
    check_id_layout(tok, base_vocab_size, num_action_tokens)
    return tok


def check_id_layout(tok: Tokenizer, base: int, num_action_tokens: int) -> None:
    """Raise ExportError unless specials sit at base.. and action tokens right after them."""
    expected = {t: base + i for i, t in enumerate(names.QWEN_SPECIAL_TOKENS)}
    first_action = base + len(names.QWEN_SPECIAL_TOKENS)
    expected.update({names.ACTION_TOKEN_FORMAT.format(i): first_action + i for i in range(num_action_tokens)})
    for token, want in expected.items():
        got = tok.token_to_id(token)
        if got != want:
            raise ExportError(f"tokenizer id layout: {token} has id {got}, expected {want}")
    if tok.get_vocab_size(with_added_tokens=True) != first_action + num_action_tokens:
        raise ExportError(
            f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids, expected {first_action + num_action_tokens}"
        )


def _added_token_entry(tok: AddedToken) -> dict:
    return {
        "content": tok.content,
        "lstrip": tok.lstrip,
        "normalized": tok.normalized,
        "rstrip": tok.rstrip,
        "single_word": tok.single_word,
        "special": tok.special,
    }


def tokenizer_config(tok: Tokenizer) -> dict:
    """tokenizer_config.json for transformers' Qwen2Tokenizer (eos <|im_end|>, pad <|endoftext|>)."""
    decoder = {str(i): _added_token_entry(t) for i, t in sorted(tok.get_added_tokens_decoder().items())}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(names.QWEN_SPECIAL_TOKENS[1:_NUM_MARKED_SPECIAL]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_json(path: Path, data: dict) -> None:
    """Write JSON deterministically (sorted keys where order carries no meaning is left to the caller)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(tok: Tokenizer, out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, added_tokens.json, vocab.json, merges.txt, chat_template.json."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / names.TOKENIZER_JSON), pretty=True)
    write_json(out / names.TOKENIZER_CONFIG, tokenizer_config(tok))
    added = {t.content: i for i, t in sorted(tok.get_added_tokens_decoder().items())}
    write_json(out / names.ADDED_TOKENS, added)
    model = json.loads(tok.to_str())["model"]
    write_json(out / "vocab.json", model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    write_json(out / names.CHAT_TEMPLATE, {"chat_template": CHAT_TEMPLATE})
