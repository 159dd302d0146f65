"""Fixtures of the sensitivity tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: these tiny products are ~15x faster than with threads fighting
    over a shared 2-core machine. Restored afterwards. Modules ask for it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
