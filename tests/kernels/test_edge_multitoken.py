"""libnora_edge's multi-token decoding (kernels/src/edge/multitoken.cpp, drafts.cpp; nora_fast.h 1.2's
admissible / gap) against the Python runtime it ports (nora_edge/multitoken.py, nora_edge/drafts.py).

Data flow: ``make -C kernels runtime`` --> libnora_edge.so --ctypes (nora_edge.edge_policy)--> one policy per
decoding on the tiny trained checkpoint exported fused with ``multi_token=True`` and calibration frames (so the
bundle ships ``drafts.json``), next to the Python ``MultiTokenRunner`` (plain and multi-token loops of one
NoraPolicy) on the same frames: over a parity set run twice (the second pass drafts from the first) C multi-token
ids == C plain ids == Python plain ids, and the C decode-loop counters (decoder calls, verify calls, proposed,
accepted, fallback) == Python's ``MultiTokenStats`` chunk by chunk from the same fresh draft-table state: seeded
from the bundle's drafts.json (``nora_edge.drafts.read_drafts`` + ``DraftTable.seed``, what ``NoraPolicy.load``
starts from), or empty with ``bundle_drafts`` off (``MultiTokenConfig(bundle_drafts=False)``); malformed draft
files and sections against Python's errors; option errors; the example program. The pieces (draft table,
libnora_fast's automaton walk / top-2 gaps) are checked on their own in test_edge_multitoken_pieces.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nora_edge.bundle import DRAFTS, Bundle
from nora_edge.drafts import DRAFTS_FORMAT, DraftTable, read_drafts
from nora_edge.edge_policy import EdgePolicy, _ChunkInfo, _Options, load_library, wheel_onnxruntime
from nora_edge.errors import BundleError, InputError
from nora_edge.multitoken import CPU_HOST, MultiTokenConfig, MultiTokenRunner
from tests.synthetic_pairs import held_out_pairs

from .conftest import KERNELS

PARITY = held_out_pairs(12, seed=11)
COUNTERS = ("decoder_calls", "verify_calls", "proposed", "accepted", "fallback")
CALIB = 6  # calibration frames the module bundle's drafts.json is built from (seed 7, not the parity set's)


def calibration(seed: int, n: int) -> list:
    """(frame, instruction) samples of the trained fixture's task, as tests/export/test_multi_token_export.py."""
    from nora_edge.export.quantize import CalibrationSample
    from nora_edge.export.quantize.calibration import synthetic_frame
    from nora_edge.export.synthetic_task import instruction_list

    rng, texts = np.random.default_rng(seed), instruction_list()
    return [CalibrationSample(synthetic_frame(rng), texts[i % len(texts)]) for i in range(n)]


def fresh_table(bundle: Path, seeded: bool) -> DraftTable:
    """The Python draft table a fresh multi-token policy starts from: the bundle's drafts.json seeded in file
    order (MultiTokenDecoding.seed_from), or empty (``MultiTokenConfig(bundle_drafts=False)``)."""
    table = DraftTable()
    if seeded:
        b = Bundle.load(bundle, verify=False)
        assert table.seed(read_drafts(b.file(DRAFTS), b.embeddings["shape"][0])) == CALIB
    return table


@pytest.fixture(scope="module")
def mt_bundle(tiny_trained_ckpt_h5: Path, tmp_path_factory) -> Path:
    """The trained tiny checkpoint exported fused with the logits_all output (``--multi-token``)."""
    from nora_edge.export.pipeline import export_bundle
    from nora_edge.export.synthetic_task import instruction_list

    out = tmp_path_factory.mktemp("edgemt") / "fused_mt"
    return export_bundle(
        tiny_trained_ckpt_h5, out, decoder_graph="fused", multi_token=True, progress=False,
        validation_prompts=4, validation_instructions=instruction_list(), calibration=calibration(7, CALIB),
    )  # fmt: skip


@pytest.fixture(scope="module")
def runner(mt_bundle: Path) -> MultiTokenRunner:
    """The Python reference; its table starts as fresh_table(seeded=True) (checked here, before any chunk)."""
    r = MultiTokenRunner.load(mt_bundle, threads=1, forced_tokens="flag")
    want = fresh_table(mt_bundle, True)
    assert (
        r.policy.multi_token.seeded == CALIB and r.drafts.by_key == want.by_key and r.drafts.any == want.any
    )
    return r


