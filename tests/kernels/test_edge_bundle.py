"""libnora_edge's bundle reader (kernels/src/edge/bundle.cpp, npy.cpp, sha256.c) against the Python runtime.

Data flow: ``tiny_ckpt_h5`` --export_bundle(validate=False)--> a bundle dir --``make -C kernels bundle-check
BUILD=<tmp>``--> ``bundle_check [--hash] DIR [--rows ID...]`` --> one JSON object (or ``ERR <status> <message>``)
compared field by field with the Python readers (Bundle.load, NoraPolicy.load's PromptBuilder / ImageSpec /
GreedyConfig); sha256 against hashlib; gathered embedding rows against numpy's float16 -> float32 cast, bitwise;
damaged copies of the bundle against Bundle.load's BundleError message, word for word.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nora_edge.bundle import Bundle
from nora_edge.errors import BundleError
from nora_edge.policy import NoraPolicy
from nora_edge.preprocess import c_path_unsupported

from .conftest import make

ERR_BUNDLE, ERR_UNSUPPORTED = 2, 5


@pytest.fixture(scope="module")
def bundle_check(edge_cxx_build: Path) -> Path:
    """tools/bundle_check, optimised (the session's C++ driver build)."""
    return edge_cxx_build / "bundle" / "bundle_check"


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle_h5: Path) -> Path:
    """The session's default (dynamic-KV decoder) bundle of ``tiny_ckpt_h5`` (tests that damage it copy it)."""
    return tiny_bundle_h5


def run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)


