"""scikit-learn digits (8x8 grey images of 0-9) and the one seeded train/test split everything shares.

The zoo (``modelpress.train.zoo``) trains on the train part of ``digits_split(0)``; ``load_data("digits")``
evaluates on its test part and calibrates/trains on the train part, so evaluation never sees training data.
"""

from __future__ import annotations

import functools

import numpy as np

from modelpress.errors import ModelpressError

__all__ = ["digits_split"]


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ModelpressError(
            "the digits data needs scikit-learn, which is not installed", "pip install scikit-learn"
        ) from err
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def digits_split(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits as ``(x_train, y_train, x_test, y_test)``: x [N, 1, 8, 8] float32 in [0, 1].

    The split is a seeded permutation (1438 train, 359 test with the defaults). The zoo trains on the
    train part of ``digits_split(0)`` and ``load_data("digits")`` evaluates on its test part.
    """
    x, y = _digits_arrays()
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]
