"""libnora_edge's C++ tokenizer (kernels/src/edge/tokenizer.cpp) against HF ``tokenizers`` on the fixtures' files.

Data flow:
  tiny_ckpt / medium_ckpt tokenizer.json (export/text_tokenizer.py, as tests/conftest.py builds them) + a
  variant (ignore_merges on, the action tokens normalized=true) --``make -C kernels tok-check BUILD=<tmp>``-->
  tools/tok_check (one JSON string or ``hex:`` line in, one line of ids or ``ERR <status> <message>`` out)
  == ``tokenizers.Tokenizer.encode(s, add_special_tokens=False).ids`` (the reference the Python runtime uses,
  nora_edge/prompt.py) on >= 5,000 strings per tokenizer: NORA-style instructions, hand-picked edge cases,
  NFC/NFD pairs, seeded random Unicode, multi-line text. Strings holding a character unassigned in Unicode
  14.0 (Python 3.11's unicodedata, the same version as Debian 12's PCRE2 10.42 tables) must give status 5
  (UNSUPPORTED) naming it, and so must the 101 marks/composites added in Unicode 10-14 that HF's NFC (the
  unicode-normalization-alignments crate, pre-Unicode-10 tables) normalizes differently (re-derived here by
  probing HF's NFC against unicodedata, then checked against the C++ table); invalid UTF-8 gives status 1 (INPUT) with the byte offset; a tokenizer.json outside
  the implemented configuration gives LOAD_ERR 2 (BUNDLE) naming the field.
"""

from __future__ import annotations

import functools
import json
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, normalizers

from nora_edge.export.text_tokenizer import robot_instruction_corpus

from .conftest import make

ST_INPUT, ST_BUNDLE, ST_UNSUPPORTED = 1, 2, 5
MIN_COMPARED = 5000
# Sources: Unicode 14 WhiteSpace (PropList.txt) plus the controls/format characters Python's isspace differs on.
SPACES = "\t\n\x0b\x0c\r \x1c\x1d\x1e\x1f\x85\xa0\u1680\u180e\u2000\u2007\u200a\u200b\u2028\u2029\u202f\u205f\u3000\ufeff"
EDGE_CASES = [
    " ", "  ", "\n", "\r\n", "\n\n\n", " \n ", "\t\t", "a  b", "a \n b", "  leading", "trailing  ", "x\r\ny",
    "0", "12", "123456789", "3.14", "1,000", "v2.0", "٣٤٥", "Ⅻ", "½", "²", "১২৩",
    "it's", "IT'S", "we're", "They'RE", "I'll", "I'LL", "you've", "I'm", "he'd", "'s", "''s", "'ſ", "'K",
    "don't", "rock'n'roll", "'", "''", "' s",
    "!!!", "?!?", "...", "--", "a...b", "(x)", "[a]{b}", "#$%&", "a,b;c:d", "hi!\n\n", "??\r\n",
    "😀", "👍🏽", "👨‍👩‍👧", "🇺🇸", "robot 🤖 arm", "❤️", "☕ cup",
    "机器人", "拿起红色的方块", "日本語のテキスト", "한국어", "Привет мир", "مرحبا", "שלום", "ไทย", "हिन्दी",
    "e\u0301", "a\u0300\u0301", "\u0301", "Zalgo z\u0336\u0335a\u0337", "ﬁ", "Å", "Å", "ǅ", "ẞ", "ß",
    "\x00", "a\x00b", "\x7f", "\u200d", "\u200b\u200b", "\ufeffbom", "\ue000", "\U000f0000", "\U0010fffd",
    "<|im_start|>", "<|im_end|>", "a<|vision_start|>b", "<|image_pad|><|image_pad|>", "<robot_action_5>",
    "<robot_action_2047><robot_action_0>", "<robot_action_20470>", "<robot_action_", "<|im_start", "<|>",
    "<robot_action_1>\u0338", "x<tool_call>y", "<|endoftext|>\n", "<<|im_end|>>",
    "pick up the cup\nthen place it in the bowl", "Pick up the RED block!", "PUT THE CUP ON THE PLATE.",
]  # fmt: skip
NFC_NFD_WORDS = [
    "café",
    "Ångström",
    "naïve",
    "Tiếng Việt",
    "한국어",
    "résumé",
    "Ελληνικά",
    "Åland",
    "ñandú",
    "über",
]
INVALID_UTF8 = {  # bytes -> offset of the first bad byte
    b"\xc0\xaf": 0, b"abc\xed\xa0\x80": 3, b"\xf4\x90\x80\x80": 0, b"\xff": 0, b"ok \xe2\x82": 3, b"\x80": 0,
    b"pick\xf8\x88\x80\x80\x80": 4, b"\xe0\x80\x80": 0, b"a\xc3": 1, b"\xf0\x9f\x98": 0,
}  # fmt: skip


