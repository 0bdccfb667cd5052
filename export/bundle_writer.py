"""Atomic bundle writing: stage files, hash them, write manifest.json LAST, rename into place.

Data flow: files written into ``<out>.tmp-<random>`` -> :meth:`BundleWriter.commit` hashes every file
(sha256 + size) and fsyncs it -> ``manifest.json`` written and fsynced -> staging dir renamed to ``<out>``
(an existing bundle is moved aside first and deleted after, only with ``overwrite=True``). A crash at any
point leaves no directory at ``<out>`` that :meth:`nora_edge.bundle.Bundle.load` accepts.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from nora_edge.bundle import MANIFEST, REQUIRED_SECTIONS, SCHEMA_VERSION, fsync_dir, list_files, sha256_file
from nora_edge.errors import BundleError


# --- writing ------------------------------------------------------------------------------------------
class BundleWriter:
    """Stage files in ``<out>.tmp-<random>``, then commit (manifest last) and rename to ``<out>``.

    Use as a context manager: leaving the block by an exception deletes the staging dir; ``commit`` must be
    called explicitly. A process killed mid-way leaves only a ``.tmp-`` dir without a manifest.
    """

    def __init__(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        check_target(self.out, overwrite=overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.out.parent / f"{self.out.name}.tmp-{secrets.token_hex(4)}"
        self.path.mkdir()
        self.committed = False

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def abort(self) -> None:
        """Delete the staging dir."""
        shutil.rmtree(self.path, ignore_errors=True)

    def write_bytes(self, rel: str, data: bytes) -> Path:
        """Write one file into the staging dir (parents created)."""
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def write_json(self, rel: str, obj: Any) -> Path:
        return self.write_bytes(rel, json.dumps(obj, indent=1).encode("utf-8"))

    def copy_file(self, rel: str, src: str | os.PathLike[str]) -> Path:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, p)
        return p

    def commit(self, sections: dict) -> Path:
        """Hash every staged file, write manifest.json last, fsync, rename to ``out``.

        Args:
            sections: every manifest section except ``schema_version``, ``nora_edge_version`` and ``files``.

        Returns:
            the final bundle path.
        """
        from nora_edge import __version__

        files = {}
        for rel in list_files(self.path):
            p = self.path / rel
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        manifest = {"schema_version": SCHEMA_VERSION, "nora_edge_version": __version__, "files": files}
        manifest.update(sections)
        missing = [k for k in REQUIRED_SECTIONS if k not in manifest]
        if missing:
            raise BundleError(f"cannot commit bundle {self.out}: manifest sections missing {missing}")
        for rel in _component_files(manifest):
            if rel not in files:
                raise BundleError(f"cannot commit bundle {self.out}: component file '{rel}' was not written")
        mpath = self.path / MANIFEST
        with open(mpath, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.path)
        replace_dir(self.path, self.out, overwrite=self.overwrite)
        self.committed = True
        return self.out


def _component_files(manifest: dict) -> list[str]:
    out = []
    for comp in manifest["components"].values():
        out.append(comp["file"])
        out.extend(comp.get("data_files", []))
    return out


def check_target(out: Path, *, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite`` and it is a bundle (or empty dir).

    Raises:
        BundleError: ``out`` exists and may not be replaced.
    """
    if not out.exists():
        return
    if not overwrite:
        raise BundleError(f"{out}: already exists (pass overwrite=True to replace it)")
    if not out.is_dir():
        raise BundleError(f"{out}: exists and is not a directory; refusing to replace it")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BundleError(f"{out}: exists, is not empty and has no {MANIFEST}; refusing to replace it")


def replace_dir(staged: Path, out: Path, *, overwrite: bool) -> None:
    """Rename ``staged`` to ``out``; an existing ``out`` is moved aside first and deleted after."""
    check_target(out, overwrite=overwrite)
    old = None
    if out.exists():
        old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
        os.replace(out, old)
    try:
        os.replace(staged, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bundle(
    out: str | os.PathLike[str],
    sections: dict,
    files: dict[str, bytes | str | os.PathLike[str]],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a whole bundle atomically from in-memory bytes or source paths.

    Args:
        out: final bundle directory.
        sections: manifest sections (see :meth:`BundleWriter.commit`).
        files: bundle-relative name -> bytes, or a path to copy.
        overwrite: replace an existing bundle.
    """
    with BundleWriter(out, overwrite=overwrite) as w:
        for rel, content in files.items():
            if isinstance(content, bytes):
                w.write_bytes(rel, content)
            else:
                w.copy_file(rel, content)
        return w.commit(sections)
