"""Overlay a fine-tuned weights file onto a base NORA checkpoint directory -> a complete HF checkpoint directory.

NORA's fine-tuning scripts (declare-lab/nora ``training/train.py``, ``lerobot_training/lerobot_training.py``) save
with accelerate's ``Accelerator.save_state(output_dir/steps_N)``: ``model.safetensors`` (weights only, written by
accelerate's ``save_accelerator_state``) beside ``optimizer.bin``, ``scheduler.bin`` and ``random_states_0.pkl``;
no config, tokenizer or norm stats. The scripts' own ``load_model_weights`` loads such a file into the base model
with ``strict=False``, so a wrong key silently keeps a base weight. Here every key must be a model parameter.

Data flow: weights path (a .safetensors file, a sharded ``*.safetensors.index.json``, a ``save_pretrained`` dir or
an accelerate state dir) --weights_files.resolve_weights--> safetensors files --headers only--> key, shape, dtype
--wrapper prefix stripped (``module.`` from DDP, ``_orig_mod.`` from torch.compile)--> transformers' own load-time
renaming for the base config's model class (``conversion_mapping.get_model_conversion_mapping`` then
``core_model_loading.rename_source_key``, called as ``from_pretrained`` calls them; it maps both the
``save_pretrained`` names ``model.layers.*`` / ``visual.*`` and the in-memory names of transformers >= 4.52
``model.language_model.*`` / ``model.visual.*``) --> checked against the base model built on the meta device (name,
shape, float/int) with its tied weights resolved as ``PreTrainedModel.tie_weights`` resolves them while loading
--> one output shard per base shard under the base's own on-disk names, plus the base's other files (config,
tokenizer, processor, norm_stats.json, fast/) --> atomic rename to ``out_dir``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nora_edge import names
from nora_edge.atomic import write_json_atomic
from nora_edge.bundle import sha256_file
from nora_edge.checkpoint import read_json
from nora_edge.errors import CheckpointError, ExportError
from nora_edge.export.weights_files import (
    TensorInfo,
    index_shards,
    is_float_dtype,
    read_headers,
    resolve_weights,
)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # torch DDP / DeepSpeed wrapper, torch.compile wrapper
_SHOW = 10  # keys listed per problem in an error message
_KEPT_LISTED = 50  # kept-from-base parameter names recorded in the overlay record


@dataclass(frozen=True)
class ModelReference:
    """The base config's model as ``from_pretrained`` sees it (built on the meta device, no weights).

    Attributes:
        params: in-memory state-dict name -> (shape, is_float).
        tied: tied target name -> source name (``all_tied_weights_keys``; empty when the config unties them).
        rename: checkpoint key -> in-memory name, transformers' load-time renaming.
        class_name: the model class.
        transformers_version: the installed transformers version.
    """

    params: dict[str, tuple[tuple[int, ...], bool]]
    tied: dict[str, str]
    rename: Callable[[str], str]
    class_name: str
    transformers_version: str


def model_reference(base_dir: Path) -> ModelReference:
    """Build the base config's Qwen2.5-VL model on the meta device and transformers' key renaming for it."""
    import torch
    import transformers
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    try:
        config = AutoConfig.from_pretrained(str(base_dir))
    except Exception as e:  # transformers raises OSError/ValueError on a broken config
        raise CheckpointError(f"{base_dir / names.CONFIG}: transformers cannot read the config ({e})") from e
    if config.model_type != "qwen2_5_vl":
        raise CheckpointError(
            f"{base_dir / names.CONFIG}: model_type {config.model_type!r} is not qwen2_5_vl"
        )
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    state = model.state_dict()
    mapping = get_model_conversion_mapping(model)  # what from_pretrained uses (no key_mapping, no quantizer)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    prefix = model.base_model_prefix

    def rename(key: str) -> str:
        new, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if new not in state and key in state:  # from_pretrained's fallback (core_model_loading)
            new, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=state)
        if pattern is not None:
            raise CheckpointError(
                f"key {key!r} needs a tensor conversion ({pattern}); only renamings are read"
            )
        return new

    return ModelReference(
        params={k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()},
        tied=dict(model.all_tied_weights_keys),
        rename=rename,
        class_name=type(model).__name__,
        transformers_version=transformers.__version__,
    )


def wrapper_prefix(keys: Sequence[str]) -> str:
    """The wrapper prefix every key carries (repeated wrappers concatenated), or ""."""
    prefix = ""
    while True:
        rest = [k[len(prefix) :] for k in keys]
        nxt = next((w for w in WRAPPER_PREFIXES if rest and all(r.startswith(w) for r in rest)), None)
        if nxt is None:
            return prefix
        prefix += nxt


def key_names(keys: Sequence[str]) -> str:
    """Which naming the (prefix-stripped) keys use: in-memory, save_pretrained, mixed or other."""
    mem = any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)
    orig = any(k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "visual.")) for k in keys)
    if mem and orig:
        return "mixed in-memory and save_pretrained names"
    if mem:
        return "in-memory names of transformers>=4.52 (model.language_model.*, model.visual.*)"
    if orig:
        return "save_pretrained / transformers<4.52 names (model.layers.*, model.embed_tokens.*, visual.*)"
    return "other"


def _listing(label: str, items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {label}: " + ", ".join(items[:_SHOW]) + more


def _equal_tensors(a: TensorInfo, b: TensorInfo) -> bool:
    import torch
    from safetensors import safe_open

    with safe_open(str(a.file), framework="pt") as ha, safe_open(str(b.file), framework="pt") as hb:
        return a.dtype == b.dtype and torch.equal(ha.get_tensor(a.key), hb.get_tensor(b.key))


def _allowance(ref: ModelReference, allow_partial: Sequence[str]) -> Callable[[str], bool]:
    """Predicate over in-memory names: exact names or dotted prefixes, given in either naming."""
    mapped = []
    for entry in allow_partial:
        a = ref.rename(entry.rstrip("."))
        if not any(n == a or n.startswith(a + ".") for n in ref.params):
            raise CheckpointError(
                f"allow_partial entry {entry!r} (as {a!r}) names no parameter of the base model"
            )
        mapped.append(a)
    return lambda n: any(n == a or n.startswith(a + ".") for a in mapped)


def plan_overlay(
    ref: ModelReference, weights: dict[str, TensorInfo], allow_partial: Sequence[str], source: str
) -> tuple[dict[str, TensorInfo], dict]:
    """Map every weights key to a model parameter; return (in-memory name -> file tensor, record).

    Raises:
        CheckpointError: unexpected, duplicate, mis-shaped or missing (not allowed) keys, listed with counts.
    """
    prefix = wrapper_prefix(list(weights))
    values: dict[str, TensorInfo] = {}
    unexpected, misshaped, duplicate = [], [], []
    for key in sorted(weights):
        info, name = weights[key], ref.rename(key[len(prefix) :])
        if name not in ref.params:
            unexpected.append(key)
        elif name in values:
            duplicate.append(f"{key} (as {name}, also {values[name].key})")
        else:
            shape, is_float = ref.params[name]
            if info.shape != shape or is_float_dtype(info.dtype) != is_float:
                kind = "float" if is_float else "int"
                misshaped.append(f"{key} {info.dtype}{list(info.shape)} vs {name} {kind}{list(shape)}")
            values[name] = info
    tied = {}
    for target, src in ref.tied.items():  # PreTrainedModel.tie_weights during from_pretrained
        if target in values and src in values:
            if not misshaped and not _equal_tensors(values[target], values[src]):
                raise CheckpointError(
                    f"{source}: {values[target].key} and {values[src].key} differ, but the base config ties "
                    f"{target} to {src} (tie_word_embeddings); transformers would untie them, which the base "
                    "config does not describe"
                )
            del values[target]
            tied[target] = f"equal to {src} in the file (tied)"
        elif target in values:
            values[src] = values.pop(target)  # transformers swaps: the present one becomes the source
            tied[target] = f"only {target} in the file: it supplies {src} (tied)"
        else:
            tied[target] = f"tied to {src}"
    allowed = _allowance(ref, allow_partial)
    required = [n for n in ref.params if n not in ref.tied]
    absent = [n for n in required if n not in values]
    missing = [n for n in absent if not allowed(n)]
    problems = [
        _listing(label, items)
        for label, items in (
            ("unexpected keys (no such model parameter)", unexpected),
            ("keys naming the same parameter twice", duplicate),
            ("mis-shaped keys (file vs model)", misshaped),
            ("missing model parameters (not in the file; allow with --allow-partial NAME)", missing),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not match the base model ({ref.class_name}, names mapped as transformers "
            f"{ref.transformers_version} maps them, wrapper prefix {prefix or 'none'!r}): "
            + "; ".join(problems)
        )
    kept = sorted(absent)
    record = {
        "wrapper_prefix": prefix or None,
        "key_names": key_names([k[len(prefix) :] for k in weights]),
        "key_mapping": f"transformers {ref.transformers_version} {ref.class_name} load-time conversion mapping",
        "dtypes": sorted({i.dtype for i in weights.values()}),
        "tied": tied,
        "counts": {
            "file_keys": len(weights),
            "model_parameters": len(required),
            "overlaid": len(values),
            "kept_from_base": len(kept),
        },
        "allow_partial": list(allow_partial),
        "kept_from_base": kept[:_KEPT_LISTED],
    }
    return values, record


def _write_shards(
    base_files: tuple[Path, ...], ref: ModelReference, values: dict[str, TensorInfo], dest: Path
) -> int:
    """One shard per base shard, same keys: the file's tensor where the plan has one, else the base's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = read_headers(base_files)
    stray = sorted(k for k in base if ref.rename(k) not in ref.params)
    if stray:
        raise CheckpointError(
            _listing(f"base checkpoint keys that are no parameter of {ref.class_name}", stray)
        )
    have = {ref.rename(k) for k in base}
    have |= {src for target, src in ref.tied.items() if target in have}  # written under the target's key
    lacking = sorted(n for n in values if n not in have)
    if lacking:
        raise CheckpointError(_listing("parameters the base checkpoint's files lack", lacking))
    total = 0
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def tensor(info: TensorInfo):
            if info.file not in handles:
                handles[info.file] = stack.enter_context(safe_open(str(info.file), framework="pt"))
            return handles[info.file].get_tensor(info.key).contiguous()

        for shard in base_files:
            tensors = {}
            for key, info in base.items():
                if info.file != shard:
                    continue
                name = ref.rename(key)
                src = values.get(name) or values.get(ref.tied.get(name, "")) or info
                tensors[key] = tensor(src)
                total += tensors[key].numel() * tensors[key].element_size()
            save_file(tensors, str(dest / shard.name), metadata={"format": "pt"})
    return total