@functools.cache
def nfc_mismatches() -> frozenset[int]:
    """Code points whose NFC in HF ``tokenizers`` differs from Unicode 14's (unicodedata): every mark (ccc != 0)
    probed against a pre-U+0800 mark of each combining class in both orders, every canonical pair composed."""
    nfc = normalizers.NFC()
    cps = [
        cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000 and unicodedata.category(chr(cp)) != "Cn"
    ]
    marks = [cp for cp in cps if unicodedata.combining(chr(cp))]
    reps: dict[int, int] = {}
    for cp in marks:
        if cp < 0x800:
            reps.setdefault(unicodedata.combining(chr(cp)), cp)
    flag = set()
    for cp in marks:
        for r in reps.values():
            for s in (chr(cp) + chr(r), chr(r) + chr(cp)):
                if nfc.normalize_str(s) != unicodedata.normalize("NFC", s):
                    flag.add(cp)
    for cp in cps:
        d = unicodedata.decomposition(chr(cp))
        if nfc.normalize_str(chr(cp)) != unicodedata.normalize("NFC", chr(cp)):
            flag.add(cp)
        if d and not d.startswith("<"):
            parts = [int(x, 16) for x in d.split()]
            s = "".join(map(chr, parts))
            if nfc.normalize_str(s) != unicodedata.normalize("NFC", s):
                flag.update([*parts, cp])
    return frozenset(flag)


@pytest.fixture(scope="module")
def tok_check(edge_cxx_build: Path) -> Path:
    """tools/tok_check, optimised (the session's C++ driver build)."""
    return edge_cxx_build / "tok" / "tok_check"


