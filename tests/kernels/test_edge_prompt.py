"""libnora_edge's prompt assembly and mrope positions (kernels/src/edge/prompt.cpp) against nora_edge/prompt.py.

Data flow:
  tiny_ckpt_h5 --export_bundle--> bundle: tokenizer.json + manifest prompt pieces, and NoraPolicy.load(bundle)
  .prompt (the runtime's PromptBuilder: forbidden ids = added tokens + action ids, merge size, max tokens)
  -> cases (instruction text of many kinds x grids x piece variants, plus every refusal) as JSON lines
  --``make -C kernels prompt-check BUILD=<tmp>``--> tools/prompt_check (instruction text --C++ tokenizer-->
  ids --PromptBuilder::build--> input_ids, position_ids, rope_delta, image_start, num_image_tokens; decode
  positions) == nora_edge.prompt.PromptBuilder(...).build + decode_position_ids (the reference the Python
  runtime uses, itself checked against transformers' get_rope_index by tests/runtime/test_prompt.py), exactly;
  every InputError of the Python builder == ``ERR 1`` with the same message; manifest pieces Python fails on for
  every prompt == ``ERR 2``. The ASan/UBSan driver runs a small case file (slow: the sanitized build ~1 min).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from nora_edge.errors import InputError
from nora_edge.export.text_tokenizer import robot_instruction_corpus
from nora_edge.prompt import PromptBuilder, decode_position_ids

from .conftest import make

ST_INPUT, ST_BUNDLE = 1, 2
MIN_COMPARED = 300
GRIDS = [
    (1, 16, 16),
    (1, 12, 20),
    (1, 18, 22),
    (2, 8, 8),
    (1, 4, 4),
    (1, 2, 3),
    (1, 2, 5),
]  # last two: floor rule
INSTRUCTIONS = [
    "pick up the cup", "Pick up the RED block!", "PUT THE CUP ON THE PLATE.", "  leading and trailing  ",
    "pick up the cup\nthen place it in the bowl", "line one\r\nline two\n\nline four", "\tindented\ttabs",
    "拿起红色的方块", "日本語のテキスト", "Привет мир, возьми чашку", "مرحبا", "naïve café résumé", "e\u0301",
    "robot 🤖 arm", "👨‍👩‍👧 family", "it's the robot's cup", "1,000 items at 3.14", "a", "?", "x\u3000y",
    "\u00a0nbsp at start", "move 5cm left; then 10° up", "ﬁ ligature", "\u200bzero-width", "<|im_start", "<|>",
]  # fmt: skip
BLANK = [
    "",
    " ",
    "\n",
    "\t\r\n ",
    "\u3000",
    "\u00a0\u2028\u2029\u205f",
    "\x1c\x1d\x1e\x1f\x85",
    "\u2000\u200a",
]


class Build:
    """The session's C++ driver build (tests/kernels/conftest.py: edge_cxx_build)."""

    def __init__(self, build: Path) -> None:
        self.build = build

    def exe(self) -> Path:
        """tools/prompt_check, optimised."""
        return self.build / "prompt" / "prompt_check"


@pytest.fixture(scope="module")
def drivers(edge_cxx_build: Path) -> Build:
    return Build(edge_cxx_build)


@pytest.fixture(scope="module")
def bundle(tiny_bundle_h5: Path) -> dict:
    """The session fixture bundle's tokenizer path, HF tokenizer and the runtime's PromptBuilder."""
    from nora_edge.policy import NoraPolicy

    path = tiny_bundle_h5
    manifest = json.loads((path / "manifest.json").read_text())
    tok_path = path / manifest["prompt"]["tokenizer"]
    builder = NoraPolicy.load(path).prompt
    return {"tokenizer_json": tok_path, "tokenizer": Tokenizer.from_file(str(tok_path)), "builder": builder}


def base_case(b: PromptBuilder, instruction: str, grid, **over) -> dict:
    """A case with the runtime builder's pieces, overridden by ``over``."""
    case = {
        "instruction": instruction,
        "grid": [int(v) for v in np.ravel(grid)],
        "merge": b.spatial_merge_size,
        "prefix": [int(i) for i in b.prefix_ids],
        "suffix": [int(i) for i in b.suffix_ids],
        "image_pad": b.image_pad_id,
        "vision_end": b.vision_end_id,
        "max_instruction_tokens": b.max_instruction_tokens,
        "forbidden": sorted(int(i) for i in b.forbidden_ids),
        "decode_at": [],
    }
    case.update(over)
    return case


