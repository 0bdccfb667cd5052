"""numpy DCT-II / DCT-III against scipy.fft (norm="ortho")."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.fft import dct, idct

from nora_edge.actions import dct_basis, dct_ortho, idct_ortho
from nora_edge.errors import InputError


@settings(deadline=None, max_examples=60)
@given(t=st.integers(1, 200), d=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_dct_matches_scipy(t, d, seed):
    x = np.random.default_rng(seed).normal(0.0, 30.0, (2, t, d))
    np.testing.assert_allclose(
        dct_ortho(x), dct(x, axis=1, norm="ortho"), rtol=0, atol=1e-12 * 30 * np.sqrt(t)
    )
    np.testing.assert_allclose(
        idct_ortho(x), idct(x, axis=1, norm="ortho"), rtol=0, atol=1e-12 * 30 * np.sqrt(t)
    )


@pytest.mark.parametrize("t", [1, 2, 7, 50, 333])
def test_basis_is_orthonormal(t):
    basis = dct_basis(t)
    np.testing.assert_allclose(basis @ basis.T, np.eye(t), atol=1e-13)
    assert not basis.flags.writeable


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_length(bad):
    with pytest.raises(InputError, match="positive integer"):
        dct_basis(bad)
