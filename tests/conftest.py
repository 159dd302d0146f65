"""Fixtures shared by every test area (the builders behind them are in ``tests/models.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

from tests import processes
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


def pytest_configure(config: pytest.Config) -> None:
    processes.mark_session()  # every process the session starts inherits it (tests/processes.py)


@pytest.fixture(autouse=True, scope="session")
def _no_process_left_by_the_session() -> Iterator[None]:
    """Once every session fixture has closed, no process the session started runs on."""
    yield
    _fail_on_leftovers("the test session", processes.leftovers())


@pytest.fixture(autouse=True, scope="module")
def _no_process_left_by_the_module() -> Iterator[None]:
    """A test module ends with no process of its own running: servers, workers and commands it started
    were stopped and waited for, on failure too. The spare inspectors of the session's apps
    (tests/service/conftest.py, children of this process) live on until the session ends."""
    yield
    _fail_on_leftovers("this test module", processes.leftovers(expected=_session_app_inspector))


def _session_app_inspector(process: psutil.Process) -> bool:
    try:
        return process.ppid() == os.getpid() and "service.inspection.checks" in process.cmdline()
    except psutil.Error:
        return False


def _fail_on_leftovers(who: str, left: list[psutil.Process]) -> None:
    if left:
        report = processes.describe(left)
        processes.kill(left)
        pytest.fail(f"{who} left {len(left)} process(es) running (now killed):\n{report}", pytrace=False)