def parsed(exe: Path, bundle: Path, *args: str) -> dict:
    r = run(exe, "--hash", bundle, *args[1:]) if args and args[0] == "--hash" else run(exe, bundle, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def err(exe: Path, bundle: Path, hash_files: bool = True) -> tuple[int, str]:
    """(status, message) of a refused bundle."""
    r = run(exe, *(["--hash"] if hash_files else []), bundle)
    assert r.returncode == 1 and r.stdout.startswith("ERR "), r.stdout + r.stderr
    _, status, msg = r.stdout.rstrip("\n").split(" ", 2)
    return int(status), msg


def python_error(bundle: Path, verify: bool = True) -> str:
    with pytest.raises(BundleError) as e:
        Bundle.load(bundle, verify=verify)
    return str(e.value)


def compare_with_python(c: dict, bundle: Path) -> int:
    """Assert every parsed field equals the Python runtime's value; return how many were compared."""
    policy = NoraPolicy.load(bundle, providers="cpu", kernels="numpy")
    try:
        b, pb, spec, greedy = policy.bundle, policy.prompt, policy.image_spec, policy._greedy
        tok_added = set(pb.forbidden_ids) - set(range(b.actions.base, b.actions.base + b.actions.count))
        tok_added -= {pb.image_pad_id, pb.vision_end_id}
        dmeta, vmeta = b.components["decoder"].meta, b.components["vision"].meta
        pairs = {
            "prompt.prefix_ids": (c["prompt"]["prefix_ids"], pb.prefix_ids.tolist()),
            "prompt.suffix_ids": (c["prompt"]["suffix_ids"], pb.suffix_ids.tolist()),
            "prompt.image_pad_id": (c["prompt"]["image_pad_id"], pb.image_pad_id),
            "prompt.vision_start_id": (c["prompt"]["vision_start_id"], b.prompt.vision_start_id),
            "prompt.vision_end_id": (c["prompt"]["vision_end_id"], pb.vision_end_id),
            "prompt.tokenizer": (c["prompt"]["tokenizer"], b.prompt.tokenizer),
            "prompt.spatial_merge_size": (c["prompt"]["spatial_merge_size"], pb.spatial_merge_size),
            "prompt.max_instruction_tokens": (
                c["prompt"]["max_instruction_tokens"],
                pb.max_instruction_tokens,
            ),
            # C's forbidden ids + action range + tokenizer.json's added tokens (the C tokenizer's is_added)
            "prompt.forbidden": (
                set(c["prompt"]["forbidden_ids"]) | set(range(*c["prompt"]["forbidden_range"])) | tok_added,
                set(pb.forbidden_ids),
            ),
            "image.height_width": ([c["image"]["height"], c["image"]["width"]], list(spec.output_size())),
            "image.patch_size": (c["image"]["patch_size"], spec.patch_size),
            "image.temporal_patch_size": (c["image"]["temporal_patch_size"], spec.temporal_patch_size),
            "image.merge_size": (c["image"]["merge_size"], spec.merge_size),
            # nora_edge_preprocess takes float32 (edge_lib.make_spec casts the same way)
            "image.mean": (c["image"]["mean"], np.float32(spec.image_mean).astype(np.float64).tolist()),
            "image.std": (c["image"]["std"], np.float32(spec.image_std).astype(np.float64).tolist()),
            "image.resized": (
                [c["image"]["resized_height"], c["image"]["resized_width"]],
                [spec.resized_height, spec.resized_width],
            ),  # fmt: skip
            "image.min_pixels": (c["image"]["min_pixels"], spec.min_pixels),
            "image.max_pixels": (c["image"]["max_pixels"], spec.max_pixels),
            "image.rescale_factor": (c["image"]["rescale_factor"], spec.rescale_factor),
            "image.grid_thw": (c["image"]["grid_thw"], list(spec.grid_thw())),
            "vision.file": (c["vision"]["file"], b.components["vision"].file),
            "vision.patch_size": (c["vision"]["patch_size"], vmeta["patch_size"]),
            "vision.window_size": (c["vision"]["window_size"], vmeta["window_size"]),
            "vision.grid_thw": (c["vision"]["grid_thw"], vmeta.get("grid_thw")),
            "vision.io": (
                [c["vision"]["inputs"], c["vision"]["outputs"]],
                [
                    [t.to_json() for t in b.components["vision"].inputs],
                    [t.to_json() for t in b.components["vision"].outputs],
                ],
            ),  # fmt: skip
            "decoder.file": (c["decoder"]["file"], b.components["decoder"].file),
            "decoder.data_files": (c["decoder"]["data_files"], list(b.components["decoder"].data_files)),
            "decoder.precision": (c["decoder"]["precision"], b.components["decoder"].precision),
            "decoder.io": (
                [c["decoder"]["inputs"], c["decoder"]["outputs"]],
                [
                    [t.to_json() for t in b.components["decoder"].inputs],
                    [t.to_json() for t in b.components["decoder"].outputs],
                ],
            ),  # fmt: skip
            **{
                f"decoder.{k}": (c["decoder"][k], dmeta.get(k))
                for k in (
                    "num_layers",
                    "num_kv_heads",
                    "head_dim",
                    "hidden_size",
                    "kv_cache",
                    "max_len",
                    "num_rows",
                    "graph",
                )
            },  # fmt: skip
            "embeddings": (c["embeddings"], b.embeddings),
            "actions.base": (c["actions"]["base"], greedy.action_base),
            "actions.count": (c["actions"]["count"], b.actions.count),
            "actions.head": (c["actions"]["head"], b.actions.head),
            "actions.head_rows": (c["actions"]["head_rows"], b.actions.head_rows.tolist()),
            "actions.end_ids": (c["actions"]["end_ids"], list(b.actions.end_ids)),
            "generation.eos_token_ids": (c["generation"]["eos_token_ids"], list(greedy.eos_ids)),
            "generation.repetition_penalty": (
                c["generation"]["repetition_penalty"],
                greedy.repetition_penalty,
            ),
            "generation.max_new_tokens": (c["generation"]["max_new_tokens"], greedy.max_new_tokens),
            "generation.max_length": (c["generation"]["max_length"], greedy.max_length),
            "generation.pad_token_id": (c["generation"]["pad_token_id"], b.generation.pad_token_id),
            **{
                f"codec.{k}": (c["codec"][k], getattr(b.codec, k))
                for k in (
                    "scale",
                    "min_token",
                    "vocab_size",
                    "time_horizon",
                    "action_dim",
                    "byte_table",
                    "tokenizer",
                    "processor_config",
                    "native",
                )
            },  # fmt: skip
            "norm_stats_keys": (c["norm_stats_keys"], sorted(b.norm_stats)),
            "postprocess": (
                c["postprocess"],
                [{"op": s["op"], "key": s.get("key")} for s in b.manifest.get("postprocess", [])],
            ),
        }
    finally:
        policy.close()
    for name, (got, want) in pairs.items():
        assert got == want, f"{name}: C {got!r} != Python {want!r}"
    return len(pairs)


N_FIELDS = 59  # the entries of compare_with_python's table


def test_parsed_fields_equal_python(bundle_check, bundle_dir):
    c = parsed(bundle_check, bundle_dir, "--hash")
    assert compare_with_python(c, bundle_dir) == N_FIELDS
    assert c["image"]["pixel_values_size"] == 256 * 1176  # 224x224: 16x16 patches of 3*2*14*14


def test_fused_bundle_fields_equal_python(bundle_check, fused_trained_bundle):
    fused = fused_trained_bundle
    c = parsed(bundle_check, fused, "--hash")
    assert c["decoder"]["kv_cache"] in ("static", "shared") and c["decoder"]["max_len"] > 0
    assert compare_with_python(c, fused) == N_FIELDS


def test_sha256_equals_hashlib(bundle_check, bundle_dir, tmp_path):
    rng = np.random.default_rng(0)
    sizes = [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, (4 << 20) - 1, 4 << 20,
             (4 << 20) + 1, 9 * (1 << 20) + 77]  # fmt: skip
    files = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"r{i}.bin"
        p.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        files.append(p)
    files += sorted(p for p in bundle_dir.rglob("*") if p.is_file())
    r = run(bundle_check, "--sha256", *files)
    assert r.returncode == 0, r.stderr
    got = r.stdout.split()
    want = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert len(got) == len(want) == len(files) >= len(sizes) + 10
    assert got == want


def test_half_to_float_is_numpys(bundle_check):
    r = run(bundle_check, "--half-table")
    assert r.returncode == 0, r.stderr
    got = np.array([int(x, 16) for x in r.stdout.split()], dtype=np.uint32)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    want = halves.astype(np.float32).view(np.uint32)
    assert got.size == 1 << 16
    finite = ~np.isnan(halves)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan(got.view(np.float32)[~finite]).all() and (~finite).sum() == 2046
    # payloads of quiet NaNs (mantissa MSB set) are kept like numpy's
    quiet = ~finite & ((np.arange(1 << 16) & 0x0200) != 0)
    np.testing.assert_array_equal(got[quiet], want[quiet])


def test_embedding_rows_bitwise(bundle_check, bundle_dir):
    table = np.load(bundle_dir / "embeddings.npy")
    ids = [0, 1, table.shape[0] - 1, *np.random.default_rng(1).integers(0, table.shape[0], 13).tolist()]
    c = parsed(bundle_check, bundle_dir, "--rows", *map(str, ids))
    got = np.array(c["rows_bits"], dtype=np.uint32)
    want = table[ids].astype(np.float32).view(np.uint32)
    assert table.dtype == np.float16 and got.shape == want.shape == (16, table.shape[1])
    np.testing.assert_array_equal(got, want)
    r = run(bundle_check, bundle_dir, "--rows", str(table.shape[0]))
    assert r.stdout.startswith("ERR 1 embedding row id ") and str(table.shape[0]) in r.stdout


@pytest.fixture()
def copy(bundle_dir, tmp_path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "copy"))