def _edge(lib: Path, bundle: Path, **kw) -> EdgePolicy:
    return EdgePolicy.load(bundle, library=lib, threads=1, forced_tokens="flag", **kw)


def _py_counters(stats) -> dict:
    return {k: v for k, v in stats.to_json().items() if k in COUNTERS}


def run_both(
    lib: Path, bundle: Path, runner: MultiTokenRunner, pairs, bundle_drafts=True, **cfg
) -> list[dict]:
    """C and Python multi-token chunks with settings ``cfg`` (MultiTokenConfig's names) on the same sequence,
    both from a fresh draft table (seeded from the bundle's drafts.json unless ``bundle_drafts`` is off)."""
    edge = _edge(lib, bundle, decoding="multi-token", bundle_drafts=bundle_drafts, **cfg)
    runner.drafts = fresh_table(bundle, bundle_drafts)
    out = []
    for image, text in pairs:
        c = edge.step(image, text)
        res, stats, _ = runner.multitoken(image, text, **cfg)
        out.append({"c": c, "py_ids": res.ids.tolist(), "py": _py_counters(stats)})
    return out


def test_multi_token_ids_and_decoder_calls_equal_the_python_runtime(edge_runtime, mt_bundle, runner):
    """Parity set twice: C multi == C plain == Python plain ids; C counters == Python's chunk by chunk."""
    pairs = PARITY + PARITY
    plain = _edge(edge_runtime, mt_bundle)
    runs = run_both(edge_runtime, mt_bundle, runner, pairs)  # the defaults: fixed K = 6, no gate
    n = {"chunks": 0, "ids": 0, "plain_calls": 0, "multi_calls": 0, "verify": 0, "accepted": 0}
    for (image, text), r in zip(pairs, runs, strict=True):
        p = plain.step(image, text)
        py_plain, _ = runner.plain(image, text)
        m = r["c"]
        assert m.ids.tolist() == p.ids.tolist() == py_plain.ids.tolist() == r["py_ids"], text
        assert m.token_classes == p.token_classes
        np.testing.assert_array_equal(m.actions, p.actions)  # same ids -> the same decode, bit for bit
        assert m.counters == r["py"], text
        assert p.counters == {"decoder_calls": p.ids.size - 1, "verify_calls": 0, "proposed": 0, "accepted": 0,
                              "fallback": False}  # fmt: skip
        n["chunks"] += 1
        n["ids"] += m.ids.size
        n["plain_calls"] += p.counters["decoder_calls"]
        n["multi_calls"] += m.counters["decoder_calls"]
        n["verify"] += m.counters["verify_calls"]
        n["accepted"] += m.counters["accepted"]
    assert n["chunks"] == 2 * len(PARITY) == 24 and n["ids"] >= n["chunks"]
    assert n["verify"] >= len(PARITY) and n["accepted"] >= 1
    assert n["multi_calls"] < n["plain_calls"], n


def test_a_huge_tie_margin_falls_back_on_every_drafted_chunk(edge_runtime, mt_bundle, runner):
    """tie_margin 1e30: every chunk that used a verify call is re-decoded plainly (flagged fallback); the ids
    are still the plain loop's and the calls Python's, with the acceptance gate (gate_rate 0.2) closing on the
    rejected drafts."""
    pairs = PARITY[:6] * 3
    plain = _edge(edge_runtime, mt_bundle)
    runs = run_both(edge_runtime, mt_bundle, runner, pairs, tie_margin=1e30, gate_rate=0.2)
    fallbacks = 0
    for (image, text), r in zip(pairs, runs, strict=True):
        m = r["c"]
        assert m.ids.tolist() == plain.step(image, text).ids.tolist() == r["py_ids"], text
        assert m.counters == r["py"], text
        assert m.counters["fallback"] == (m.counters["verify_calls"] > 0)
        fallbacks += m.counters["fallback"]
    assert len(runs) == 18 and fallbacks >= 6, fallbacks
    # the rejected drafts closed some instruction's gate (Python's table; the C counters equal it per chunk)
    assert any(r[2] > 0 for r in runner.drafts.rate.values())


