"""The digits data set's splits: the default one and the cross-validation folds."""

import numpy as np

from sensitivity.examples import Digits, load_digits


def _rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distinct (image, label) rows."""
    return np.unique(np.concatenate([x.reshape(len(x), -1), y[:, None]], axis=1), axis=0)


def _test_rows(fold: Digits) -> set[bytes]:
    return {row.tobytes() for row in _rows(fold.test_x, fold.test_y)}


def test_folds_hold_out_almost_disjoint_test_sets_that_cover_the_data():
    default = load_digits()
    folds = [load_digits(fold=k) for k in range(4)]
    np.testing.assert_array_equal(folds[0].test_x, default.test_x)
    np.testing.assert_array_equal(folds[0].train_y, default.train_y)
    assert all((len(f.train_y), len(f.test_y)) == (1347, 450) for f in folds)
    everything = _rows(
        np.concatenate([default.train_x, default.test_x]), np.concatenate([default.train_y, default.test_y])
    )
    assert set().union(*map(_test_rows, folds)) == {row.tobytes() for row in everything}
    for k in range(1, 4):
        assert len(_test_rows(folds[k - 1]) & _test_rows(folds[k])) == 0
    assert len(_test_rows(folds[3]) & _test_rows(folds[0])) <= 3  # 4 × 450 = 1797 + 3
