"""The measured multi-token acceptance every bench report's Orin prediction uses, with where it was measured.

Data flow: ``bench/multitoken_bench.py --bundle B --inputs closed_loop.npz --record FILE`` (plain vs multi-token
side by side on a policy's own closed-loop calls) --:func:`record_from`--> FILE (default
:data:`DEFAULT_RECORD`, committed: the MetaWorld policy's int4 bundle) --:func:`load_record`--> acceptance
(tokens emitted per decoder call = plain calls / multi-token calls, prefill excluded), the verify block
(max_draft + 1), the tokens-per-chunk and accepted-per-call distributions and a source line
--``orin_predict.orin_section(measured_acceptance=...)``--> the "multi-token [measured acceptance]" rows.

A bench run's own frames rotate over a few images, so it cannot measure acceptance itself (a repeated frame
drafts its own earlier chunk): the record names the policy, bundle and inputs it came from instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from nora_edge.errors import InputError

DEFAULT_RECORD = Path(__file__).resolve().parent / "baselines" / "multitoken_acceptance.json"
KIND = "nora-edge multi-token acceptance"


def record_from(result: dict, inputs: Path, bundle: Path, max_draft: int, date: str) -> dict:
    """The record of one ``multitoken_bench.bench_model`` result (``inputs``: the recorded closed-loop file)."""
    plain, multi = result["plain_calls_per_chunk"], result["mt_calls_per_chunk"]
    manifest = json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8"))
    recipe = (manifest.get("quantization") or {}).get("recipe", {}).get("name", "fp32")
    return {
        "kind": KIND,
        "acceptance": plain / multi,
        "block": max_draft + 1,
        "chunks": result["inputs"],
        "ids_identical": result["ids_identical"],
        "fallbacks": result["fallbacks"],
        "tokens_per_chunk_mean": result["tokens_per_chunk"],
        "tokens_histogram": result["tokens_histogram"],
        "accepted_per_verify_histogram": result["accepted_per_verify_histogram"],
        "calls_per_chunk": {"plain": plain, "multi_token": multi},
        "bundle": Path(bundle).name,
        "recipe": recipe,
        "source_checkpoint": Path(manifest.get("source_checkpoint", {}).get("path") or "?").name,
        "inputs": Path(inputs).name,
        "measured": date,
        "command": f"python -m nora_edge.bench.multitoken_bench --bundle <{recipe} bundle> --inputs "
        f"{Path(inputs).name} --n {result['inputs']} --max-draft {max_draft} --record <file>",
    }


def load_record(path: str | Path | None = None) -> dict | None:
    """The record at ``path`` (default :data:`DEFAULT_RECORD`; None when the default file is absent).

    Returns:
        the record plus ``source``: one line naming what was measured where.

    Raises:
        InputError: ``path`` given but missing, not a record, or with an acceptance outside [1, block].
    """
    p = Path(path) if path is not None else DEFAULT_RECORD
    if not p.is_file():
        if path is None:
            return None
        raise InputError(f"multi-token acceptance record not found: {p}")
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not a readable JSON record ({e})") from e
    if not isinstance(rec, dict) or rec.get("kind") != KIND:
        raise InputError(f"{p}: not a multi-token acceptance record (kind must be {KIND!r})")
    acc, block = rec.get("acceptance"), rec.get("block")
    if not isinstance(block, int) or block < 1:
        raise InputError(f"{p}: block must be an int >= 1, got {block!r}")
    if not isinstance(acc, int | float) or not math.isfinite(acc) or not 1 <= acc <= block:
        raise InputError(f"{p}: acceptance must be in [1, block = {block}], got {acc!r}")
    rec["source"] = (
        f"measured by bench/multitoken_bench.py on {rec.get('chunks')} closed-loop calls ({rec.get('inputs')}) of "
        f"the policy {rec.get('source_checkpoint')} as its {rec.get('recipe')} bundle on "
        f"{rec.get('measured')}: plain {rec['calls_per_chunk']['plain']:.2f} -> multi-token "
        f"{rec['calls_per_chunk']['multi_token']:.2f} decoder calls per chunk, ids identical on "
        f"{rec.get('ids_identical')}/{rec.get('chunks')}, {rec.get('tokens_per_chunk_mean', 0):.2f} tokens per chunk "
        f"(record {p.name})"
    )
    return rec