def test_tampered_file_fails_only_with_hash(bundle_check, copy):
    p = copy / "decoder.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    parsed(bundle_check, copy)  # sizes only: loads
    status, msg = err(bundle_check, copy)
    assert status == ERR_BUNDLE and msg == python_error(copy) and str(p) in msg and "sha256" in msg


@pytest.mark.parametrize("damage", ["truncate", "missing", "extra", "extra_nested", "symlink"])
def test_damaged_files_named_like_python(bundle_check, copy, damage):
    target = copy / "codec" / "byte_table.npz"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    elif damage == "missing":
        target.unlink()
    elif damage == "extra":
        (copy / "notes.txt").write_text("x")
        (copy / "a-extra").write_text("y")
    elif damage == "extra_nested":
        (copy / "codec" / "sub").mkdir()
        (copy / "codec" / "sub" / "z").write_text("z")
    else:
        (copy / "link").symlink_to(target)
    for hash_files in (False, True):
        status, msg = err(bundle_check, copy, hash_files)
        assert status == ERR_BUNDLE and msg == python_error(copy, verify=hash_files), damage


def edit_manifest(bundle: Path, fn) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("where", "key"),
    [("prompt", "suffix_ids"), ("actions", "head_rows"), ("generation", "eos_token_ids"), ("codec", "min_token"),
     ("components", "embeddings"), (None, "image"), (None, "files")],
)  # fmt: skip
def test_missing_field_named_like_python(bundle_check, copy, where, key):
    edit_manifest(copy, lambda m: (m[where] if where else m).pop(key))
    status, msg = err(bundle_check, copy)
    assert status == ERR_BUNDLE and msg == python_error(copy) and key in msg