def test_cpu_host_settings_and_guard_off_equal_the_python_runtime(edge_runtime, mt_bundle, runner):
    """Adaptive K and the gate (Python's CPU_HOST settings) with max_draft 3, and with the guard off."""
    cfg = {"gate_rate": CPU_HOST.gate_rate, "adaptive_draft": CPU_HOST.adaptive_draft, "max_draft": 3}
    runs = run_both(edge_runtime, mt_bundle, runner, PARITY[:6] * 2, **cfg)
    runs += run_both(edge_runtime, mt_bundle, runner, PARITY[:6] * 2, tie_margin=None, **cfg)
    for r in runs:
        assert r["c"].ids.tolist() == r["py_ids"] and r["c"].counters == r["py"]
    assert sum(r["c"].counters["verify_calls"] for r in runs) >= 12 and len(runs) == 24


def test_option_errors_name_the_field_and_old_callers_get_the_defaults(
    edge_runtime, mt_bundle, fused_trained_bundle
):
    for bad in (0, 33):
        with pytest.raises(InputError, match=f"max_draft must be in \\[1, 32\\], got {bad}"):
            _edge(edge_runtime, mt_bundle, decoding="multi-token", max_draft=bad)
    with pytest.raises(InputError, match="decoding must be one of"):
        _edge(edge_runtime, mt_bundle, decoding="speculative")
    lib = load_library(edge_runtime)
    h = ctypes.c_void_p()
    for field, value, text in (("decoding", 2, "decoding must be NORA_EDGE_DECODE_PLAIN"),
                               ("tie_margin", math.nan, "tie_margin must be a finite number"),
                               ("tie_margin", math.inf, "tie_margin must be a finite number"),
                               ("gate_rate", 1.5, "gate_rate must be a number in [0, 1]"),
                               ("gate_rate", math.nan, "gate_rate must be a number in [0, 1]"),
                               ("adaptive_draft", 2, "adaptive_draft must be 0 or 1"),
                               ("bundle_drafts", 2, "bundle_drafts must be 0 or 1, got 2"),
                               ("bundle_drafts", -1, "bundle_drafts must be 0 or 1, got -1")):  # fmt: skip
        opts = _Options()
        lib.nora_policy_options_init(ctypes.byref(opts))
        opts.onnxruntime_path = str(wheel_onnxruntime()).encode()
        setattr(opts, field, value)
        assert lib.nora_policy_create(str(mt_bundle).encode(), ctypes.byref(opts), ctypes.byref(h)) == 1
        assert text in lib.nora_edge_last_error().decode() and not h.value
    # multi-token on a bundle exported without logits_all: a BundleError naming the output and the flag,
    # as the Python runtime's
    with pytest.raises(BundleError, match=r"no output 'logits_all'.*--multi-token"):
        _edge(edge_runtime, fused_trained_bundle, decoding="multi-token")
    with pytest.raises(BundleError, match="logits_all"):
        MultiTokenRunner.load(fused_trained_bundle, threads=1)
    # an ABI 0.3 caller: smaller options (garbage behind them) -> plain decoding; its chunk info accepted
    opts = _Options()
    lib.nora_policy_options_init(ctypes.byref(opts))
    opts.struct_size, opts.onnxruntime_path, opts.threads = (
        _Options.decoding.offset,
        str(wheel_onnxruntime()).encode(),
        1,
    )
    opts.decoding, opts.max_draft, opts.tie_margin, opts.gate_rate, opts.adaptive_draft = (
        99,
        -4,
        math.nan,
        7.0,
        5,
    )
    assert lib.nora_policy_create(str(mt_bundle).encode(), ctypes.byref(opts), ctypes.byref(h)) == 0
    edge = EdgePolicy(lib, h)
    image, text = PARITY[0]
    info = _ChunkInfo(struct_size=_ChunkInfo.decoder_calls.offset)
    info.decoder_calls = -7
    acts = np.empty((edge.time_horizon, edge.action_dim))
    ids = np.zeros(edge.max_tokens, np.int64)
    rc = lib.nora_policy_step(
        h,
        image.ctypes.data,
        *image.shape[:2],
        image.strides[0],
        text.encode(),
        None,
        acts.ctypes.data,
        acts.size,
        ids.ctypes.data,
        None,
        ids.size,
        ctypes.byref(info),
    )
    assert rc == 0 and info.num_tokens >= 1 and info.decoder_calls == -7  # the 0.4 fields left alone
    assert ids[: info.num_tokens].tolist() == edge.step(image, text).ids.tolist()
    info.struct_size = 12
    assert (
        lib.nora_policy_step(
            h,
            image.ctypes.data,
            *image.shape[:2],
            image.strides[0],
            text.encode(),
            None,
            acts.ctypes.data,
            acts.size,
            None,
            None,
            0,
            ctypes.byref(info),
        )
        == 1
    )
    assert "info.struct_size 12" in lib.nora_edge_last_error().decode()
    edge.close()


