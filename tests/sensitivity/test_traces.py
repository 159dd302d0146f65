"""Hutchinson traces against the exact per-layer traces of a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from sensitivity.hvp import HessianVectorProducts
from sensitivity.traces import hutchinson_traces
from tests.sensitivity.helpers import TinyProblem, exact_hessian, tiny_problem

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/sensitivity/conftest.py


@pytest.fixture(scope="module")
def problem() -> TinyProblem:
    return tiny_problem()


def _run(problem: TinyProblem, **settings):
    hvp = HessianVectorProducts(problem.loss(batch_size=12), probes_per_pass=8)
    return hutchinson_traces(hvp, **settings), hvp


def test_traces_within_four_standard_errors_of_exact(problem: TinyProblem) -> None:
    traces, hvp = _run(problem, seed=3, tolerance=1e-9, min_probes=8, max_probes=128)
    hessian = exact_hessian(problem)
    for record, block, layer in zip(traces, problem.blocks(), problem.program.layers):
        exact = float(np.trace(hessian[block, block]))
        assert record.num_probes == 128
        assert record.num_params == layer.num_params
        assert record.standard_error > 0
        assert abs(record.trace - exact) < 4 * record.standard_error, (record.name, record.trace, exact)
        assert record.average_trace == pytest.approx(
            exact / layer.num_params, abs=4 * record.average_trace_standard_error
        )
    assert hvp.num_hvps == 128


def test_standard_error_shrinks_like_inverse_sqrt_of_probes(problem: TinyProblem) -> None:
    few, _ = _run(problem, seed=5, tolerance=1e-9, min_probes=8, max_probes=16)
    many, _ = _run(problem, seed=5, tolerance=1e-9, min_probes=8, max_probes=256)
    # SE = s/sqrt(k): 16x more probes divide it by about 4 (s itself fluctuates with k=16).
    ratios = [a.standard_error / b.standard_error for a, b in zip(few, many)]
    assert all(2.0 < r < 8.0 for r in ratios), ratios
    assert float(np.median(ratios)) == pytest.approx(4.0, rel=0.5)


def test_seeded_runs_reproduce_exactly(problem: TinyProblem) -> None:
    first, _ = _run(problem, seed=11, max_probes=24)
    second, _ = _run(problem, seed=11, max_probes=24)
    other, _ = _run(problem, seed=12, max_probes=24)
    assert first == second
    assert [t.trace for t in first] != [t.trace for t in other]


def test_adaptive_stopping(problem: TinyProblem) -> None:
    loose, _ = _run(problem, seed=0, tolerance=10.0, min_probes=8, max_probes=256)
    assert all(t.num_probes == 8 for t in loose)  # the minimum, then every relative SE < 10
    tight, _ = _run(problem, seed=0, tolerance=1e-6, min_probes=8, max_probes=40)
    assert all(t.num_probes == 40 for t in tight)  # the cap
    moderate, _ = _run(problem, seed=0, tolerance=0.5, min_probes=8, max_probes=512)
    probes = moderate[0].num_probes
    assert 8 < probes < 512 and all(t.num_probes == probes for t in moderate)
    assert all(t.relative_standard_error < 0.5 for t in moderate)
