"""Regenerate the TensorRT ONNX-support tables (``tensorrt-<version>.json``) from onnx-tensorrt's operators.md.

Data flow: onnx/onnx-tensorrt ``docs/operators.md`` at a stated commit (read from a git directory with
``git show`` or from a saved copy) --parse header (version line, opset range, data-type list, notes) and the
"Operator Support Matrix" rows (operator, Y/N, supported types, restrictions)--> one JSON per TensorRT release
with the provenance (repo, path, commit, version line, sha256 of the exact text) beside the facts. The checker
``nora_edge.export.trt_support`` reads only the JSON; this script is how the JSON is made and re-made.

Usage (the two tables in this folder)::

    python export/trt_ops/make_tables.py --git-dir /path/to/onnx-tensorrt.git \
        --commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c --ref 10.1-GA --table-version 10.1 \
        --applies-to 10.1 10.2 10.3 --basis "..." --out export/trt_ops/tensorrt-10.1.json
    python export/trt_ops/make_tables.py --md operators-10.15.md --commit unknown --ref "10.15 GA" \
        --table-version 10.15 --applies-to 10.15 latest --basis "..." --out export/trt_ops/tensorrt-10.15.json

Source format (onnx-tensorrt >= 8.2): a header line "TensorRT X supports operators in the inclusive range of
opset A to opset B" (8.x/9.x: "... up to Opset B"), a line "TensorRT supports the following ONNX data types:
...", "> Note:" lines, then a markdown table whose rows may lack trailing cells.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

# Typos in the source tables, corrected here and listed in the JSON under "errata_applied".
TOKEN_ERRATA = {"INF64": "INT64"}  # 10.1-GA ConstantOfShape row reads "INT32, INF64, BOOL"

VERSION_RE = re.compile(
    r"TensorRT\s+(?P<ver>[0-9][0-9.]*)\s+supports operators\s+"
    r"(?:in the inclusive range of opset\s+(?P<lo>\d+)\s+to opset\s+(?P<hi>\d+)|up to Opset\s+(?P<upto>\d+))",
    re.IGNORECASE,
)
DTYPES_RE = re.compile(r"TensorRT supports the following ONNX data types:\s*(?P<list>.+)")


def split_list(text: str) -> list[str]:
    """'A, B, and C' -> ['A', 'B', 'C'] (the data-type sentence and the types column)."""
    parts = re.split(r",|\band\b", text)
    return [p.strip().strip("*").strip() for p in parts if p.strip().strip("*").strip()]


def parse_operators_md(text: str) -> dict:
    """Parse operators.md text into the table dict (without provenance).

    Args:
        text: the whole markdown file.

    Returns:
        dict with version_line, header_version, opset_min, opset_max, data_types, notes, errata_applied and
        operators: {op_type: {"supported": bool, "support_text": str, "types": [token, ...],
        "restrictions": str}}.

    Raises:
        ValueError: the header or the table is missing (not an onnx-tensorrt operators.md).
    """
    lines = text.splitlines()
    vline = next((ln.strip() for ln in lines if VERSION_RE.search(ln)), None)
    if vline is None:
        raise ValueError("no 'TensorRT X supports operators ...' line: not an onnx-tensorrt operators.md")
    m = VERSION_RE.search(vline)
    lo = int(m["lo"]) if m["lo"] else None
    hi = int(m["hi"] or m["upto"])
    dline = next((ln.strip() for ln in lines if DTYPES_RE.search(ln)), None)
    if dline is None:
        raise ValueError("no 'TensorRT supports the following ONNX data types' line")
    data_types = split_list(DTYPES_RE.search(dline)["list"])
    notes = [ln.strip()[1:].strip() for ln in lines if ln.strip().startswith("> Note")]

    try:
        start = next(
            i for i, ln in enumerate(lines) if ln.strip().lower().startswith("## operator support matrix")
        )
    except StopIteration as e:
        raise ValueError("no '## Operator Support Matrix' section") from e
    operators: dict[str, dict] = {}
    errata: list[str] = []
    rows = [ln for ln in lines[start + 1 :] if ln.strip().startswith("|")]
    for ln in rows[2:]:  # header row, separator row
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        op, support = cells[0], (cells[1] if len(cells) > 1 else "")
        supported = support.upper().startswith("Y")
        if supported:
            raw = split_list(cells[2]) if len(cells) > 2 else []
            types = []
            for tok in raw:
                if tok in TOKEN_ERRATA:
                    errata.append(f"{op}: type '{tok}' read as '{TOKEN_ERRATA[tok]}'")
                    tok = TOKEN_ERRATA[tok]
                types.append(tok)
            restrictions = " | ".join(c for c in cells[3:] if c)
        else:  # an 'N' row may carry an explanation in the types column
            types, restrictions = [], " | ".join(c for c in cells[2:] if c)
        operators[op] = {
            "supported": supported,
            "support_text": support,
            "types": types,
            "restrictions": restrictions.replace("<br />", " "),
        }
    if not operators:
        raise ValueError("the operator table has no rows")
    return {
        "version_line": vline,
        "header_version": m["ver"],
        "opset_min": lo,
        "opset_max": hi,
        "data_types_line": dline,
        "data_types": data_types,
        "notes": notes,
        "errata_applied": errata,
        "operators": operators,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: read operators.md (from a git dir at a commit, or a file), write the JSON table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--git-dir", help="a git directory of onnx/onnx-tensorrt (read with git show COMMIT:PATH)"
    )
    src.add_argument("--md", help="a saved copy of operators.md")
    ap.add_argument("--commit", required=True, help="commit hash the text is from ('unknown' if not named)")
    ap.add_argument("--repo", default="onnx/onnx-tensorrt")
    ap.add_argument("--path", default="docs/operators.md")
    ap.add_argument("--ref", default="", help="branch/tag/release the commit belongs to, for the record")
    ap.add_argument("--table-version", required=True, help="TensorRT release this text documents")
    ap.add_argument("--applies-to", nargs="+", required=True, help="versions the checker may answer with it")
    ap.add_argument("--basis", default="", help="why this text stands for those versions")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    if args.git_dir:
        text = subprocess.run(
            ["git", "-C", args.git_dir, "show", f"{args.commit}:{args.path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    else:
        text = Path(args.md).read_text(encoding="utf-8")
    table = parse_operators_md(text)
    doc = {
        "table_version": args.table_version,
        "applies_to": args.applies_to,
        "source": {
            "repo": args.repo,
            "path": args.path,
            "commit": args.commit,
            "ref": args.ref,
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "basis": args.basis,
        },
        **table,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    n_y = sum(o["supported"] for o in table["operators"].values())
    print(
        f"{args.out}: {len(table['operators'])} operators ({n_y} Y), opset {table['opset_min']}..{table['opset_max']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
