"""Regenerate kernels/testdata/native: a FAST+-like codec (vocab 2048, T=5, D=7) for `make -C kernels gpu-check`.

Data flow: smooth synthetic chunks (seed 0) --FastTokenizer.fit (scale 10, BPE vocab 2048)--> byte table
--FastAutomaton (T=5, D=7)--> + a synthetic decoder head (2048 action rows after 64 other rows, shuffled so
rows are not in id order) + a q01/q99 chain by the caller's key (two keys) with NORA's gripper steps
--write_native--> kernels/testdata/native/. Run: .venv/bin/python kernels/testdata/make_testdata.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nora_edge.actions import FastAutomaton, FastTokenizer
from nora_edge.actions.native import build_native, write_native
from nora_edge.actions.normalize import NormStats
from nora_edge.actions.postprocess import Chain
from nora_edge.errors import InputError

T, D, VOCAB, BASE, OTHER = 5, 7, 2048, 5000, 64


def smooth_chunks(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    time = np.linspace(0.0, 1.0, T)[:, None]  # (T, 1)
    out = []
    for _ in range(n):
        amp = rng.normal(0.0, 0.6, (3, 1, D)) * rng.choice([1.0, 4.0, 12.0], (1, 1, D))
        freq = rng.uniform(0.2, 2.0, (3, 1, D))
        phase = rng.uniform(0.0, 2 * np.pi, (3, 1, D))
        out.append((amp * np.sin(2 * np.pi * freq * time + phase)).sum(0) + rng.normal(0, 0.01, (T, D)))
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    tok = FastTokenizer.fit(
        smooth_chunks(rng, 3000), scale=10.0, vocab_size=VOCAB, time_horizon=T, action_dim=D
    )
    table = tok.table
    auto = FastAutomaton(table, T, D)
    head = np.concatenate([np.arange(OTHER), BASE + np.arange(table.vocab_size)])  # (n_rows,) model ids
    head = head[rng.permutation(head.size)]
    stats = {
        k: NormStats(k, rng.uniform(-1.0, -0.01, D), rng.uniform(0.01, 1.0, D))
        for k in ("robot_a", "robot_b")
    }
    chain = Chain.from_json(
        [
            {"op": "unnormalize", "mode": "q01_q99", "key": None, "source": "norm_stats.json"},
            {"op": "gripper_rescale", "dim": -1},
            {"op": "gripper_binarize", "dim": -1},
            {"op": "gripper_invert", "dim": -1},
        ],
        InputError,
        "testdata chain",
    )
    out = write_native(Path(__file__).parent / "native", build_native(table, auto, head, BASE, chain, stats))
    print(f"{out}: V={table.vocab_size} alphabet_max={table.alphabet_max} Q={auto.dfa_states}")


if __name__ == "__main__":
    main()
