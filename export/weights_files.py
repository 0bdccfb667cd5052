"""Fine-tuned weights on disk: which safetensors files a weights path means, and their headers (no tensor read).

A weights path is what NORA's fine-tuning leaves (declare-lab/nora ``training/train.py``,
``lerobot_training/lerobot_training.py``: accelerate's ``Accelerator.save_state(output_dir/steps_N)``, i.e.
``model.safetensors`` beside ``optimizer.bin``, ``scheduler.bin``, ``random_states_0.pkl``), a ``save_pretrained``
directory, a single ``.safetensors`` file or a sharded ``*.safetensors.index.json``. Used by weights_overlay.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nora_edge import names
from nora_edge.checkpoint import read_json
from nora_edge.errors import CheckpointError, InputError

FORMATS = ("auto", "safetensors", "accelerate")
# accelerate/utils/constants.py: OPTIMIZER_NAME, SCHEDULER_NAME, RNG_STATE_NAME, SCALER_NAME, SAMPLER_NAME; the
# ``_<i>`` suffix numbers the i-th prepared object (accelerate/checkpointing.py save_accelerator_state)
_ACCELERATE_STATE = re.compile(
    r"^(optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|sampler(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt"
    r"|custom_checkpoint_\d+\.pkl)$"
)
_OTHER_MODEL = re.compile(r"^model_\d+\.safetensors$")  # save_state's file for the 2nd, 3rd... prepared model


@dataclass(frozen=True)
class WeightsSource:
    """The safetensors files a weights path resolves to.

    Attributes:
        files: one file, or the shards an index names (sorted).
        format: "accelerate" (a save_state directory) or "safetensors" (a file, an index, a save_pretrained dir).
        sharded: True when the files come from a ``*.safetensors.index.json``.
    """

    files: tuple[Path, ...]
    format: str
    sharded: bool


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, from its header: ``file``, ``key``, ``shape``, ``dtype`` ("F32", ...)."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str


def is_float_dtype(dtype: str) -> bool:
    """True for a safetensors float dtype name (F64 F32 F16 BF16 F8_*); I*, U* and BOOL are not."""
    return dtype.startswith(("F", "BF"))


def index_shards(index: Path) -> tuple[Path, ...]:
    """The shard files a ``*.safetensors.index.json`` names (sorted); each must exist."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: missing field 'weight_map'")
    shards = tuple(index.parent / s for s in sorted(set(weight_map.values())))
    for s in shards:
        if not s.is_file():
            raise CheckpointError(f"missing file: {s} (named in {index.name})")
    return shards


def resolve_weights(path: str | Path, fmt: str = "auto") -> WeightsSource:
    """The safetensors files behind ``path``.

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json``, or a directory holding
            ``model.safetensors`` or ``model.safetensors.index.json`` (accelerate ``save_state`` or
            ``save_pretrained`` output).
        fmt: "auto", "safetensors", or "accelerate" (``path`` must then be a save_state directory).

    Raises:
        InputError: unknown ``fmt``.
        CheckpointError: nothing readable at ``path``, pickled ``.bin`` weights, or several models' weights.
    """
    if fmt not in FORMATS:
        raise InputError(f"weights format must be one of {FORMATS}, got {fmt!r}")
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"weights not found: {p}")
    if p.is_file():
        if fmt == "accelerate":
            raise CheckpointError(f"{p}: weights format 'accelerate' expects the directory save_state wrote")
        if p.name.endswith(".safetensors.index.json"):
            return WeightsSource(index_shards(p), "safetensors", True)
        if p.suffix != ".safetensors":
            raise CheckpointError(
                f"{p}: not a .safetensors file or a .safetensors.index.json (pickled torch weights are not "
                "read: save with safe_serialization=True)"
            )
        return WeightsSource((p,), "safetensors", False)
    present = {c.name for c in p.iterdir()}
    is_state = any(_ACCELERATE_STATE.match(n) for n in present)
    if fmt == "accelerate" and not is_state:
        raise CheckpointError(
            f"{p}: not an accelerate save_state directory (no optimizer/scheduler/random_states file)"
        )
    kind = "accelerate" if fmt == "accelerate" or (fmt == "auto" and is_state) else "safetensors"
    others = sorted(n for n in present if _OTHER_MODEL.match(n))
    if others:
        raise CheckpointError(
            f"{p}: holds the weights of several prepared models ({names.SAFETENSORS_SINGLE}, {', '.join(others)}); "
            f"pass the NORA model's file itself, e.g. {p / names.SAFETENSORS_SINGLE}"
        )
    if names.SAFETENSORS_INDEX in present:
        return WeightsSource(index_shards(p / names.SAFETENSORS_INDEX), kind, True)
    if names.SAFETENSORS_SINGLE in present:
        return WeightsSource((p / names.SAFETENSORS_SINGLE,), kind, False)
    pickled = sorted(n for n in present if n.endswith(".bin") and n.startswith(("pytorch_model", "model")))
    hint = f" ({', '.join(pickled)}: pickled torch weights are not read; save with safe_serialization=True)"
    raise CheckpointError(
        f"{p}: no {names.SAFETENSORS_SINGLE} and no {names.SAFETENSORS_INDEX}" + (hint if pickled else "")
    )


def read_headers(files: Sequence[Path]) -> dict[str, TensorInfo]:
    """key -> TensorInfo over all ``files`` (headers only); a key in two files or an unreadable file raises."""
    from safetensors import safe_open

    out: dict[str, TensorInfo] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    sl = h.get_slice(key)
                    if key in out:
                        raise CheckpointError(f"key {key!r} is in both {out[key].file} and {f}")
                    out[key] = TensorInfo(f, key, tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises SafetensorError / OSError on a broken header
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
    if not out:
        raise CheckpointError(f"no tensor in {', '.join(str(f) for f in files)}")
    return out
