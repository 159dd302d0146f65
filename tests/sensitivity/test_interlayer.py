"""G, g·Δ, Ω and the predicted loss change against the exact Hessian of a tiny model."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from sensitivity.hvp import HessianVectorProducts
from sensitivity.interlayer import (
    diagonal_loss_change,
    interlayer_terms,
    omega,
    perturbations,
    predicted_loss_change,
    shrunk_gradient_terms,
)
from sensitivity.results import InterLayerTerms, LayerTrace
from tests.sensitivity.helpers import TinyProblem, exact_gradient, exact_hessian, tiny_problem

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/sensitivity/conftest.py

BITS = (8, 4, 2)


@pytest.fixture(scope="module")
def problem() -> TinyProblem:
    return tiny_problem()


def _exact_traces(problem: TinyProblem) -> list[LayerTrace]:
    hessian = exact_hessian(problem)
    return [
        LayerTrace(layer.name, layer.num_params, float(np.trace(hessian[b, b])), 0.0, 1)
        for layer, b in zip(problem.program.layers, problem.blocks())
    ]


@pytest.fixture(scope="module")
def terms(problem: TinyProblem) -> InterLayerTerms:
    hvp = HessianVectorProducts(problem.loss(batch_size=12), probes_per_pass=4)
    result = interlayer_terms(hvp, problem.program.layers, BITS, _exact_traces(problem))
    assert hvp.num_hvps == len(problem.program.layers) * len(BITS)  # one per column
    return result


def test_progress_is_reported_after_each_column(problem: TinyProblem) -> None:
    hvp = HessianVectorProducts(problem.loss(batch_size=12), probes_per_pass=4)
    reports: list[tuple[str, float, str]] = []
    interlayer_terms(
        hvp, problem.program.layers, BITS, _exact_traces(problem), progress=lambda *report: reports.append(report)
    )
    columns = len(problem.program.layers) * len(BITS)
    assert len(reports) == columns and {phase for phase, _, _ in reports} == {"interlayer"}
    fractions = [fraction for _, fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[0] > 0 and fractions[-1] == pytest.approx(0.9)
    assert reports[-1][2].startswith(f"{columns}/{columns} columns of G") and "s left" in reports[-1][2]


def _full_deltas(problem: TinyProblem) -> dict[tuple[str, int], np.ndarray]:
    """Each Δᵢᵇ embedded in a zero vector over all layer weights."""
    point = tuple(problem.program.layer_weights.values())
    full = {}
    for (name, bits), delta in perturbations(problem.program.layers, point, BITS).items():
        vector = tuple(
            delta if layer.name == name else torch.zeros(layer.shape, dtype=torch.float64)
            for layer in problem.program.layers
        )
        full[(name, bits)] = problem.flatten(vector).numpy()
    return full


def _configurations(problem: TinyProblem) -> list[dict[str, int | None]]:
    names = [layer.name for layer in problem.program.layers]
    return [dict(zip(names, choice)) for choice in itertools.product([None, *BITS], repeat=len(names))]


def test_g_matches_exact_blocks(problem: TinyProblem, terms: InterLayerTerms) -> None:
    hessian = exact_hessian(problem)
    deltas = _full_deltas(problem)
    assert terms.labels == tuple(deltas)
    vectors = np.stack([deltas[label] for label in terms.labels])
    exact = vectors @ hessian @ vectors.T
    assert np.allclose(terms.array(), exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    assert terms.symmetry_error < 1e-8
    off_diagonal = [
        exact[a, c]
        for a, c in itertools.product(range(len(vectors)), repeat=2)
        if terms.labels[a][0] != terms.labels[c][0]
    ]
    assert np.abs(off_diagonal).max() > 1e-3 * np.abs(exact).max()  # the inter-layer terms are not negligible here


def test_gradient_terms_norms_and_omega(problem: TinyProblem, terms: InterLayerTerms) -> None:
    gradient = exact_gradient(problem)
    traces = {t.name: t for t in _exact_traces(problem)}
    for a, (label, delta) in enumerate(_full_deltas(problem).items()):
        assert terms.gradient_terms[a] == pytest.approx(float(gradient @ delta), rel=1e-8, abs=1e-14)
        assert terms.delta_norms_squared[a] == pytest.approx(float(delta @ delta), rel=1e-12)
        clipped = max(traces[label[0]].average_trace, 0.0)  # Ω assumes a PSD block: see omega_trace
        assert terms.omega[a] == pytest.approx(clipped * float(delta @ delta), rel=1e-12, abs=1e-300)


def _sample_gradients(problem: TinyProblem) -> np.ndarray:
    """∇Lₛ of each calibration sample's own loss, [samples, weights], independently of losses.py."""
    names = [layer.name for layer in problem.program.layers]
    rows = []
    for s in range(len(problem.calibration["labels"])):
        flat = problem.point().clone().requires_grad_(True)
        state = {
            **{k: v.detach() for k, v in problem.module.named_parameters()},
            **dict(zip(names, problem.unflatten(flat))),
        }
        logits = torch.func.functional_call(
            problem.module, state, (torch.from_numpy(problem.calibration["input"][s : s + 1]),)
        )
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(problem.calibration["labels"][s : s + 1]))
        rows.append(torch.autograd.grad(loss, flat)[0].numpy())
    return np.stack(rows)