def run_driver(exe: Path, tokenizer_json: Path, lines: list[str], tmp: Path) -> list[str]:
    """Write ``lines`` (already encoded: JSON literals or hex:...) and return the driver's output lines."""
    src = tmp / "strings.txt"
    src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    r = subprocess.run([str(exe), str(tokenizer_json), str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    out = r.stdout.split("\n")
    assert out[-1] == "" and len(out) == len(lines) + 1, (len(out), len(lines))
    return out[:-1]


def random_unicode(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` seeded strings of 1..40 code points (no surrogates) mixing ASCII, spaces, marks, digits, any plane."""
    assigned = [
        cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000 and unicodedata.category(chr(cp)) != "Cn"
    ]
    marks = [cp for cp in assigned[:0x10000] if unicodedata.category(chr(cp)) == "Mn"]
    digits = [cp for cp in assigned if unicodedata.category(chr(cp)) in ("Nd", "Nl", "No")]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(int(rng.integers(1, 41))):
            pool = rng.random()
            if pool < 0.3:
                chars.append(chr(int(rng.integers(0x20, 0x7F))))
            elif pool < 0.4:
                chars.append(SPACES[int(rng.integers(len(SPACES)))])
            elif pool < 0.5:
                chars.append(chr(marks[int(rng.integers(len(marks)))]))
            elif pool < 0.55:
                chars.append(chr(digits[int(rng.integers(len(digits)))]))
            elif pool < 0.6:
                chars.append("'" + "srtvmldSRTVMLD"[int(rng.integers(14))])
            else:  # any assigned code point, planes weighted by how much they assign
                chars.append(chr(assigned[int(rng.integers(len(assigned)))]))
        out.append("".join(chars))
    return out


def corpus(seed: int) -> dict[str, list[str]]:
    """The strings compared, by kind (all assigned in Unicode 14, valid UTF-8)."""
    rng = np.random.default_rng(seed)
    instr = robot_instruction_corpus(2000, seed=seed + 1000)
    styled = [
        s.upper() if i % 7 == 0 else s.capitalize() + "." if i % 3 == 0 else s for i, s in enumerate(instr)
    ]
    multi = []
    for _ in range(600):
        k = int(rng.integers(2, 5))
        seps = ["\n", "\r\n", "\n\n", " \n", "\n  ", "\t\n"]
        parts = [instr[int(rng.integers(len(instr)))] for _ in range(k)]
        multi.append("".join(p + seps[int(rng.integers(len(seps)))] for p in parts))
    pairs = []
    for w in NFC_NFD_WORDS:
        pairs += [unicodedata.normalize("NFC", w), unicodedata.normalize("NFD", w), f"the {w} cup"]
        pairs.append(unicodedata.normalize("NFD", f"pick up the {w}"))
    return {
        "instructions": styled,
        "edge": EDGE_CASES + [s * 3 for s in EDGE_CASES] + pairs,
        "random": random_unicode(rng, 3000),
        "multiline": multi,
    }


def variant(src: Path, dst: Path) -> Path:
    """The same tokenizer with ignore_merges on and the action tokens matched after NFC (normalized=true)."""
    data = json.loads(src.read_text(encoding="utf-8"))
    data["model"]["ignore_merges"] = True
    for t in data["added_tokens"]:
        if t["content"].startswith("<robot_action_"):
            t["normalized"] = True
    dst.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def tokenizer_files(tiny_ckpt, medium_ckpt, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tokjson")
    tiny = tiny_ckpt / "tokenizer.json"
    return {
        "tiny": tiny,
        "medium": medium_ckpt / "tokenizer.json",
        "tiny-variant": variant(tiny, tmp / "v.json"),
    }


@pytest.mark.parametrize("name", ["tiny", "medium", "tiny-variant"])
def test_ids_equal_hf(tok_check, tokenizer_files, name, tmp_path):
    path = tokenizer_files[name]
    hf = Tokenizer.from_file(str(path))
    kinds = corpus(seed=7)
    strings = [s for v in kinds.values() for s in v]
    got = run_driver(tok_check, path, [json.dumps(s) for s in strings], tmp_path)
    flagged = nfc_mismatches()
    refused = [any(ord(c) in flagged for c in s) for s in strings]
    kept = [s for s, r in zip(strings, refused, strict=True) if not r]
    want = iter(" ".join(map(str, e.ids)) for e in hf.encode_batch(kept, add_special_tokens=False))
    bad, n_cmp, n_ref = [], 0, 0
    for s, g, r in zip(strings, got, refused, strict=True):
        if r:
            n_ref += g.startswith(f"ERR {ST_UNSUPPORTED} ") and "pre-Unicode-10 NFC" in g
            continue
        w = next(want)
        n_cmp += 1
        if g != w:
            bad.append((s, g, w))
    assert not bad, f"{len(bad)} mismatches, first: {bad[:3]}"
    assert n_ref == sum(refused) and 0 < n_ref < 600, (n_ref, sum(refused))
    assert n_cmp == len(kept) >= MIN_COMPARED, n_cmp
    counts = {k: len(v) for k, v in kinds.items()}
    assert counts["random"] == 3000 and counts["instructions"] == 2000 and counts["multiline"] == 600
    # the normalizer: NFC and NFD spellings give the same ids
    nfc_nfd = {(unicodedata.normalize("NFC", w), unicodedata.normalize("NFD", w)) for w in NFC_NFD_WORDS}
    ids = dict(zip(strings, got, strict=True))
    assert sum(ids[a] == ids[b] for a, b in nfc_nfd) == len(nfc_nfd) == 10
    # the added tokens are matched in the text (HF's encode_special_tokens=False), both tries when normalized
    specials = Tokenizer.from_file(str(path)).get_added_tokens_decoder()
    hit = [s for s in kept if any(int(i) in specials for i in ids[s].split())]
    assert len(hit) >= 18, len(hit)
    # normalized=true (the variant's action tokens) are matched after NFC: ">" + U+0338 composes to U+226F
    action1 = str(hf.token_to_id("<robot_action_1>"))
    assert (action1 in ids["<robot_action_1>\u0338"].split()) == (name != "tiny-variant")


def test_unassigned_characters_refused(tok_check, tokenizer_files, tmp_path):
    # Python 3.11's unicodedata is the independent list of Unicode 14.0 assignments (PCRE2 10.42's tables).
    probe = run_driver(tok_check, tokenizer_files["tiny"], [json.dumps("\u0378")], tmp_path)[0]
    assert probe.startswith(f"ERR {ST_UNSUPPORTED} "), probe
    version = probe.split("Unicode ")[1].split(" ")[0]
    if version != unicodedata.unidata_version:
        pytest.skip(f"PCRE2 has Unicode {version}, Python's unicodedata {unicodedata.unidata_version}")
    newer = [
        "\U0001fae8",
        "\U0001f6dc",
        "\u0cf3",
        "\U00031350",
        "\U0002ebf0",
        "\u2ffc",
        "\U0001cc00",
        "\U00011f00",
    ]
    rng = np.random.default_rng(3)
    unassigned = [
        cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000 and unicodedata.category(chr(cp)) == "Cn"
    ]
    cps = [ord(c) for c in newer] + [unassigned[int(i)] for i in rng.integers(len(unassigned), size=300)]
    strings = [f"pick up the {chr(cp)} cup" if i % 2 else chr(cp) + "x" for i, cp in enumerate(cps)]
    got = run_driver(tok_check, tokenizer_files["tiny"], [json.dumps(s) for s in strings], tmp_path)
    for s, cp, line in zip(strings, cps, got, strict=True):
        at = len(s[: s.index(chr(cp))].encode())
        assert line.startswith(f"ERR {ST_UNSUPPORTED} instruction character U+{cp:04X} at byte {at} "), (
            s,
            line,
        )
        assert "unassigned" in line and "Unicode 14.0.0" in line
    assert len(got) == 308


def test_nfc_mismatch_table(tok_check, tokenizer_files, tmp_path):
    """The C++ refuses exactly the re-derived set among all marks and canonical-pair characters."""
    flagged = nfc_mismatches()
    assert len(flagged) == 101, len(flagged)
    probe = sorted(
        {cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000 and unicodedata.combining(chr(cp))}
        | {int(x, 16) for cp in range(0x110000) if not 0xD800 <= cp < 0xE000
           for x in unicodedata.decomposition(chr(cp)).split() if not x.startswith("<")}
        | flagged
    )  # fmt: skip
    got = run_driver(
        tok_check, tokenizer_files["tiny"], [json.dumps("a" + chr(cp)) for cp in probe], tmp_path
    )
    n = 0
    for cp, line in zip(probe, got, strict=True):
        is_refused = line.startswith(
            f"ERR {ST_UNSUPPORTED} instruction character U+{cp:04X} at byte 1 is normalized"
        )
        assert is_refused == (cp in flagged), (hex(cp), line)
        n += 1
    assert n == len(probe) > 1000


def test_invalid_utf8_refused(tok_check, tokenizer_files, tmp_path):
    got = run_driver(tok_check, tokenizer_files["tiny"], ["hex:" + b.hex() for b in INVALID_UTF8], tmp_path)
    for (raw, offset), line in zip(INVALID_UTF8.items(), got, strict=True):
        assert (
            line
            == f"ERR {ST_INPUT} instruction is not valid UTF-8: byte 0x{raw[offset]:02X} at offset {offset}"
        )
    # the hex path itself: valid bytes encode like the JSON string
    ok = run_driver(
        tok_check, tokenizer_files["tiny"], ["hex:" + "cup é".encode().hex(), '"cup é"'], tmp_path
    )
    assert ok[0] == ok[1] and ok[0]
    assert len(got) == len(INVALID_UTF8) == 10


def _mutations() -> list[tuple[str, object, str]]:
    """(name, mutation of the parsed tokenizer.json or a raw text, field the message must name)."""

    def setter(path: list, value):
        def f(d):
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value

        return f

    def drop_byte(d):
        del d["model"]["vocab"]["Ġ"]

    def bad_merge(d):
        d["model"]["merges"].append(["zzz_not_in_vocab", "a"])

    return [
        ("regex", setter(["pre_tokenizer", "pretokenizers", 0, "pattern"], {"Regex": r"\s+"}), "pattern"),
        ("behavior", setter(["pre_tokenizer", "pretokenizers", 0, "behavior"], "Removed"), "behavior"),
        (
            "prefix",
            setter(["pre_tokenizer", "pretokenizers", 1, "add_prefix_space"], True),
            "add_prefix_space",
        ),
        ("nfd", setter(["normalizer"], {"type": "NFD"}), "normalizer"),
        ("model", setter(["model", "type"], "WordPiece"), "model.type"),
        ("dropout", setter(["model", "dropout"], 0.1), "model.dropout"),
        ("unk", setter(["model", "unk_token"], "<unk>"), "model.unk_token"),
        ("byte_fallback", setter(["model", "byte_fallback"], True), "model.byte_fallback"),
        ("lstrip", setter(["added_tokens", 3, "lstrip"], True), "added_tokens[3].lstrip"),
        ("truncation", setter(["truncation"], {"max_length": 8}), "truncation"),
        ("padding", setter(["padding"], {"pad_id": 0}), "padding"),
        ("post", setter(["post_processor"], {"type": "TemplateProcessing"}), "post_processor"),
        ("byte", drop_byte, "byte 0x20"),
        ("merge", bad_merge, "zzz_not_in_vocab"),
        ("json", "{not json", "not valid JSON"),
    ]


def test_unsupported_tokenizer_json_refused(tok_check, tokenizer_files, tmp_path):
    base = tokenizer_files["tiny"].read_text(encoding="utf-8")
    (tmp_path / "one.txt").write_text('"cup"\n')
    n = 0
    for name, mutate, field in _mutations():
        if isinstance(mutate, str):
            text = mutate
        else:
            data = json.loads(base)
            mutate(data)
            text = json.dumps(data, ensure_ascii=False)
        p = tmp_path / f"{name}.json"
        p.write_text(text, encoding="utf-8")
        r = subprocess.run(
            [str(tok_check), str(p), str(tmp_path / "one.txt")], capture_output=True, text=True
        )
        assert r.returncode == 3 and r.stdout.startswith(f"LOAD_ERR {ST_BUNDLE} {p}: "), (name, r.stdout)
        assert field in r.stdout, (name, field, r.stdout)
        n += 1
    assert n == 15


@pytest.mark.slow
def test_driver_under_asan(tokenizer_files, tmp_path):
    """tools/tok_check under AddressSanitizer + UBSan on a small corpus (~60 s to build: marked slow)."""
    r = make("tok-check-asan", tmp_path / "b")
    assert r.returncode == 0, r.stdout + r.stderr
    exe = tmp_path / "b" / "tok-asan" / "tok_check"
    flagged = nfc_mismatches()
    texts = [s for v in corpus(seed=11).values() for s in v[:150] if not any(ord(c) in flagged for c in s)]
    strings = [json.dumps(s) for s in texts]
    lines = strings + ["hex:" + b.hex() for b in INVALID_UTF8] + [json.dumps("\u0378 x")]
    got = run_driver(exe, tokenizer_files["tiny-variant"], lines, tmp_path)
    hf = Tokenizer.from_file(str(tokenizer_files["tiny-variant"]))
    want = [" ".join(map(str, e.ids)) for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert got[: len(want)] == want
    assert [line.split(" ")[1] for line in got[len(want) :]] == ["1"] * len(INVALID_UTF8) + ["5"]
    assert len(want) >= 500, len(want)
