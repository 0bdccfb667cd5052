"""Finding and loading one of nora-edge's native libraries (``kernels/``) with ctypes, once per process.

Data flow: $<ENV> (explicit: an error when set but unloadable) | nora_edge/_native/<lib>.so (shipped by
``pip install .``, see setup.py) | kernels/build/<lib>.so (``make -C kernels``, dev trees) --the library's own
``try_load`` (ctypes.CDLL, signatures declared, ABI checked)--> the handle, or the reasons every candidate failed.
libnora_fast (nora_edge/kernels_lib.py) and libnora_edge (nora_edge/edge_lib.py) each own one
:class:`NativeLibrary`; their callers fall back to the numpy path, warning once, when it is unavailable.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
TryLoad = Callable[[Path], "tuple[ctypes.CDLL | None, str]"]


def open_library(path: Path, signatures: dict) -> tuple[ctypes.CDLL | None, str]:
    """ctypes.CDLL(path) with ``signatures`` ({symbol: (restype, [argtypes])}) declared: (handle, "") or
    (None, why) when the file does not load or lacks a symbol."""
    try:
        lib = ctypes.CDLL(str(path))
        for name, (res, args) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    except (OSError, AttributeError) as e:
        return None, f"{path}: cannot load ({e})"
    return lib, ""


class NativeLibrary:
    """One native library resolved lazily and at most once (until :meth:`reload`).

    Args:
        file_name: e.g. "libnora_fast.so".
        env_var: environment variable naming an explicit library path.
        try_load: path -> (handle, "") or (None, why): loads, declares signatures, checks the ABI.
        fallback: what runs instead, for the warning (e.g. "the numpy FAST codec (same results)").
        warning: the warning class issued once when the library is unavailable.
        error: the exception class :meth:`handle` raises when it is unavailable.
    """

    def __init__(
        self,
        file_name: str,
        env_var: str,
        try_load: TryLoad,
        fallback: str,
        warning: type[Warning],
        error: type[Exception],
    ) -> None:
        self.file_name, self.env_var, self.fallback = file_name, env_var, fallback
        self.packaged = PACKAGE_DIR / "_native" / file_name
        self.repo = PACKAGE_DIR.parent / "kernels" / "build" / file_name
        self._try_load, self._warning, self._error = try_load, warning, error
        self._lock = threading.Lock()
        self._state: dict = {}  # "lib", "path", "reason", "explicit", "warned" once resolved

    @property
    def name(self) -> str:
        return self.file_name.removesuffix(".so")

    def _load(self, path: Path, explicit: bool) -> None:
        lib, reason = self._try_load(path)
        self._state.update(
            lib=lib, path=path if lib else None, reason=reason, explicit=explicit, warned=False
        )

    def resolve(self) -> dict:
        """The resolved state (loads on first use)."""
        with self._lock:
            if not self._state:
                env = os.environ.get(self.env_var)
                if env:
                    self._load(Path(env), explicit=True)
                else:
                    reasons = []
                    for path in (self.packaged, self.repo):
                        if not path.is_file():
                            reasons.append(f"{path}: not found")
                            continue
                        self._load(path, explicit=False)
                        if self._state["lib"] is not None:
                            break
                        reasons.append(self._state["reason"])
                    else:
                        self._state.update(lib=None, path=None, reason="; ".join(reasons), explicit=False)
                    self._state["warned"] = False
            return self._state

    def reload(self, path: Path | str | None = None) -> bool:
        """Forget the resolved library and resolve again: from ``path`` (as if the environment variable named
        it) or, with None, the usual search. For tests and tools that build the library elsewhere."""
        with self._lock:
            self._state.clear()
            if path is not None:
                self._load(Path(path), explicit=True)
        return self.available()

    def available(self) -> bool:
        return self.resolve()["lib"] is not None

    def unavailable_reason(self) -> str:
        """Why the library did not load ("" when it did)."""
        return self.resolve()["reason"]

    def library_path(self) -> Path | None:
        return self.resolve()["path"]

    def explicitly_requested(self) -> bool:
        """True when the environment variable names the library (a failure to load it must not be hidden)."""
        return bool(self.resolve()["explicit"])

    def warn_unavailable(self) -> None:
        """Warn (once per process) that the fallback runs because the library is missing."""
        st = self.resolve()
        with self._lock:
            if st["warned"]:
                return
            st["warned"] = True
        warnings.warn(
            f"{self.name} unavailable ({st['reason']}); using {self.fallback}. "
            "Build it with `make -C kernels cpu` or reinstall nora-edge with a C compiler.",
            self._warning,
            stacklevel=3,
        )

    def handle(self) -> ctypes.CDLL:
        """The loaded library.

        Raises:
            the ``error`` class: the library is unavailable (the reason and how to build it in the message).
        """
        st = self.resolve()
        if st["lib"] is None:
            raise self._error(
                f"{self.name} unavailable: {st['reason']} (build it with `make -C kernels cpu`)"
            )
        return st["lib"]