def test_bundle_drafts_off_equals_python_unseeded_and_seeding_saves_calls(edge_runtime, mt_bundle, runner):
    """Two calibration frames then parity frames, each run from a fresh policy: bundle_drafts on (the default) and
    off, C == Python chunk by chunk, with Python's off table what ``MultiTokenConfig(bundle_drafts=False)``
    loads. The first chunk (a frame the draft file was built from) makes fewer decoder calls seeded than not;
    unseeded it is the plain loop's one call per token. An ABI 0.4 caller (its struct_size, padding included,
    garbage behind) gets the seeded default."""
    off = MultiTokenRunner.load(
        mt_bundle, threads=1, forced_tokens="flag", multi_token=MultiTokenConfig(bundle_drafts=False)
    )
    assert off.policy.multi_token.seeded == 0 and off.drafts.by_key == {} and off.drafts.any == {}
    pairs = [(s.image, s.instruction) for s in calibration(7, 2)] + PARITY[:4]
    runs = {
        True: run_both(edge_runtime, mt_bundle, runner, pairs),
        False: run_both(edge_runtime, mt_bundle, off, pairs, False),
    }
    compared = 0
    for i in range(len(pairs)):
        on, no = runs[True][i], runs[False][i]
        assert on["c"].ids.tolist() == no["c"].ids.tolist() == on["py_ids"] == no["py_ids"], i
        assert on["c"].counters == on["py"] and no["c"].counters == no["py"], i
        compared += 1
    first_on, first_off = runs[True][0]["c"], runs[False][0]["c"]
    plain_first = {"decoder_calls": first_off.ids.size - 1, "verify_calls": 0, "proposed": 0, "accepted": 0,
                   "fallback": False}  # fmt: skip
    assert first_off.counters == plain_first and first_on.counters["proposed"] > 0
    assert first_on.counters["decoder_calls"] < first_off.counters["decoder_calls"], (first_on, first_off)
    assert compared == 6
    # an ABI 0.4 caller: its struct (tail padding included) ends before reserved0's successor
    fields_04 = [f for f in _Options._fields_ if f[0] not in ("reserved0", "bundle_drafts")]
    size_04 = ctypes.sizeof(type("_Options04", (ctypes.Structure,), {"_fields_": fields_04}))
    assert _Options.reserved0.offset < size_04 <= _Options.bundle_drafts.offset
    lib = load_library(edge_runtime)
    opts = _Options()
    lib.nora_policy_options_init(ctypes.byref(opts))
    assert opts.bundle_drafts == 1
    opts.onnxruntime_path, opts.threads = str(wheel_onnxruntime()).encode(), 1
    opts.forced_tokens, opts.decoding = 1, 1
    opts.struct_size, opts.reserved0, opts.bundle_drafts = size_04, 0x5A5A, 7  # not read
    h = ctypes.c_void_p()
    assert lib.nora_policy_create(str(mt_bundle).encode(), ctypes.byref(opts), ctypes.byref(h)) == 0, (
        lib.nora_edge_last_error()
    )
    with EdgePolicy(lib, h) as old:
        assert old.step(*pairs[0]).counters == first_on.counters


