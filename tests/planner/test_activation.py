"""Measured activation terms against the exporter's own artifacts, in onnxruntime."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from planner.activation import (
    SampleLoss,
    _with_fake_quantization,
    activation_quantization,
    activation_terms,
    run_outputs,
)
from planner.export import export_model
from sensitivity import zoo
from sensitivity.layers import find_layers
from sensitivity.losses import LOSS_KINDS, loss_targets, per_sample, position_losses

SAMPLES = 96


def _model_and_data(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    entry = zoo.ZOO[name]
    proto = zoo.export(zoo.build(name), torch.zeros(entry.input_shape))
    rng = np.random.default_rng(0)
    data: dict[str, np.ndarray] = {"input": rng.standard_normal((SAMPLES, *entry.input_shape[1:])).astype(np.float32)}
    if name == "digits_cnn":
        data["labels"] = rng.integers(0, 10, SAMPLES)
    return proto, data


@pytest.fixture(scope="module", params=["digits_cnn", "transformer_block"])
def case(request):
    """Conv + Gemm layers reading the graph input and writing the graph output (cross-entropy with
    labels), and MatMul layers behind LayerNorm (MSE to the float outputs)."""
    proto, data = _model_and_data(request.param)
    kind = "cross_entropy" if "labels" in data else "distill_mse"
    return proto, data, kind, activation_terms(proto, data, kind)


def _quantized_activations(artifact: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of every activation QuantizeLinear, by the float model's tensor name."""
    values = {init.name: numpy_helper.to_array(init) for init in artifact.graph.initializer}
    found = {}
    for node in artifact.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in values:
            name = node.input[0].removesuffix("_QuantizeLinear_Input")
            found[name] = (float(values[node.input[1]]), int(values[node.input[2]]))
    return found


def _single_layer_artifact(proto: onnx.ModelProto, layer: str, data) -> onnx.ModelProto:
    configuration = {other.name: "fp32" for other in find_layers(proto)} | {layer: "w8a8"}
    return onnx.load_from_string(export_model(proto, configuration, data).model_bytes)


def _with_float_weights(artifact: onnx.ModelProto, float_model: onnx.ModelProto) -> onnx.ModelProto:
    """``artifact`` with every quantized initializer (weights, int32 biases) replaced by its float original."""
    originals = {init.name: init for init in float_model.graph.initializer}
    stored = {init.name for init in artifact.graph.initializer}
    rewired = {}
    for node in artifact.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in stored:
            rewired[node.output[0]] = node.input[0].removesuffix("_quantized")
    copy = onnx.ModelProto()
    copy.CopyFrom(artifact)
    kept = [node for node in copy.graph.node if not (node.op_type == "DequantizeLinear" and node.input[0] in stored)]
    del copy.graph.node[:]
    copy.graph.node.extend(kept)
    for node in copy.graph.node:
        node.input[:] = [rewired.get(name, name) for name in node.input]
    copy.graph.initializer.extend(originals[name] for name in set(rewired.values()) if name not in stored)
    return copy


@pytest.mark.slow
def test_each_layer_quantizes_what_the_exporter_quantizes_with_its_ranges(case):
    proto, data, _, terms = case
    for layer in find_layers(proto):
        expected = _quantized_activations(_single_layer_artifact(proto, layer.name, data))
        assert set(terms[layer.name].tensors) == set(expected), layer.name
        ranges = activation_quantization(proto, data)
        for tensor, (scale, zero_point) in expected.items():
            assert ranges[tensor].scale == pytest.approx(scale, rel=1e-6)
            assert ranges[tensor].zero_point == zero_point


