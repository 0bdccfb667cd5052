"""Session fixtures for the FAST codec tests: tokenizers fitted once per session (see reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

from nora_edge.actions import FastTokenizer

from .reference import training_chunks


@pytest.fixture(scope="session")
def fast_main() -> FastTokenizer:
    """FAST+-like: scale 10, vocab 2048, horizons and dims mixed, decode shape given at call time."""
    shapes = [(1, 7), (5, 7), (10, 7), (50, 7), (5, 1), (10, 14), (50, 14), (1, 14), (50, 1)]
    return FastTokenizer.fit(training_chunks(0, shapes, 300), scale=10.0, vocab_size=2048)


@pytest.fixture(scope="session")
def fast_h5() -> FastTokenizer:
    """A second tokenizer at one horizon (T=5, D=7, like NORA-Long), vocab 1024, shape stored in the config."""
    return FastTokenizer.fit(
        training_chunks(1, [(5, 7)], 2000), scale=10.0, vocab_size=1024, time_horizon=5, action_dim=7
    )


@pytest.fixture(scope="session")
def fast_wide() -> FastTokenizer:
    """Large amplitudes: the coefficient alphabet reaches into 3-byte UTF-8 characters."""
    rng = np.random.default_rng(2)
    chunks = list(np.cumsum(rng.normal(0.0, 1.0, (2000, 5, 3)), axis=1) * 12.0)  # (B, T, D) random walks
    return FastTokenizer.fit(chunks, scale=10.0, vocab_size=8192)


@pytest.fixture(scope="session", params=["main", "h5", "wide"])
def any_fast(request, fast_main, fast_h5, fast_wide) -> FastTokenizer:
    return {"main": fast_main, "h5": fast_h5, "wide": fast_wide}[request.param]