def reference(case: dict, tokenizer: Tokenizer) -> dict | Exception:
    """nora_edge.prompt's answer for a case: the output dict, or the exception it raises."""
    try:
        b = PromptBuilder(
            tuple(case["prefix"]), case["image_pad"], case["vision_end"], tuple(case["suffix"]), tokenizer,
            case["merge"], max_instruction_tokens=case["max_instruction_tokens"],
            forbidden_ids=frozenset(case["forbidden"]),
        )  # fmt: skip
        p = b.build(case["instruction"], np.asarray(case["grid"], dtype=np.int64).reshape(-1, 3))
    except Exception as e:  # noqa: BLE001 - the reference's refusal, whatever its type, is what is compared
        return e
    out = {
        "input_ids": p.input_ids.tolist(),
        "position_ids": p.position_ids[:, 0, :].tolist(),
        "rope_delta": p.rope_delta,
        "image_start": p.image_start,
        "num_image_tokens": p.num_image_tokens,
        "decode_positions": [
            decode_position_ids(at, p.rope_delta)[:, 0, 0].tolist() for at in case["decode_at"]
        ],
    }
    if case["decode_at"]:
        out["decode_run"] = decode_position_ids(case["decode_at"][0], p.rope_delta, 4)[:, 0, :].tolist()
    return out


