"""Orthonormal DCT-II / DCT-III along the time axis, in float64 numpy.

Data flow: actions (B, T, D) --dct_ortho--> coefficients (B, T, D) --idct_ortho--> actions (B, T, D).
Both are one matmul with a cached (T, T) float64 basis, equal to ``scipy.fft.dct/idct(x, axis=-2,
norm="ortho")`` (type 2 / its inverse, type 3) up to float64 rounding. scipy is deliberately not a
runtime dependency; the tests use it as the reference.
"""

from __future__ import annotations

import functools

import numpy as np

from nora_edge.errors import InputError


@functools.lru_cache(maxsize=128)
def dct_basis(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix.

    ``basis[k, t] = s_k * sqrt(2 / n) * cos(pi * (2t + 1) * k / (2n))`` with ``s_0 = 1/sqrt(2)``,
    ``s_k = 1`` otherwise. The angle is reduced modulo 2*pi in integer arithmetic first, so every
    cosine is evaluated on [0, 2*pi) and the basis stays accurate to ~1 ulp for any ``n``.

    Args:
        n: Transform length (the time horizon T), >= 1.

    Returns:
        Read-only float64 array (n, n); rows are frequencies. ``basis @ basis.T == I``.
    """
    if int(n) != n or n < 1:
        raise InputError(f"DCT length must be a positive integer, got {n!r}")
    n = int(n)
    k = np.arange(n, dtype=np.int64)[:, None]  # (n, 1) frequency
    t = np.arange(n, dtype=np.int64)[None, :]  # (1, n) time
    phase = ((2 * t + 1) * k) % (4 * n)  # (n, n) angle in units of pi / (2n)
    basis = np.cos(np.pi * phase / (2.0 * n)) * np.sqrt(2.0 / n)
    basis[0, :] = np.sqrt(1.0 / n)
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=128)
def idct_basis(n: int) -> np.ndarray:
    """Read-only C-contiguous transpose of :func:`dct_basis` (the DCT-III matrix), float64 (n, n)."""
    basis = np.ascontiguousarray(dct_basis(n).T)
    basis.setflags(write=False)
    return basis


def dct_ortho(x: np.ndarray) -> np.ndarray:
    """DCT-II (norm="ortho") along the time axis (second to last).

    Args:
        x: float array (..., T, D).

    Returns:
        float64 array (..., T, D) of coefficients.
    """
    x = np.asarray(x, dtype=np.float64)
    return np.matmul(dct_basis(x.shape[-2]), x)  # (T, T) @ (..., T, D) -> (..., T, D)


def idct_ortho(coeffs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`dct_ortho` (DCT-III, norm="ortho") along the time axis.

    Args:
        coeffs: float array (..., T, D).

    Returns:
        float64 array (..., T, D) in the time domain.
    """
    coeffs = np.asarray(coeffs, dtype=np.float64)
    return np.matmul(idct_basis(coeffs.shape[-2]), coeffs)  # (T, T) @ (..., T, D) -> (..., T, D)
