"""Evaluation of exported models in onnxruntime, beside the float baseline."""

import math

import numpy as np
import onnxruntime as ort
import pytest
from scipy.special import log_softmax, rel_entr, softmax

from planner.candidates import Configuration
from planner.evaluate import compare_outputs, evaluate
from planner.export import export_model
from sensitivity.layers import find_layers
from tests.planner.test_export import trained_digits_onnx


@pytest.fixture(scope="module")
def exported():
    proto, calibration, data = trained_digits_onnx()
    configuration = Configuration.uniform(find_layers(proto), "w4a8").updated({"conv1.weight": "w8a8"})
    return proto, export_model(proto, configuration, calibration), data


def _predictions(model_bytes, x):
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_accuracy_with_labels_beside_the_float_baseline(exported):
    proto, quantized, data = exported
    result = evaluate(quantized, proto, {"input": data.test_x, "labels": data.test_y}, batch_size=100)
    float_accuracy = 100 * np.mean(_predictions(proto.SerializeToString(), data.test_x).argmax(1) == data.test_y)
    quantized_accuracy = 100 * np.mean(_predictions(quantized.model_bytes, data.test_x).argmax(1) == data.test_y)
    assert result.metric_name == "top1_accuracy"
    assert result.baseline == pytest.approx(float_accuracy)
    assert result.metric == pytest.approx(quantized_accuracy)
    assert result.drop == pytest.approx(float_accuracy - quantized_accuracy)
    assert result.num_samples == len(data.test_y)
    assert 90 < result.fidelity.top1_agreement <= 100
    assert 0 <= result.fidelity.kl_divergence < 0.5
    assert result.fidelity.sqnr_db > 5 and result.fidelity.cosine_similarity > 0.9
    assert result.baseline_fidelity.top1_agreement == 100.0 and result.baseline_fidelity.kl_divergence == 0.0
    assert math.isinf(result.baseline_fidelity.sqnr_db)
    assert result.baseline_fidelity.cosine_similarity == pytest.approx(1)


def test_label_free_agreement_and_batch_independence(exported):
    proto, quantized, data = exported
    whole = evaluate(quantized.model_bytes, proto, {"input": data.test_x}, batch_size=1000)
    batched = evaluate(quantized.model_bytes, proto, {"input": data.test_x}, batch_size=7)
    assert whole.metric_name == "top1_agreement" and whole.baseline == 100.0
    assert whole.metric == whole.fidelity.top1_agreement and whole.drop == 100.0 - whole.metric
    assert batched.metric == whole.metric
    assert batched.fidelity.kl_divergence == pytest.approx(whole.fidelity.kl_divergence, rel=1e-6)
    assert batched.fidelity.sqnr_db == pytest.approx(whole.fidelity.sqnr_db, rel=1e-6)


def test_fidelity_against_hand_computed_values():
    reference = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    outputs = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    fidelity = compare_outputs(reference, outputs)
    assert fidelity.top1_agreement == 50.0
    assert fidelity.sqnr_db == pytest.approx(10 * math.log10(5.0 / 3.0))  # signal 4 + 1, noise 1 + 1 + 1
    assert fidelity.cosine_similarity == pytest.approx(0.5)  # cos = 1 and 0
    kl = np.mean(np.sum(rel_entr(softmax(reference, axis=1), softmax(outputs, axis=1)), axis=1))
    assert fidelity.kl_divergence == pytest.approx(kl)
    assert np.allclose(log_softmax(reference, axis=1).sum(), np.log(softmax(reference, axis=1)).sum())


def test_mismatched_arrays_are_named(exported):
    proto, quantized, data = exported
    with pytest.raises(ValueError, match=r"missing \['input'\], unknown \['x'\]"):
        evaluate(quantized, proto, {"x": data.test_x})
    with pytest.raises(ValueError, match="'input' has dtype float64"):
        evaluate(quantized, proto, {"input": data.test_x.astype(np.float64)})
    with pytest.raises(ValueError, match=r"'input' has shape \(450, 8, 8\), the model expects rank 4"):
        evaluate(quantized, proto, {"input": data.test_x[:, 0]})
    with pytest.raises(ValueError, match="labels must be a 1-D integer array with 450 entries"):
        evaluate(quantized, proto, {"input": data.test_x, "labels": data.test_y[:10]})
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(quantized, proto, {"input": data.test_x}, batch_size=0)