def test_gradient_term_errors_are_the_standard_errors_over_samples(
    problem: TinyProblem, terms: InterLayerTerms
) -> None:
    per_sample = _sample_gradients(problem)  # the fixture's loss has two batches: errors span both
    for a, delta in enumerate(_full_deltas(problem).values()):
        derivatives = per_sample @ delta
        assert derivatives.mean() == pytest.approx(terms.gradient_terms[a], rel=1e-8, abs=1e-14)
        expected = derivatives.std(ddof=1) / np.sqrt(len(derivatives))
        assert terms.gradient_term_errors[a] == pytest.approx(expected, rel=1e-8, abs=1e-15)
    assert min(terms.gradient_term_errors) > 0


def test_shrinkage_keeps_clear_terms_and_drops_noise() -> None:
    legacy = InterLayerTerms(  # written before errors existed
        labels=(("a", 8), ("a", 4), ("b", 8), ("b", 4)),
        matrix=((0.0,) * 4,) * 4,
        gradient_terms=(2.0, -0.5, -3.0, 0.0),
        delta_norms_squared=(1.0,) * 4,
        omega=(1.0,) * 4,
        symmetry_error=0.0,
    )
    terms = dataclasses.replace(legacy, gradient_term_errors=(0.2, 1.0, 3.0, 1.0))
    shrunk = shrunk_gradient_terms(terms)
    assert shrunk == pytest.approx((2.0 * 0.99, 0.0, 0.0, 0.0))  # z = 10 kept almost whole; |z| ≤ 1 dropped
    assert shrunk_gradient_terms(legacy) == legacy.gradient_terms
    assert InterLayerTerms.from_dict(terms.to_dict()) == terms
    assert (
        InterLayerTerms.from_dict({k: v for k, v in legacy.to_dict().items() if k != "gradient_term_errors"}) == legacy
    )


def test_predicted_loss_change_is_the_exact_second_order_expansion(
    problem: TinyProblem, terms: InterLayerTerms
) -> None:
    hessian, gradient, deltas = exact_hessian(problem), exact_gradient(problem), _full_deltas(problem)
    for configuration in _configurations(problem):
        total = sum((deltas[(n, b)] for n, b in configuration.items() if b is not None), np.zeros(len(gradient)))
        expected = float(gradient @ total + 0.5 * total @ hessian @ total)
        assert predicted_loss_change(terms, configuration) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_omega_and_diagonal_predictor(problem: TinyProblem, terms: InterLayerTerms) -> None:
    index = terms.index()
    configuration = {"conv.weight": 4, "fc1.weight": None, "fc2.weight": 8}
    expected = terms.omega[index[("conv.weight", 4)]] + terms.omega[index[("fc2.weight", 8)]]
    assert omega(terms, configuration) == pytest.approx(expected, rel=1e-15)
    assert diagonal_loss_change(terms, configuration) == pytest.approx(0.5 * expected, rel=1e-15)
    assert predicted_loss_change(terms, {}) == 0.0
    assert omega(terms, {"conv.weight": None}) == 0.0


def test_second_order_prediction_tracks_the_measured_change(problem: TinyProblem, terms: InterLayerTerms) -> None:
    """At 8 bits Δ is tiny, so the remainder O(‖Δ‖³) is far below the prediction."""
    loss = problem.loss(batch_size=24)
    weights = dict(loss.weights0)
    deltas = perturbations(problem.program.layers, tuple(weights.values()), (8,))
    for (name, _), delta in deltas.items():
        perturbed = {**weights, name: weights[name] + delta}
        measured = loss.value(perturbed) - loss.value()
        assert predicted_loss_change(terms, {name: 8}) == pytest.approx(measured, rel=1e-2, abs=1e-9)


def test_bad_configurations_are_named(terms: InterLayerTerms) -> None:
    with pytest.raises(ValueError, match="unknown layers \\['nope'\\]"):
        predicted_loss_change(terms, {"nope": 8})
    with pytest.raises(ValueError, match="at 6 bits; computed bit widths: \\[2, 4, 8\\]"):
        predicted_loss_change(terms, {"fc1.weight": 6})


def test_fp16_terms_match_exact_blocks_and_are_far_below_8_bits(problem: TinyProblem) -> None:
    """b = 16 (float16 rounding, the fp16 candidate) flows through the same G, g·Δ and Ω as the integer widths."""
    bits = (16, 8)
    hvp = HessianVectorProducts(problem.loss(batch_size=12), probes_per_pass=4)
    result = interlayer_terms(hvp, problem.program.layers, bits, _exact_traces(problem))
    point = tuple(problem.program.layer_weights.values())
    deltas = perturbations(problem.program.layers, point, bits)
    for (name, b), delta in deltas.items():
        if b == 16:  # float16 of the float32 weight, as the exporter stores it
            weight = dict(zip((layer.name for layer in problem.program.layers), point))[name]
            expected = weight.float().numpy().astype(np.float16).astype(np.float64) - weight.numpy()
            np.testing.assert_allclose(delta.numpy(), expected, rtol=0, atol=1e-12)
    vectors = []
    for label in result.labels:
        vector = tuple(
            deltas[label] if layer.name == label[0] else torch.zeros(layer.shape, dtype=torch.float64)
            for layer in problem.program.layers
        )
        vectors.append(problem.flatten(vector).numpy())
    exact = np.stack(vectors) @ exact_hessian(problem) @ np.stack(vectors).T
    assert np.allclose(result.array(), exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    omega_of = dict(zip(result.labels, result.omega))
    names = [layer.name for layer in problem.program.layers]
    total_8 = sum(omega_of[(name, 8)] for name in names)
    # float16's step is about 2^-11 of each weight, int8's 1/127 of the channel's largest: Ω far below
    assert total_8 > 0 and 0 <= sum(omega_of[(name, 16)] for name in names) < 1e-2 * total_8
