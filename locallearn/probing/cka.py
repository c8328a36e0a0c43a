"""Centered kernel alignment between two sets of features of the same inputs (Kornblith et al. 2019).

CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels K = X X^T, L = Y Y^T.
``linear_cka`` uses the biased HSIC in its feature-space form (O(N C^2), any N); ``unbiased_cka`` the
unbiased estimator (Song et al. 2012), which removes the bias towards 1 of small samples (O(N^2)).
It is 1 for identical features and invariant to orthogonal transforms and isotropic scaling.
"""

import numpy as np


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """(N, C1), (N, C2) -> CKA in [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = k.shape[0]
    k = k.copy()
    l = l.copy()  # noqa: E741
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    # For symmetric K, L: tr(KL) = sum(K * L) and 1^T K L 1 = (K 1) . (L 1); all O(N^2).
    k_sum, l_sum = k.sum(1), l.sum(1)
    term = (k * l).sum() + k_sum.sum() * l_sum.sum() / ((n - 1) * (n - 2)) - 2.0 * (k_sum @ l_sum) / (n - 2)
    return float(term / (n * (n - 3)))


def unbiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """(N, C1), (N, C2) with N > 3 -> CKA from unbiased HSIC estimates (can be slightly negative)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return _unbiased_hsic(k, l) / np.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(l, l))


CKA = {"linear": linear_cka, "unbiased": unbiased_cka}