def run_cases(exe: Path, tokenizer_json: Path, cases: list[dict], tmp: Path) -> list[str]:
    src = tmp / "cases.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in cases), encoding="utf-8")
    r = subprocess.run([str(exe), str(tokenizer_json), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout.split("\n")
    assert out[-1] == "" and len(out) == len(cases) + 1, (len(out), len(cases))
    return out[:-1]


def valid_cases(b: PromptBuilder) -> list[dict]:
    """>= 300 accepted prompts: instructions x grids x piece variants, decode positions after each."""
    texts = INSTRUCTIONS + robot_instruction_corpus(60, seed=16)
    rng = np.random.default_rng(16)
    cases = []
    for i, text in enumerate(texts):
        for j, grid in enumerate(GRIDS):
            if (i + j) % 2 and grid not in GRIDS[:4]:
                continue
            over = {"decode_at": [int(v) for v in rng.integers(0, 60, 3)]}
            if (i + j) % 5 == 1:
                over["prefix"] = []  # image right at the start
            if (i + j) % 7 == 2:
                over["suffix"] = [int(v) for v in rng.integers(3, 200, 4)]
            if (i + j) % 11 == 3:
                over["merge"] = 1
            cases.append(base_case(b, text, grid, **over))
    for c in cases:  # decode indices at/after the prompt, as generate.py feeds them
        n = len(c["prefix"]) + len(c["suffix"]) + 1 + 600
        c["decode_at"] = [n + d for d in c["decode_at"]]
    return cases


def refusal_cases(b: PromptBuilder) -> tuple[list[dict], list[dict]]:
    """(caller-input refusals Python raises InputError for, manifest pieces Python fails every build on)."""
    inp = [base_case(b, t, (1, 16, 16)) for t in BLANK]
    long_text = "pick up the red block and place it in the bowl " * 3
    inp += [base_case(b, long_text, (1, 16, 16), max_instruction_tokens=k) for k in (1, 5, 20)]
    inp += [
        base_case(b, "pick up the cup " * 40 + "\u00e9\n", g, max_instruction_tokens=30) for g in GRIDS[:2]
    ]
    inp += [base_case(b, t, (1, 16, 16)) for t in ("<|im_start|>", "a<|vision_start|>b", "<|image_pad|>x")]
    inp += [base_case(b, "<robot_action_5> and <|im_end|> <|endoftext|>", (1, 16, 16))]
    inp += [base_case(b, "'quoted' \"both\" \\ back", (1, 8, 8), max_instruction_tokens=2)]
    inp += [base_case(b, "it's <|im_end|>", (1, 8, 8))]
    specials = (
        "<|im_start|><|im_end|><|vision_start|><|vision_end|><|image_pad|><|endoftext|><robot_action_0>"
    )
    inp += [base_case(b, specials, (1, 16, 16))]  # more than 5 forbidden ids: the first 5 named
    inp += [base_case(b, t, (1, 16, 16), max_instruction_tokens=3) for t in ("日本語のテキスト。\n" * 20,
            "\u00a0pick\u2028up\x7f", "e\u0301" * 70, "tab\there 'and\" quote")]  # fmt: skip
    first = int(b.tokenizer.encode("pick up the cup", add_special_tokens=False).ids[0])
    inp += [base_case(b, "pick up the cup", (1, 16, 16), forbidden=[first, first + 1])]
    bad_grids = [
        [1, 16, 16, 1, 8, 8],
        [],
        [1, 15, 16],
        [1, 3, 3],
        [1, 0, 16],
        [0, 16, 16],
        [1, 16, 9],
        [3, 5, 5],
    ]
    inp += [base_case(b, "pick up the cup", g) for g in bad_grids]
    inp += [base_case(b, "\u3000", [1, 16, 16, 1, 8, 8])]  # instruction refused before the grid, as in Python
    man = [
        base_case(b, "pick up the cup", (1, 16, 16), merge=0),
        base_case(b, "pick up the cup", (1, 16, 16), max_instruction_tokens=0),
        base_case(b, "pick up the cup", (1, 16, 16), vision_end=b.image_pad_id),
        base_case(b, "pick up the cup", (1, 16, 16), prefix=[1, b.image_pad_id, 2]),
        base_case(b, "pick up the cup", (1, 16, 16), prefix=[1, b.image_pad_id]),
        base_case(b, "pick up the cup", (1, 16, 16), suffix=[b.image_pad_id]),
    ]
    return inp, man


def test_prompt_equals_python(drivers, bundle, tmp_path):
    b, tok = bundle["builder"], bundle["tokenizer"]
    cases = valid_cases(b)
    inp, man = refusal_cases(b)
    lines = run_cases(drivers.exe(), bundle["tokenizer_json"], cases + inp + man, tmp_path)
    compared = positions = 0
    for case, line in zip(cases, lines[: len(cases)], strict=True):
        ref = reference(case, tok)
        assert not isinstance(ref, Exception), (case, ref)
        assert not line.startswith("ERR"), (case, line)
        assert json.loads(line) == ref, case
        compared += 1
        positions += 3 * len(ref["input_ids"])
    assert compared == len(cases) >= MIN_COMPARED, compared
    grids = {tuple(c["grid"]) for c in cases}
    assert {(1, 16, 16), (1, 12, 20), (1, 18, 22), (2, 8, 8)} <= grids
    assert positions > 300 * 3 * 60
    n_input = 0
    for case, line in zip(inp, lines[len(cases) : len(cases) + len(inp)], strict=True):
        ref = reference(case, tok)
        assert isinstance(ref, InputError), (case, ref)
        assert line == f"ERR {ST_INPUT} {ref}", (case, line)
        n_input += 1
    n_man = 0
    for case, line in zip(man, lines[len(cases) + len(inp) :], strict=True):
        ref = reference(case, tok)
        # Python refuses at build time (InputError from rope_index, ZeroDivisionError for merge 0)
        assert isinstance(ref, Exception), (case, ref)
        assert line.startswith(f"ERR {ST_BUNDLE} manifest prompt: "), (case, line)
        n_man += 1
    assert n_input == len(inp) >= 30 and n_man == 6


def test_refusals_python_does_not_name(drivers, bundle, tmp_path):
    """Grids Python cannot handle (negative: numpy ValueError) are INPUT errors naming the grid; a huge one too."""
    b = bundle["builder"]
    cases = [base_case(b, "pick up the cup", g) for g in ([1, -4, 4], [1, 1 << 20, 1 << 20])]
    lines = run_cases(drivers.exe(), bundle["tokenizer_json"], cases, tmp_path)
    assert isinstance(reference(cases[0], bundle["tokenizer"]), ValueError)
    for line, g in zip(lines, ("h=-4", "h=1048576"), strict=True):
        assert line.startswith(f"ERR {ST_INPUT} image grid (t=1, {g}"), line


@pytest.mark.slow
def test_prompt_check_asan(bundle, tmp_path_factory, tmp_path):
    """The driver under AddressSanitizer + UBSan (leaks checked) on a small case file: same lines as plain."""
    build = tmp_path_factory.mktemp("promptasan")
    r = make("prompt-check-asan", build, "-j2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    b = bundle["builder"]
    inp, man = refusal_cases(b)
    valid = valid_cases(b)[::25]
    cases = valid + inp + man
    lines = run_cases(build / "prompt-asan" / "prompt_check", bundle["tokenizer_json"], cases, tmp_path)
    n = 0
    for k, (case, line) in enumerate(zip(cases, lines, strict=True)):
        ref = reference(case, bundle["tokenizer"])
        if k < len(valid):
            assert json.loads(line) == ref, case
        elif k < len(valid) + len(inp):
            assert line == f"ERR {ST_INPUT} {ref}", case
        else:
            assert isinstance(ref, Exception) and line.startswith(f"ERR {ST_BUNDLE} "), case
        n += 1
    assert n == len(cases) >= 50
