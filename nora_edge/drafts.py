"""Where multi-token proposals come from: an n-gram index of FAST token sequences (lookup only).

Data flow: the bundle's ``drafts.json`` when it ships one (the model's own generated ids on calibration frames,
written by ``export --multi-token --calibration``; :func:`read_drafts`) --:meth:`DraftTable.seed`--> and then
every finished chunk's generated ids --:meth:`DraftTable.observe`--> n-gram -> continuation index, per
instruction and process-wide (a later chunk's n-grams replace the calibration ones)
--:meth:`DraftTable.propose` (longest suffix of the tokens so far)--> up to K ids
--:func:`admissible`: cut where the FAST automaton would refuse them--> drafts for one verify call
(:mod:`nora_edge.multitoken`). Nothing here decides a token: a wrong draft costs speed, never an action.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nora_edge.errors import BundleError
from nora_edge.selection import GreedySelector

DRAFTS_FORMAT = "nora-edge-drafts/1"


class DraftTable:
    """Proposals from earlier chunks of this process (lookup only: nothing here decides a token).

    An n-gram index over every recorded chunk: each n-gram (n = 1 .. ``max_suffix``) of a chunk maps to the ids
    that followed it there (up to ``MAX_CONTINUATION``). A proposal takes the longest suffix of the tokens so far
    that the index holds, first among the chunks of the same instruction, then among all; at equal length the
    most recent chunk wins, and within a chunk the earliest occurrence.

    Args:
        max_suffix: longest suffix matched.
        max_entries: index size per table before it is cleared (a bounded process-long memory).
    """

    MAX_CONTINUATION = 16

    def __init__(
        self, max_suffix: int = 4, max_entries: int = 1 << 16, min_rate: float = 0.2, probe_every: int = 4
    ) -> None:
        self.max_suffix, self.max_entries = max_suffix, max_entries
        self.min_rate, self.probe_every = min_rate, probe_every
        self.by_key: dict[str, dict[tuple[int, ...], list[int]]] = {}
        self.any: dict[tuple[int, ...], list[int]] = {}
        self.rate: dict[str, list[float]] = {}  # key -> [decayed proposed, decayed accepted, chunks gated]

    def record(self, key: str, proposed: int, accepted: int) -> None:
        """Account one chunk's drafts (decay 0.8 per chunk) for :meth:`enabled`."""
        r = self.rate.setdefault(key, [0.0, 0.0, 0.0])
        r[0], r[1] = 0.8 * r[0] + proposed, 0.8 * r[1] + accepted

    def enabled(self, key: str, min_rate: float | None = None) -> bool:
        """False when the instruction's recent drafts were mostly rejected (accepted / proposed < ``min_rate``,
        default the table's, over >= 8 decayed drafts): its chunks then decode plainly, except every
        ``probe_every``-th, which drafts again so the rate can recover."""
        rate = self.min_rate if min_rate is None else min_rate
        r = self.rate.get(key)
        if r is None or r[0] < 8 or r[1] >= rate * r[0]:
            return True
        r[2] += 1
        return r[2] % self.probe_every == 0

    def observe(self, key: str, ids: np.ndarray) -> None:
        """Record a finished chunk's generated ids (Qwen ids, (N,))."""
        seq = [int(i) for i in ids]
        own = self.by_key.setdefault(key, {})
        for table in (own, self.any):
            if len(table) > self.max_entries:
                table.clear()
            for n in range(1, self.max_suffix + 1):
                for j in range(len(seq) - n - 1, -1, -1):  # earliest occurrence written last: it wins
                    table[tuple(seq[j : j + n])] = seq[j + n : j + n + self.MAX_CONTINUATION]

    def seed(self, chunks: list[tuple[str, np.ndarray]]) -> int:
        """Observe calibration chunks ((instruction, Qwen ids (N,)) as :func:`read_drafts` returns them) in order;
        returns how many. Chunks recorded later (the process's own) replace their n-grams."""
        for key, ids in chunks:
            self.observe(key, ids)
        return len(chunks)

    def propose(self, key: str, out: list[int], k: int) -> list[int]:
        """Up to ``k`` ids expected after ``out`` (the tokens generated so far, pending one included)."""
        own = self.by_key.get(key, {})
        for m in range(min(self.max_suffix, len(out)), 0, -1):
            suffix = tuple(out[len(out) - m :])
            for table in (own, self.any):
                cont = table.get(suffix)
                if cont:
                    return cont[:k]
        return []


def read_drafts(path: str | Path, vocab_size: int | None = None) -> list[tuple[str, np.ndarray]]:
    """A bundle's ``drafts.json``: ``{"format": DRAFTS_FORMAT, "chunks": [{"instruction", "ids"}, ...]}``.

    Args:
        path: the file.
        vocab_size: when given, every id must lie in [0, vocab_size).

    Returns:
        [(instruction, ids (N,) int64)], in file order.

    Raises:
        BundleError: unreadable JSON, another format, or a chunk without a string instruction and a list of
            int ids in range (the chunk's index named).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable draft file ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != DRAFTS_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise BundleError(f"{path}: format must be {DRAFTS_FORMAT!r}, got {got!r}")
    chunks = doc.get("chunks")
    if not isinstance(chunks, list):
        raise BundleError(f"{path}: 'chunks' must be a list")
    out = []
    for i, c in enumerate(chunks):
        ids = c.get("ids") if isinstance(c, dict) else None
        text = c.get("instruction") if isinstance(c, dict) else None
        ok = isinstance(ids, list) and all(type(x) is int and x >= 0 for x in ids)
        if not isinstance(text, str) or not ok:
            raise BundleError(f"{path}: chunks[{i}] needs a string 'instruction' and a list of int ids >= 0")
        if ids and max(ids) >= 2**63:  # beyond int64: no vocabulary holds it
            raise BundleError(f"{path}: chunks[{i}] holds id {max(ids)} beyond int64")
        arr = np.asarray(ids, dtype=np.int64)
        if vocab_size is not None and arr.size and int(arr.max()) >= vocab_size:
            raise BundleError(f"{path}: chunks[{i}] holds id {int(arr.max())} >= vocab size {vocab_size}")
        out.append((text, arr))
    return out


def admissible(sel: GreedySelector, drafts: list[int], base: int) -> list[int]:
    """``drafts`` cut at the first id the selector's automaton would never choose (constrained mode only)."""
    auto = sel.automaton
    if auto is None:
        return drafts
    state, keep = sel.state, []
    for d in drafts:
        f = d - base
        if auto.is_complete(state) or not 0 <= f < auto.vocab_size or not auto.allowed(state)[f]:
            break
        keep.append(d)
        state = auto.advance(state, f)
    return keep