def overlay_weights(
    base_dir: str | Path,
    weights_path: str | Path,
    out_dir: str | Path,
    *,
    fmt: str = "auto",
    allow_partial: Sequence[str] = (),
) -> dict:
    """Write ``out_dir``: the base checkpoint with its weights replaced by those of ``weights_path``.

    Args:
        base_dir: base NORA checkpoint directory (HF format: config, tokenizer, processor, norm_stats, weights).
        weights_path: fine-tuned weights (see ``weights_files.resolve_weights``).
        out_dir: directory to create (must not exist); written in a temporary sibling, then renamed.
        fmt: "auto", "safetensors" or "accelerate".
        allow_partial: base parameter names or dotted prefixes (either naming) that may be absent from the file
            and then keep the base's value; recorded.

    Returns:
        The overlay record for the manifest's ``source_checkpoint.overlay``: base_dir, weights, files (path,
        sha256, bytes), format, sharded, wrapper_prefix, key_names, key_mapping, dtypes, tied, counts,
        allow_partial, kept_from_base.

    Raises:
        CheckpointError: unreadable weights, or keys that do not match the base model (listed with counts).
        ExportError: ``out_dir`` exists.
    """
    base, out = Path(base_dir), Path(out_dir)
    if out.exists():
        raise ExportError(f"overlay output already exists: {out}")
    if not (base / names.CONFIG).is_file():
        raise CheckpointError(f"missing file: {base / names.CONFIG} (base checkpoint directory)")
    src = resolve_weights(weights_path, fmt)
    ref = model_reference(base)
    values, record = plan_overlay(ref, read_headers(src.files), allow_partial, str(weights_path))
    index = base / names.SAFETENSORS_INDEX
    base_files = index_shards(index) if index.is_file() else (base / names.SAFETENSORS_SINGLE,)
    if not base_files[0].is_file():
        raise CheckpointError(f"{base}: no {names.SAFETENSORS_SINGLE} and no {names.SAFETENSORS_INDEX}")
    skip = {f.name for f in base_files} | {names.SAFETENSORS_INDEX}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        dest = tmp_root / "ckpt"
        shutil.copytree(base, dest, ignore=lambda d, ns: skip if Path(d) == base else set())
        total = _write_shards(base_files, ref, values, dest)
        if index.is_file():
            data = read_json(index)
            data["metadata"] = {**(data.get("metadata") or {}), "total_size": total}
            write_json_atomic(dest / names.SAFETENSORS_INDEX, data)
        os.rename(dest, out)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    files = [
        {"file": str(f.resolve()), "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in src.files
    ]
    return {
        "base_dir": str(base.resolve()),
        "weights": str(Path(weights_path).resolve()),
        "files": files,
        "format": src.format,
        "sharded": src.sharded,
        **record,
    }


@contextlib.contextmanager
def overlaid_checkpoint(
    base_dir: str | Path,
    weights_path: str | Path,
    near: str | Path,
    *,
    fmt: str = "auto",
    allow_partial: Sequence[str] = (),
) -> Iterator[tuple[Path, dict]]:
    """Yield (overlaid checkpoint dir, overlay record) in a temporary sibling of ``near``; removed on exit."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{near.name}.weights-", dir=near.parent))
    try:
        ckpt = tmp_root / "checkpoint"
        record = overlay_weights(base_dir, weights_path, ckpt, fmt=fmt, allow_partial=allow_partial)
        yield ckpt, record
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
