"""What code a CI baseline was recorded on: a fingerprint of the files the bench runs, and the git commit that wrote it.

Data flow: repository root --``git ls-files`` over :data:`SOURCE_PATHS` (docs and the baselines left out)--> each
tracked file's working-tree bytes --sha256, path by path--> :func:`source_fingerprint` (stored in the baseline by
``gate_baseline.make_baseline``; compared by ``gate_ab``). ``git log -1 -- bench/baselines/ci.json`` -->
:func:`baseline_commit`, the tree whose own code the side-by-side re-measurement (``gate_ab``) runs as the reference.

Why both: a baseline's normalized numbers come from one host; a CI runner on another CPU can sit 15-20% off on a
stage whose cost the yardsticks do not model (measured: the tiny decoder's prefill +15.7% on a CI host whose GEMM
and dispatch yardsticks read within 2% of the baseline's). When the fingerprint matches, no file the bench runs
changed since the baseline was recorded, so such a difference is the host. When it does not, only the baseline's
own code, run on the same host, can tell host from code, and that needs the commit in the clone's history.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from nora_edge.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
# what the CI bench builds, exports and runs: the runtime, the exporter, the bench, the Orin profiles, the native
# libraries (sources and makefiles) and the build / install settings
SOURCE_PATHS = (
    "nora_edge",
    "export",
    "bench",
    "profiles",
    "kernels",
    "pyproject.toml",
    "setup.py",
    "Makefile",
)
EXCLUDED_SUFFIXES = (".md",)
EXCLUDED_DIRS = ("bench/baselines/",)


class ReferenceUnavailable(InputError):
    """The baseline's own tree cannot be had here (no git, shallow clone, commit missing, build failed)."""


def git(repo: Path, *args: str) -> str:
    """``git -C repo args`` -> stdout stripped. Raises ReferenceUnavailable with git's own message."""
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ReferenceUnavailable("git is not installed") from e
    if done.returncode != 0:
        raise ReferenceUnavailable(
            f"git {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}"
        )
    return done.stdout.strip()


def source_files(repo: Path = REPO_ROOT) -> list[str]:
    """Tracked files under :data:`SOURCE_PATHS`, sorted, docs and baselines left out (works in shallow clones)."""
    listed = git(repo, "ls-files", "-z", "--", *SOURCE_PATHS).split("\0")
    return sorted(
        p
        for p in listed
        if p
        and not p.endswith(EXCLUDED_SUFFIXES)
        and not p.startswith(EXCLUDED_DIRS)
        and (repo / p).is_file()
    )


def source_fingerprint(repo: Path = REPO_ROOT) -> dict | None:
    """``{"sha256", "files", "paths"}`` of the working-tree bytes of :func:`source_files`; None outside a git tree
    (an installed package: a user's baseline then carries no fingerprint and ``gate_ab`` says so)."""
    try:
        files = source_files(repo)
    except ReferenceUnavailable:
        return None
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0")
        h.update(hashlib.sha256((repo / rel).read_bytes()).digest())
    return {"sha256": h.hexdigest(), "files": len(files), "paths": list(SOURCE_PATHS)}


def baseline_commit(baseline: Path, repo: Path = REPO_ROOT) -> str:
    """The commit that last wrote ``baseline``: the tree whose code the baseline measured (record a baseline on the
    tree you commit with it; ``make bench-ci-baseline`` refuses a tree with uncommitted source changes).

    Raises:
        ReferenceUnavailable: not a git tree, a shallow clone (the commit may lie beyond its history), or the file
            was never committed.
    """
    if git(repo, "rev-parse", "--is-shallow-repository") == "true":
        raise ReferenceUnavailable(
            f"{repo} is a shallow clone: the commit that wrote the baseline may lie outside its history "
            "(git fetch --unshallow)"
        )
    rel = Path(baseline).resolve().relative_to(Path(repo).resolve())
    commit = git(repo, "log", "-1", "--format=%H", "--", str(rel))
    if not commit:
        raise ReferenceUnavailable(f"{rel} was never committed in {repo}")
    return commit


def changed_source(commit: str, repo: Path = REPO_ROOT) -> list[str]:
    """Source files (:func:`source_files` rules) that differ between ``commit`` and the working tree."""
    listed = git(repo, "diff", "--name-only", "-z", commit, "--", *SOURCE_PATHS).split("\0")
    return sorted(
        p for p in listed if p and not p.endswith(EXCLUDED_SUFFIXES) and not p.startswith(EXCLUDED_DIRS)
    )


def require_committed_source(repo: Path = REPO_ROOT) -> None:
    """Raise InputError when a source file has uncommitted changes (a baseline must name the code it measured)."""
    lines = changed_source("HEAD", repo)
    if lines:
        raise InputError(
            f"{len(lines)} source file(s) have uncommitted changes ({', '.join(lines[:5])}): commit them first, "
            "so the baseline's commit is the code it measured"
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m nora_edge.bench.gate_source [--require-committed]``: print the fingerprint (exit 2 on a dirty
    tree with ``--require-committed``)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="nora-edge-gate-source", description=__doc__.splitlines()[0])
    ap.add_argument("--require-committed", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.require_committed:
            require_committed_source()
    except InputError as e:
        print(f"gate-source: {e}", file=sys.stderr)
        return 2
    fp = source_fingerprint()
    print(
        "not a git tree: no fingerprint"
        if fp is None
        else f"{fp['files']} source files, sha256 {fp['sha256']}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