@pytest.mark.slow
def test_fake_quantized_model_is_the_exporters_artifact_with_float_weights(case):
    """Exact up to float rounding: the same QDQ on the same tensors, the weights left float."""
    proto, data, _, terms = case
    ranges = activation_quantization(proto, data)
    feeds = {"input": data["input"]}
    for layer in find_layers(proto):
        ours = _with_fake_quantization(proto, [ranges[t] for t in terms[layer.name].tensors])
        theirs = _with_float_weights(_single_layer_artifact(proto, layer.name, data), proto)
        for a, b in zip(run_outputs(ours, feeds, 32), run_outputs(theirs, feeds, 32)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        float_outputs = run_outputs(proto, feeds, 32)
        assert any(not np.array_equal(a, b) for a, b in zip(run_outputs(ours, feeds, 32), float_outputs)), layer.name


@pytest.mark.slow
def test_terms_are_per_sample_loss_changes_with_standard_errors(case):
    proto, data, kind, terms = case
    feeds = {"input": data["input"]}
    ranges = activation_quantization(proto, data)
    reference = run_outputs(proto, feeds, 64)
    loss = SampleLoss(kind, reference, data.get("labels"))
    for term in terms.values():
        changes = loss(
            run_outputs(_with_fake_quantization(proto, [ranges[t] for t in term.tensors]), feeds, 64)
        ) - loss(reference)
        assert term.loss_change == pytest.approx(changes.mean(), rel=1e-9, abs=1e-15)
        assert term.standard_error == pytest.approx(changes.std(ddof=1) / np.sqrt(SAMPLES), rel=1e-9)
        assert term.standard_error > 0.0


def _outputs_for(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Float outputs of the form ``kind`` reads: logits [20, 5] (or steps [20, 4, 5]), probabilities,
    log-probabilities, independent probabilities, or two outputs of different scales."""
    logits = rng.standard_normal((20, 4, 5) if kind in ("distill_step_cross_entropy", "distill_kl") else (20, 5))
    if kind in ("distill_kl", "distill_kl_log_probs"):
        log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        return [np.exp(log_p) if kind == "distill_kl" else log_p]
    if kind == "distill_binary_kl":
        return [1 / (1 + np.exp(-logits))]
    return [logits, 1000 * rng.standard_normal((20, 3, 2))]


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_sample_losses_match_the_sensitivity_losses(kind):
    """The numpy mirror against torch's own loss functions (sensitivity.losses), per sample."""
    rng = np.random.default_rng(1)
    reference = _outputs_for(kind, rng)
    outputs = [r + 0.3 * rng.standard_normal(r.shape) * np.abs(r).mean() for r in reference]
    if kind in ("distill_kl", "distill_binary_kl"):  # moved probabilities stay probabilities
        outputs = [np.clip(o, 1e-3, 1 - 1e-3) for o in outputs]
        if kind == "distill_kl":
            outputs = [o / o.sum(axis=-1, keepdims=True) for o in outputs]
    labels = rng.integers(0, 5, 20)
    ours = SampleLoss(kind, reference, labels)(outputs)
    reference_t, outputs_t = [torch.from_numpy(r) for r in reference], [torch.from_numpy(o) for o in outputs]
    targets = (torch.from_numpy(labels),) if kind == "cross_entropy" else loss_targets(kind, reference_t)
    scales = [1 / float(np.mean(r**2)) if kind == "distill_normalized_mse" else 1.0 for r in reference]
    expected = per_sample(position_losses(kind, outputs_t, targets, scales))
    assert ours.shape == (20,) and float(np.std(ours)) > 0
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-12)


def test_normalized_mse_weighs_outputs_of_different_scales_alike():
    rng = np.random.default_rng(2)
    reference = [rng.standard_normal((30, 4)), 1000 * rng.standard_normal((30, 4))]
    outputs = [r * (1 + 0.1 * rng.standard_normal(r.shape)) for r in reference]  # 10 % relative error each
    terms = [SampleLoss("distill_normalized_mse", [r], None)([o]).mean() for r, o in zip(reference, outputs)]
    assert 0.5 < terms[0] / terms[1] < 2
    assert SampleLoss("distill_normalized_mse", reference, None)(outputs).mean() == pytest.approx(sum(terms))


@pytest.mark.slow
def test_bad_loss_kind_and_missing_labels_are_named():
    proto, data = _model_and_data("digits_cnn")
    with pytest.raises(ValueError, match="loss_kind must be one of"):
        activation_terms(proto, data, "hinge")
    with pytest.raises(ValueError, match="needs labels"):
        activation_terms(proto, {"input": data["input"]}, "cross_entropy")


def test_an_embedding_has_no_activation_to_quantize():
    from tests.planner.helpers import embedding_model

    model, data = embedding_model()
    terms = activation_terms(model, data, "distill_cross_entropy")
    assert terms["table"].tensors == () and terms["table"].loss_change == 0.0
    assert terms["head"].tensors == ("pooled", "logits")  # the MatMul's input and output