def test_bad_manifest_values(bundle_check, copy):
    checks = 0
    for fn, needle in [
        (lambda m: m.update(schema_version=2), "schema_version 2; this nora-edge reads 1"),
        (
            lambda m: m["prompt"].update(image_pad_id="x"),
            "field 'prompt.image_pad_id' = 'x' is not <class 'int'>",
        ),
        (lambda m: m["actions"].update(head_rows=[[1, 2, 3]]), "field 'actions.head_rows' must be a list of"),
        (lambda m: m["files"]["vision.onnx"].update(size=1), "size"),
        (
            lambda m: m["files"]["vision.onnx"].update(size="12"),
            "!= 12 recorded in manifest.json (tampered?)",
        ),
        (lambda m: m.pop("validation"), "missing section 'validation'"),
    ]:
        original = (copy / "manifest.json").read_text()
        edit_manifest(copy, fn)
        status, msg = err(bundle_check, copy)
        py = python_error(copy)
        assert status == ERR_BUNDLE and needle in msg and (msg == py or msg.startswith(py.split("(")[0])), (
            msg,
            py,
        )
        (copy / "manifest.json").write_text(original)
        checks += 1
    (copy / "manifest.json").write_text('{"schema_version": 1, ')
    status, msg = err(bundle_check, copy)
    assert status == ERR_BUNDLE and msg.startswith(f"{copy / 'manifest.json'}: not valid JSON (")
    assert python_error(copy).startswith(f"{copy / 'manifest.json'}: not valid JSON (")
    (copy / "manifest.json").unlink()
    status, msg = err(bundle_check, copy)
    assert status == ERR_BUNDLE and msg == python_error(copy)
    assert checks == 6


def test_image_section_refused_like_imagespec(bundle_check, copy):
    """NoraPolicy.load's ImageSpec.from_manifest (Bundle.load leaves the image section to it)."""
    from nora_edge.preprocess import ImageSpec

    edit_manifest(copy, lambda m: m["image"].update(foo=1, bar=2))
    status, msg = err(bundle_check, copy)
    with pytest.raises(BundleError) as e:
        ImageSpec.from_manifest(Bundle.load(copy).image)
    assert status == ERR_BUNDLE and msg == str(e.value) and "['bar', 'foo']" in msg


def test_image_spec_the_c_path_cannot_run_is_unsupported(bundle_check, copy):
    from nora_edge.preprocess import ImageSpec

    edit_manifest(copy, lambda m: m["image"].update(max_pixels=112 * 112))
    status, msg = err(bundle_check, copy)
    why = c_path_unsupported(ImageSpec.from_manifest(Bundle.load(copy).image))
    assert status == ERR_UNSUPPORTED and why and msg.endswith(why)


@pytest.mark.slow  # compiling the sanitized objects takes ~30-80 s on the 2 shared cores
def test_asan_driver(bundle_check, bundle_dir, tmp_path):
    build = tmp_path / "asanbuild"
    r = make("bundle-check-asan", build)
    assert r.returncode == 0, r.stdout + r.stderr
    exe = build / "bundle-asan" / "bundle_check"
    want = parsed(bundle_check, bundle_dir, "--hash", "--rows", "0", "7")
    r = subprocess.run([str(exe), "--hash", str(bundle_dir), "--rows", "0", "7"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0"})  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout) == want
    bad = Path(shutil.copytree(bundle_dir, tmp_path / "bad"))
    (bad / "vision.onnx").unlink()
    r = run(exe, "--hash", bad)
    assert r.returncode == 1 and r.stdout.startswith("ERR 2 ") and "vision.onnx" in r.stdout, r.stderr
