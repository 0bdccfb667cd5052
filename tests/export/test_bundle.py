"""Bundle manifest, verification (tamper / delete / extra files) and atomic writes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nora_edge import bundle
from nora_edge.actions.native import NATIVE_DIR, NATIVE_TXT
from nora_edge.bundle import Bundle, compress_ranges, expand_ranges, format_info
from nora_edge.errors import BundleError
from nora_edge.export.bundle_writer import BundleWriter, write_bundle


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(tiny_bundle, out)
    return out


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_loads_and_lists_every_file(tiny_bundle: Path):
    b = Bundle.load(tiny_bundle)
    assert set(b.manifest["files"]) | {bundle.MANIFEST} == set(all_files(tiny_bundle))
    for rel in (
        bundle.VISION_ONNX,
        bundle.DECODER_ONNX,
        bundle.EMBEDDINGS,
        bundle.TOKENIZER,
        bundle.CODEC_BYTE_TABLE,
        f"{NATIVE_DIR}/{NATIVE_TXT}",
    ):
        assert rel in b.manifest["files"]
    assert b.codec.native == NATIVE_DIR
    assert b.manifest["schema_version"] == bundle.SCHEMA_VERSION
    assert b.actions.head_rows.size == b.components["decoder"].outputs[0].shape[1]


def test_info_and_format(tiny_bundle: Path):
    b = Bundle.load(tiny_bundle)
    info = b.info()
    assert set(info["components"]) == {"vision", "decoder", "embeddings"}
    sizes = sum(c["size_bytes"] for c in info["components"].values())
    assert sizes <= info["total_size_bytes"]
    text = format_info(info)
    assert "decoder_prefill: passed" in text and "vision.onnx" in text
    json.dumps(info)


def test_flipping_a_byte_in_any_file_is_caught(bundle_copy: Path):
    for name in [n for n in all_files(bundle_copy) if n != bundle.MANIFEST]:
        p = bundle_copy / name
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        with pytest.raises(BundleError, match=re.escape(f"{p}: sha256")):
            Bundle.load(bundle_copy)
        Bundle.load(bundle_copy, verify=False)  # same size: only the hash catches it
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    Bundle.load(bundle_copy)


def test_deleting_any_file_is_caught(bundle_copy: Path, tmp_path: Path):
    for name in [n for n in all_files(bundle_copy) if n != bundle.MANIFEST]:
        p = bundle_copy / name
        keep = tmp_path / "keep"
        shutil.move(p, keep)
        for verify in (True, False):
            with pytest.raises(BundleError, match=re.escape(f"{p}: listed in manifest.json but missing")):
                Bundle.load(bundle_copy, verify=verify)
        shutil.move(keep, p)


def test_truncated_extra_and_missing_manifest(bundle_copy: Path):
    p = bundle_copy / bundle.EMBEDDINGS
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(BundleError, match="embeddings.npy: size"):
        Bundle.load(bundle_copy, verify=False)
    p.write_bytes(data)
    (bundle_copy / "codec" / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.bin: not listed"):
        Bundle.load(bundle_copy)
    (bundle_copy / "codec" / "extra.bin").unlink()
    (bundle_copy / bundle.MANIFEST).unlink()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        Bundle.load(bundle_copy)
    with pytest.raises(BundleError, match="not found"):
        Bundle.load(bundle_copy / "nope")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(schema_version=99), "schema_version 99"),
        (lambda m: m.pop("codec"), "missing section 'codec'"),
        (lambda m: m["prompt"].pop("suffix_ids"), "prompt.suffix_ids"),
        (lambda m: m["components"]["decoder"].pop("inputs"), "components.decoder.inputs"),
        (lambda m: m["actions"].update(head_rows=[[1, "x"]]), "actions.head_rows"),
    ],
    ids=["version", "section", "prompt", "component", "ranges"],
)
def test_malformed_manifest(bundle_copy: Path, edit, match):
    path = bundle_copy / bundle.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=match):
        Bundle.load(bundle_copy)


def sections_of(root: Path) -> dict:
    m = json.loads((root / bundle.MANIFEST).read_text())
    return {k: v for k, v in m.items() if k not in ("schema_version", "nora_edge_version", "files")}


def files_of(root: Path) -> dict:
    return {n: root / n for n in all_files(root) if n != bundle.MANIFEST}


def test_write_bundle_refuses_then_overwrites(tiny_bundle: Path, tmp_path: Path):
    out = tmp_path / "b"
    write_bundle(out, sections_of(tiny_bundle), files_of(tiny_bundle))
    first = Bundle.load(out).manifest["files"]
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(out, sections_of(tiny_bundle), files_of(tiny_bundle))
    files = files_of(tiny_bundle)
    files["notes.txt"] = b"second export"
    write_bundle(out, sections_of(tiny_bundle), files, overwrite=True)
    second = Bundle.load(out).manifest["files"]
    assert set(second) - set(first) == {"notes.txt"}
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging or old dirs left behind


def test_overwrite_refuses_a_non_bundle_dir(tiny_bundle: Path, tmp_path: Path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(BundleError, match="no manifest.json"):
        write_bundle(out, sections_of(tiny_bundle), files_of(tiny_bundle), overwrite=True)
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_commit_requires_sections_and_component_files(tiny_bundle: Path, tmp_path: Path):
    sections = sections_of(tiny_bundle)
    with BundleWriter(tmp_path / "a") as w:
        with pytest.raises(BundleError, match="sections missing"):
            w.commit({k: v for k, v in sections.items() if k != "validation"})
    files = files_of(tiny_bundle)
    files.pop(bundle.DECODER_ONNX)
    with pytest.raises(BundleError, match="decoder.onnx' was not written"):
        write_bundle(tmp_path / "b", sections, files)
    assert list(tmp_path.iterdir()) == []


def test_crash_before_commit_leaves_nothing_loadable(tiny_bundle: Path, tmp_path: Path):
    out = tmp_path / "b"
    w = BundleWriter(out)
    for name, src in files_of(tiny_bundle).items():
        w.copy_file(name, src)
    # simulated kill: neither commit nor abort runs
    assert not out.exists()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        Bundle.load(w.path)


@given(st.lists(st.integers(0, 300), max_size=60))
def test_ranges_roundtrip(ids):
    runs = compress_ranges(ids)
    np.testing.assert_array_equal(expand_ranges(runs, "x"), np.asarray(ids, dtype=np.int64))
    assert all(a < b for a, b in runs)


def test_writer_imports_first_and_runtime_does_not_import_it():
    """The writer is export-stage code: importing it first works, and the runtime's bundle module does not
    pull it in (nora_edge.bundle and the writer used to import each other)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import nora_edge.export.bundle_writer as w\n"
        "assert w.BundleWriter and w.write_bundle\n"
        "for m in [k for k in sys.modules if k.startswith('nora_edge')]: del sys.modules[m]\n"
        "import nora_edge.bundle\n"
        "leaked = sorted(k for k in sys.modules if k.startswith('nora_edge.export'))\n"
        "assert not leaked, leaked\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
