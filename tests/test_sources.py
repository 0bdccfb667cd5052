"""Sources are cited as the original paper, repository path, vendor page or local measurement: no file of the
project cites the team's private notes (a facts file or a shared folder that is not in the repository)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# built from pieces so this file does not match itself
PRIVATE_SOURCES = re.compile(
    "|".join(
        [
            "NORA" + "_FACTS",  # the notes file, with or without .md
            r"/work/" + "shared",  # the folder it lives in
            r"(?<![\w/])shared" + "/NORA",
            "ARCHI" + r"TECTURE\.md",  # another notes file that is not in the repository
        ]
    )
)
SKIP_DIRS = {".git", ".venv", "out", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}


def project_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (new files count); a plain walk without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        names = [n for n in out.decode("utf-8").split("\0") if n]
        return [ROOT / n for n in names if (ROOT / n).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file()
            and not (SKIP_DIRS & set(p.relative_to(ROOT).parts[:-1]))
            and not p.name.endswith(".egg-info")
        ]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary (weights, images)
    return data.decode("utf-8", errors="replace")


def test_no_file_cites_the_private_facts_file():
    files = project_files()
    texts = {p: t for p in files if (t := text_of(p)) is not None}
    assert len(texts) >= 100, f"only {len(texts)} text files found under {ROOT}"  # the walk really ran
    for must in ("profiles/orin-agx-64gb.toml", "bench/calibrate.py", "README.md"):
        assert ROOT / must in texts, must
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p, t in texts.items()
        for n, line in enumerate(t.splitlines(), 1)
        if PRIVATE_SOURCES.search(line)
    ]
    assert not hits, "cite the original source instead:\n" + "\n".join(hits)


def test_the_pattern_catches_each_form():
    cited = [
        "# Sources: /work/" + "shared" + "/notes.md 'Edge targets'",
        'source = "NORA_' + 'FACTS.md edge table: 16 SM"',
        "(measured reference: 336 ms/action, NORA_" + "FACTS).",
        "see shared" + "/NORA_notes",
        "as ARCHITECTURE" + ".md says",
    ]
    assert [bool(PRIVATE_SOURCES.search(c)) for c in cited] == [True] * len(cited)
    clean = ["profiles/orin-agx-64gb.toml", "declare-lab/nora inference/nora.py", "shared pool", "facts"]
    assert not any(PRIVATE_SOURCES.search(c) for c in clean)
