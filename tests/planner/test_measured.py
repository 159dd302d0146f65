"""The measured signal (planner.measured) against a brute-force computation: each (layer, candidate)
exported alone with export_model, run in onnxruntime, its loss computed by hand; its standard errors,
configuration, planner objective and the plan it drives."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from planner.cost import layer_cost_table
from planner.export import export_model
from planner.measured import (
    LossChangeMeter,
    configuration_loss_changes,
    measured_terms,
    single_layer_configurations,
)
from planner.plan import plan
from planner.predict import build_objective
from planner.request import PlanRequest
from sensitivity.onnx_program import load_onnx
from sensitivity.results import MeasuredConfig, MeasuredTerms, SensitivityResult, config_from_dict
from sensitivity.run import compute_sensitivity
from sensitivity.torch_program import TorchProgram
from tests.models import tiny_onnx_model

pytestmark = pytest.mark.slow  # every test exports and runs quantized models (the fixture: ~3 s)

CANDIDATES = ("w8a8", "w4a8", "w8", "w4")
LAYERS = ("fc1.weight", "fc2.weight")


def _data(count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, 8)).astype(np.float32)
    return {"x": x, "labels": rng.integers(0, 3, count).astype(np.int64)}


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return tiny_onnx_model(seed=0)


@pytest.fixture(scope="module")
def calibration() -> dict[str, np.ndarray]:
    return _data(96, seed=1)


@pytest.fixture(scope="module")
def result(model, calibration) -> SensitivityResult:
    config = MeasuredConfig(device="cpu", batch_size=40, quantity="loss")
    return compute_sensitivity(load_onnx(model), calibration, config)


def _logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.float64)


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-sample −log softmax(logits)[target], written out."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return log_z - shifted[np.arange(len(targets)), targets]


def _brute_changes(model, calibration, data, layer: str, candidate: str, targets: np.ndarray) -> np.ndarray:
    configuration = {name: candidate if name == layer else "fp32" for name in LAYERS}
    exported = export_model(model, configuration, {"x": calibration["x"]}).model_bytes
    quantized = _logits(exported, data["x"])
    original = _logits(model.SerializeToString(), data["x"])
    return _cross_entropy(quantized, targets) - _cross_entropy(original, targets)


def test_each_term_equals_the_brute_force_loss_change_with_its_standard_error(model, calibration, result):
    terms = result.measured
    assert result.loss_kind == "cross_entropy"  # labels given
    assert terms is not None and terms.num_samples == 96
    assert set(terms.labels) == {(layer, c) for layer in LAYERS for c in CANDIDATES}
    for (layer, candidate), mean, error in zip(terms.labels, terms.loss_changes, terms.standard_errors):
        brute = _brute_changes(model, calibration, calibration, layer, candidate, calibration["labels"])
        assert mean == pytest.approx(brute.mean(), rel=1e-9, abs=1e-12)
        assert error > 0.0
        assert error == pytest.approx(brute.std(ddof=1) / np.sqrt(len(brute)), rel=1e-9)
    # 4-bit weights move the loss more than 8-bit ones on every layer (measured: 10x to 20x here)
    for layer in LAYERS:
        assert abs(terms.loss_change(layer, "w4")) > abs(terms.loss_change(layer, "w8"))


def test_without_labels_the_loss_is_cross_entropy_to_the_float_argmax(model, calibration):
    inputs = {"x": calibration["x"]}
    terms = measured_terms(model, inputs, "distill_cross_entropy", ("w4",))
    argmax = _logits(model.SerializeToString(), inputs["x"]).argmax(axis=1)
    for (layer, candidate), mean in zip(terms.labels, terms.loss_changes):
        brute = _brute_changes(model, inputs, inputs, layer, candidate, argmax)
        assert mean == pytest.approx(brute.mean(), rel=1e-9, abs=1e-12)


def test_a_configuration_measured_on_held_out_data(model, calibration):
    held_out = _data(50, seed=7)
    configuration = {"fc1.weight": "w4", "fc2.weight": "w8a8"}
    changes = configuration_loss_changes(model, configuration, calibration, "cross_entropy", data=held_out)
    exported = export_model(model, configuration, {"x": calibration["x"]}).model_bytes
    quantized, original = _logits(exported, held_out["x"]), _logits(model.SerializeToString(), held_out["x"])
    brute = _cross_entropy(quantized, held_out["labels"]) - _cross_entropy(original, held_out["labels"])
    assert changes.shape == (50,)
    np.testing.assert_allclose(changes, brute, rtol=1e-9, atol=1e-12)
    # the KL beside it: KL(p_float ‖ p_quantized) per sample, by hand, non-negative
    meter = LossChangeMeter(model, held_out, "cross_entropy")
    kl = meter.configuration_changes(configuration, calibration).kl
    log_p0 = original - np.log(np.exp(original).sum(axis=1, keepdims=True))
    log_p = quantized - np.log(np.exp(quantized).sum(axis=1, keepdims=True))
    assert kl is not None
    np.testing.assert_allclose(kl, (np.exp(log_p0) * (log_p0 - log_p)).sum(axis=1), rtol=1e-6, atol=1e-12)
    assert kl.min() >= 0.0 and kl.max() > 0.0


def test_single_layer_configurations_quantize_one_layer_each():
    pairs = single_layer_configurations(["a", "b", "c"], ["w8", "w4"])
    assert [label for label, _ in pairs] == [(n, c) for n in "abc" for c in ("w8", "w4")]
    for (layer, candidate), configuration in pairs:
        assert configuration[layer] == candidate
        assert sum(value != "fp32" for value in configuration.values()) == 1


def test_the_result_round_trips(result):
    again = SensitivityResult.from_dict(result.to_dict())
    assert again.measured == result.measured
    assert again.config == result.config
    assert MeasuredTerms.from_dict(result.measured.to_dict()) == result.measured


def test_the_objective_is_diagonal_with_omega_twice_the_positive_change(model, calibration, result):
    table = layer_cost_table(model, {"x": (1, 8)})
    candidates = ("fp32", *CANDIDATES)
    objective = build_objective(result, table, candidates, model)
    for i, layer in enumerate(objective.layers):
        for k, candidate in enumerate(objective.candidates[i]):
            expected = 0.0 if candidate == "fp32" else 2.0 * max(result.measured.loss_change(layer, candidate), 0.0)
            assert objective.omega[i][k] == pytest.approx(expected)
    assert np.count_nonzero(objective.G - np.diag(np.diag(objective.G))) == 0
    omega, loss_change = objective.evaluate({layer: "w4" for layer in objective.layers})
    positive = sum(max(result.measured.loss_change(layer, "w4"), 0.0) for layer in objective.layers)
    assert loss_change == pytest.approx(positive)  # the predicted ΔL is the sum of the measured terms
    assert omega == pytest.approx(2.0 * positive)


def test_a_measured_plan_reuses_the_result_and_minimises_omega(model, calibration, result):
    budget = 500  # bytes: all-w4 is 392, all-fp32 ~610
    request = PlanRequest(
        method="measured",
        max_size_bytes=budget,
        measure_uniform=False,
        latency_repeats=3,
        latency_warmup=1,
        device="cpu",
    )
    planned = plan(model, calibration, request, sensitivity=result)
    assert planned.sensitivity["measured"] == result.measured.to_dict()
    assert planned.activation_terms == {}  # each candidate was measured with its activations
    assert planned.run.search["solver"] == "diagonal-dp"
    chosen = planned.plan
    assert chosen.measured is not None and chosen.size_bytes <= budget
    terms = {(layer, c): max(result.measured.loss_change(layer, c), 0.0) for layer in LAYERS for c in CANDIDATES}
    expected = sum(terms.get((layer, c), 0.0) for layer, c in chosen.configuration.items())
    assert chosen.loss_change == pytest.approx(expected) and chosen.omega == pytest.approx(2 * expected)
    feasible = [point.omega for point in planned.frontier if point.size_bytes <= budget]
    assert chosen.omega == pytest.approx(min(feasible))


def test_bad_configurations_and_results_are_refused_by_name(model, calibration):
    with pytest.raises(ValueError, match="fp32 changes nothing"):
        MeasuredConfig(candidates=("fp32",))
    with pytest.raises(ValueError, match="must not repeat"):
        MeasuredConfig(candidates=("w8", "w8"))
    with pytest.raises(ValueError, match="non-empty list"):
        MeasuredConfig(candidates=())
    with pytest.raises(ValueError, match="time_budget_s"):
        MeasuredConfig(time_budget_s=5.0)
    config = MeasuredConfig(candidates=("w4",), seed=3)
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="cannot measure"):
        measured_terms(model, calibration, "cross_entropy", ("w2",))
    with pytest.raises(ValueError, match="loss_kind must be one of"):
        LossChangeMeter(model, calibration, "hinge")
    other = compute_sensitivity(
        load_onnx(model), calibration, MeasuredConfig(candidates=("w8",), device="cpu", batch_size=96)
    )
    request = PlanRequest(method="measured", max_size_bytes=500, device="cpu")
    with pytest.raises(ValueError, match=r"lacks \(layer, candidate\)"):
        plan(model, calibration, request, sensitivity=other)
    with pytest.raises(ValueError, match="needs a sensitivity result with measured terms"):
        plan(model, calibration, PlanRequest(method="measured", device="cpu"), sensitivity=_without_measured(other))


def _without_measured(result: SensitivityResult) -> SensitivityResult:
    data = result.to_dict()
    data["measured"] = None
    return SensitivityResult.from_dict(data)


def test_a_torch_program_has_no_onnx_model_to_measure():
    module = torch.nn.Sequential(torch.nn.Linear(8, 3))
    program = TorchProgram(module, input_names=("x",))  # an nn.Module: no ONNX graph behind it
    data = {"x": np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)}
    with pytest.raises(ValueError, match="runs the model's ONNX export"):
        compute_sensitivity(program, data, MeasuredConfig(device="cpu"))


def test_the_kl_quantity_is_the_brute_force_kl_and_never_negative(model, calibration):
    terms = measured_terms(model, calibration, "cross_entropy", ("w4a8",), quantity="kl")
    assert terms.quantity == "kl" and MeasuredTerms.from_dict(terms.to_dict()) == terms
    original = _logits(model.SerializeToString(), calibration["x"])
    log_p0 = original - np.log(np.exp(original).sum(axis=1, keepdims=True))
    for (layer, candidate), mean, error in zip(terms.labels, terms.loss_changes, terms.standard_errors):
        configuration = {name: candidate if name == layer else "fp32" for name in LAYERS}
        quantized = _logits(export_model(model, configuration, {"x": calibration["x"]}).model_bytes, calibration["x"])
        log_p = quantized - np.log(np.exp(quantized).sum(axis=1, keepdims=True))
        kl = (np.exp(log_p0) * (log_p0 - log_p)).sum(axis=1)
        assert mean == pytest.approx(kl.mean(), rel=1e-6) and mean > 0.0
        assert error == pytest.approx(kl.std(ddof=1) / np.sqrt(len(kl)), rel=1e-6)
    with pytest.raises(ValueError, match="quantity 'kl' needs class scores"):
        measured_terms(model, calibration, "distill_mse", ("w4",), quantity="kl")
    # auto, the analysis's default: kl where the loss has a KL form (class scores), the loss change elsewhere
    auto = compute_sensitivity(load_onnx(model), calibration, MeasuredConfig(device="cpu", candidates=("w4a8",)))
    assert auto.measured == terms
    assert measured_terms(model, calibration, "distill_mse", ("w4",), quantity="auto").quantity == "loss"
    with pytest.raises(ValueError, match="quantity"):
        MeasuredConfig(quantity="accuracy")


def test_16_bit_candidates_are_measured_like_the_others_and_plan(model, calibration):
    """fp16 and w8a16 (not in the default set) are measured when asked for: a plan that offers them
    with --method measured measures them instead of failing on a missing (layer, candidate)."""
    terms = measured_terms(model, calibration, "cross_entropy", ("fp16", "w8a16"))
    for (layer, candidate), mean in zip(terms.labels, terms.loss_changes):
        brute = _brute_changes(model, calibration, calibration, layer, candidate, calibration["labels"])
        assert mean == pytest.approx(brute.mean(), rel=1e-9, abs=1e-12)
    request = PlanRequest(
        method="measured",
        candidates=("fp32", "fp16", "w8a8"),
        measure_uniform=False,
        latency_repeats=3,
        latency_warmup=1,
        device="cpu",
    )
    planned = plan(model, calibration, request)
    measured = MeasuredTerms.from_dict(planned.sensitivity["measured"])
    assert {c for _, c in measured.labels} == {"fp16", "w8a8"}
    assert planned.plan.measured is not None
