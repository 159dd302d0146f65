"""Power-iteration eigenvalues against eigvalsh of the exact diagonal blocks of a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from sensitivity.eigen import top_eigenvalues
from sensitivity.hvp import HessianVectorProducts
from tests.sensitivity.helpers import TinyProblem, exact_hessian, tiny_problem

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/sensitivity/conftest.py


@pytest.fixture(scope="module")
def problem() -> TinyProblem:
    return tiny_problem()


def _largest_magnitude(block: np.ndarray) -> float:
    values = np.linalg.eigvalsh(block)
    return float(values[np.argmax(np.abs(values))])


@pytest.mark.slow
def test_eigenvalues_match_exact_blocks(problem: TinyProblem) -> None:
    hvp = HessianVectorProducts(problem.loss(batch_size=12), probes_per_pass=3)
    eigen = top_eigenvalues(hvp, seed=0, tolerance=1e-8, max_iterations=500)
    hessian = exact_hessian(problem)
    for record, block in zip(eigen, problem.blocks()):
        exact = _largest_magnitude(hessian[block, block])
        assert record.converged, record
        assert record.relative_change is not None and record.relative_change < 1e-8
        assert record.eigenvalue == pytest.approx(exact, rel=1e-3), record.name
    assert hvp.num_hvps == sum(record.iterations for record in eigen)


@pytest.mark.slow
def test_iteration_cap_reports_not_converged(problem: TinyProblem) -> None:
    hvp = HessianVectorProducts(problem.loss(batch_size=24))
    eigen = top_eigenvalues(hvp, seed=0, tolerance=1e-14, max_iterations=3)
    assert all(record.iterations == 3 and not record.converged for record in eigen)
    assert all(record.relative_change is not None and record.relative_change > 0 for record in eigen)


@pytest.mark.slow
def test_seeded_runs_reproduce_exactly(problem: TinyProblem) -> None:
    def run(seed: int):
        return top_eigenvalues(HessianVectorProducts(problem.loss()), seed=seed, tolerance=1e-4, max_iterations=20)

    assert run(4) == run(4)