def _tampered(src: Path, dst: Path, drafts: str | None = None, section=...) -> Path:
    """``src`` copied to ``dst`` with drafts.json's text and / or the manifest's "drafts" section replaced; the
    manifest lists the new file's size and sha256, so only the content is wrong."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    if drafts is not None:
        data = drafts.encode()
        (dst / DRAFTS).write_bytes(data)
        manifest["files"][DRAFTS].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    if section is not ...:
        manifest["drafts"] = section
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def test_malformed_drafts_are_bundle_errors_like_pythons(edge_runtime, mt_bundle, tmp_path):
    """A bundle copy (hashes updated) whose drafts.json or "drafts" section is wrong: nora_policy_create is a
    BundleError with Python's message after the file name (read_drafts; NoraPolicy.load for the section);
    bundle_drafts off (C and Python) or plain decoding never read the file."""
    from nora_edge.policy import NoraPolicy

    vocab = Bundle.load(mt_bundle, verify=False).embeddings["shape"][0]
    good = {"instruction": "pick", "ids": [3, 4]}
    cases = [
        "not json",
        json.dumps([1]),
        json.dumps({"format": "nora-edge-drafts/0", "chunks": []}),
        json.dumps({"chunks": []}),
        json.dumps({"format": DRAFTS_FORMAT, "chunks": {}}),
        json.dumps({"format": DRAFTS_FORMAT, "chunks": [good, {"instruction": "a", "ids": [1, -2]}]}),
        json.dumps({"format": DRAFTS_FORMAT, "chunks": [good, good, {"instruction": "a", "ids": [1, True]}]}),
        json.dumps({"format": DRAFTS_FORMAT, "chunks": [{"instruction": "a", "ids": [1.0]}]}),
        json.dumps({"format": DRAFTS_FORMAT, "chunks": [{"ids": [1]}]}),
        json.dumps({"format": DRAFTS_FORMAT, "chunks": [{"instruction": 5, "ids": [1]}]}),
        json.dumps({"format": DRAFTS_FORMAT, "chunks": ["pick"]}),
        json.dumps(
            {"format": DRAFTS_FORMAT, "chunks": [good, {"instruction": "a", "ids": [2, vocab + 5, 1]}]}
        ),
    ]
    compared = 0
    for text in cases:
        bad = _tampered(mt_bundle, tmp_path / "bad", drafts=text)
        with pytest.raises(BundleError) as py:
            read_drafts(bad / DRAFTS, vocab)
        with pytest.raises(BundleError) as c:
            _edge(edge_runtime, bad, decoding="multi-token", verify=True)
        c_msg, py_msg = str(c.value), str(py.value)
        assert c_msg.startswith(f"{bad}/{DRAFTS}: ") and py_msg.startswith(f"{bad / DRAFTS}: "), (
            c_msg,
            py_msg,
        )
        c_tail, py_tail = c_msg.split(f"{DRAFTS}: ", 1)[1], py_msg.split(f"{DRAFTS}: ", 1)[1]
        if text == "not json":  # the JSON parsers' own words differ
            assert c_tail.startswith("unreadable draft file (") and py_tail.startswith(
                "unreadable draft file ("
            )
        else:
            assert c_tail == py_tail, (text, c_tail, py_tail)
        compared += 1
    assert compared == len(cases) == 12
    huge = json.dumps({"format": DRAFTS_FORMAT, "chunks": [{"instruction": "a", "ids": [2**64 - 1]}]})
    bad = _tampered(mt_bundle, tmp_path / "bad", drafts=huge)  # past int64: C compares it unsigned
    with pytest.raises(BundleError, match=rf"chunks\[0\] holds id {2**64 - 1} >= vocab size {vocab}"):
        _edge(edge_runtime, bad, decoding="multi-token")
    # the last bad file: not read with bundle_drafts off (C and Python) nor by plain decoding
    _edge(edge_runtime, bad, decoding="multi-token", bundle_drafts=False, verify=True).close()
    _edge(edge_runtime, bad, verify=True).close()
    cfg = MultiTokenConfig(bundle_drafts=False)
    NoraPolicy.load(bad, providers="cpu", decoding="multi-token", multi_token=cfg).close()
    # the manifest's section: an object naming drafts.json, else a BundleError in both runtimes
    for section in ({"file": "other.json"}, {"chunks": 6}, ["drafts.json"], "drafts.json"):
        bad = _tampered(mt_bundle, tmp_path / "bad", section=section)
        with pytest.raises(BundleError, match="'drafts' section must name file 'drafts.json'"):
            _edge(edge_runtime, bad, decoding="multi-token")
        with pytest.raises(BundleError, match="'drafts' section must name file 'drafts.json'"):
            NoraPolicy.load(bad, providers="cpu", decoding="multi-token")
        compared += 1
    # an absent section (a bundle exported without calibration): nothing seeded, nothing read
    bad = _tampered(mt_bundle, tmp_path / "bad", drafts="not json", section=None)
    with _edge(edge_runtime, bad, decoding="multi-token", verify=True) as edge:
        image, text = PARITY[0]
        assert edge.step(image, text).counters["proposed"] == 0
    assert compared == 16


def test_run_bundle_multi_token_repeat(edge_runtime, mt_bundle, tmp_path):
    """examples/run_bundle --multi-token --repeat 2: the second chunk drafts from the first (same ids)."""
    from PIL import Image

    r = subprocess.run(
        ["make", "-C", str(KERNELS), f"BUILD={edge_runtime.parent}", str(edge_runtime.parent / "run_bundle")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    image, text = PARITY[1]
    Image.fromarray(image).save(tmp_path / "f.ppm")
    base = [
        str(edge_runtime.parent / "run_bundle"),
        str(mt_bundle),
        str(tmp_path / "f.ppm"),
        "--instruction",
        text,
        "--threads",
        "1",
        "--flag",
        "--ort",
        str(wheel_onnxruntime()),
    ]
    outs = [
        json.loads(
            subprocess.run(base + extra, capture_output=True, text=True, timeout=300, check=True).stdout
        )
        for extra in ([], ["--multi-token", "--repeat", "2"])
    ]
    assert outs[0]["token_ids"] == outs[1]["token_ids"] and len(outs[0]["token_ids"]) >= 1
    assert outs[0]["decoding"]["mode"] == "plain" and outs[1]["decoding"]["verify_calls"] >= 1
    assert outs[1]["decoding"]["decoder_calls"] < outs[0]["decoding"]["decoder_calls"]


@pytest.mark.slow
def test_run_bundle_multi_token_is_clean_under_asan_and_ubsan(mt_bundle, tmp_path):
    """The runtime under AddressSanitizer + UBSan (leak checks on) running multi-token chunks: verify calls
    with every draft accepted, with max_draft 1, the fallback (tie_margin 1e30) and the CPU-host settings (gate,
    adaptive K), all seeded from the bundle's drafts.json; ids equal the plain run's. A malformed drafts.json: a
    clean BundleError."""

    from PIL import Image

    build = tmp_path / "b"
    r = subprocess.run(
        ["make", "-C", str(KERNELS), "run-bundle-asan", f"BUILD={build}", "-j2"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    image, text = PARITY[2]
    Image.fromarray(image).save(tmp_path / "f.ppm")
    env = {
        "ASAN_OPTIONS": "detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1",
        "PATH": "/usr/bin",
    }
    base = [str(build / "runtime-asan" / "run_bundle"), str(mt_bundle), str(tmp_path / "f.ppm")]
    base += ["--ort", str(wheel_onnxruntime()), "--instruction", text, "--flag", "--repeat", "3"]
    runs = {
        "plain": [],
        "multi": ["--multi-token"],
        "draft 1": ["--multi-token", "--max-draft", "1"],
        "fallback": ["--multi-token", "--tie-margin", "1e30"],
        "cpu host": ["--multi-token", "--gate-rate", "0.2", "--adaptive-draft", "--max-draft", "3"],
    }
    outs = {}
    for name, extra in runs.items():
        p = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, (name, p.stderr[-3000:])
        assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, (name, p.stderr[-3000:])
        outs[name] = json.loads(p.stdout)
    ids = outs["plain"]["token_ids"]
    assert all(o["token_ids"] == ids for o in outs.values()) and len(ids) >= 2
    dec = {name: o["decoding"] for name, o in outs.items()}
    assert (
        dec["multi"]["verify_calls"] >= 1
        and dec["draft 1"]["verify_calls"] >= 1
        and dec["fallback"]["fallback"]
    )
    assert dec["plain"]["decoder_calls"] == len(ids) - 1 and len(outs) == 5
    # the seed's error path (a chunk past the vocabulary after a good one): a clean BundleError, nothing leaked
    good = {"instruction": text, "ids": ids}
    bad_ids = {"instruction": text, "ids": [1, 10**9]}
    bad = _tampered(
        mt_bundle, tmp_path / "bad", drafts=json.dumps({"format": DRAFTS_FORMAT, "chunks": [good, bad_ids]})
    )
    p = subprocess.run([*base[:1], str(bad), *base[2:], "--multi-token"], capture_output=True, text=True, env=env,
                       timeout=600)  # fmt: skip
    assert (
        p.returncode == 1
        and "NORA_EDGE_ERR_BUNDLE" in p.stderr
        and "chunks[1] holds id 1000000000" in p.stderr
    )
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr[-3000:]
