"""Fixtures shared by every test area (the builders behind them are in ``tests/models.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.models import npz_bytes, tiny_onnx_model


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real models of the zoo take seconds each: every ``zoo`` test is also ``slow``, so that
    ``-m "not slow"`` (CONTRIBUTING.md, the fast tier) leaves them out."""
    for item in items:
        if item.get_closest_marker("zoo") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _private_sensitivity_cache(tmp_path_factory, monkeypatch) -> None:
    """Each test gets its own (empty) local sensitivity cache, for the CLI it runs in-process and
    in subprocesses: a result cached by one test must not stand in for another test's computation,
    and nothing is written to the home folder."""
    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path_factory.mktemp("mpq-cache")))


@pytest.fixture(scope="session")
def tiny_model_bytes() -> bytes:
    return tiny_onnx_model().SerializeToString()


@pytest.fixture(scope="session")
def tiny_dataset_bytes() -> bytes:
    rng = np.random.default_rng(0)
    return npz_bytes(x=rng.standard_normal((16, 8)).astype(np.float32), labels=rng.integers(0, 3, 16))
