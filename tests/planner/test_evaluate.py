"""Evaluation of exported models in onnxruntime, beside the float baseline."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy.special import log_softmax, rel_entr, softmax

from planner.candidates import Configuration
from planner.evaluate import (
    compare_outputs,
    cosine_similarity,
    evaluate,
    neighbour_agreement,
    step_agreement,
)
from planner.export import export_model
from sensitivity.layers import find_layers
from sensitivity.outputs import detect_kind
from tests.models import trained_digits_onnx


@pytest.fixture(scope="module")
def exported():
    proto, calibration, data = trained_digits_onnx()
    configuration = Configuration.uniform(find_layers(proto), "w4a8").updated({"conv1.weight": "w8a8"})
    return proto, export_model(proto, configuration, calibration), data


def _predictions(model_bytes, x):
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# The metric follows the output kind. Each synthetic case runs a float ONNX model and a "quantized"
# one that outputs x·0 + C for a chosen C, so the known answer is computed from C.


def _float_and_replaced(
    shape: tuple[int, ...], nodes: list, output_shape: tuple[int, ...], replaced: np.ndarray, initializers: tuple = ()
) -> tuple:
    """(float model: ``nodes`` from x to y; quantized stand-in: y = x·0 + ``replaced``)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(output_shape))
    float_model = helper.make_model(
        helper.make_graph(nodes, "float", [x], [y], list(initializers)), opset_imports=[helper.make_opsetid("", 17)]
    )
    constants = [
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        numpy_helper.from_array(replaced.astype(np.float32), "c"),
    ]
    if shape == output_shape:
        stand_in_nodes = [helper.make_node("Mul", ["x", "zero"], ["x0"]), helper.make_node("Add", ["x0", "c"], ["y"])]
    else:  # outputs of another shape: a zero scalar from x, broadcast onto C
        stand_in_nodes = [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Mul", ["s", "zero"], ["x0"]),
            helper.make_node("Add", ["x0", "c"], ["y"]),
        ]
    stand_in = helper.make_model(
        helper.make_graph(stand_in_nodes, "replaced", [x], [y], constants), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.checker.check_model(float_model)
    onnx.checker.check_model(stand_in)
    return float_model, stand_in


def _noise_with_argmax_of(reference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise whose argmax per flattened sample is the reference's: the old flattened-argmax metric
    scores it 100 % agreement, drop 0."""
    flat = reference.reshape(len(reference), -1)
    noise = rng.standard_normal(flat.shape)
    noise[np.arange(len(flat)), flat.argmax(axis=1)] = np.abs(noise).max() + 1.0
    return noise.reshape(reference.shape)


def _with_cosine(reference: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """Unit rows at exactly ``cosine`` to the (unit) reference rows."""
    noise = rng.standard_normal(reference.shape)
    noise -= np.sum(noise * reference, axis=1, keepdims=True) * reference
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return cosine * reference + math.sqrt(1 - cosine**2) * noise


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_embeddings_at_cosine_041_drop_60_points_where_argmax_agreement_saw_nothing():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 384)).astype(np.float32)
    reference = _unit(x.astype(np.float64))
    destroyed = _with_cosine(reference, 0.41, rng)  # onnxruntime's own int8 MiniLM measured 0.41
    destroyed[np.arange(64), reference.argmax(axis=1)] = 1.0  # same argmax: the old metric said 100 %
    float_model, stand_in = _float_and_replaced(
        x.shape, [helper.make_node("LpNormalization", ["x"], ["y"], axis=-1)], x.shape, destroyed
    )
    result = evaluate(stand_in, float_model, {"x": x})
    expected = 100 * np.mean(np.sum(reference * destroyed, axis=1) / np.linalg.norm(destroyed, axis=1))
    assert result.output_kind == "embeddings" and result.metric_name == "cosine"
    assert "unit L2 norm" in result.metric_reason
    assert result.baseline == 100.0 and result.metric == pytest.approx(expected, abs=1e-3)
    assert result.drop > 50  # measured: cosine 39.09 %, drop 60.91 pp (nearest-neighbour agreement 4.7 %)
    assert result.fidelity.top1_agreement == 100.0  # what the old metric reported: drop 0.00
    assert result.fidelity.neighbour_agreement < 50
    overridden = evaluate(stand_in, float_model, {"x": x}, metric="top1")
    assert overridden.metric_name == "top1_agreement" and overridden.drop == 0.0
    assert "chosen by the request" in overridden.metric_reason


def test_destroyed_sequence_gets_per_step_agreement_near_chance():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 20, 30)).astype(np.float32)
    weight = rng.standard_normal((30, 30)).astype(np.float32)
    reference = x.astype(np.float64) @ weight
    destroyed = _noise_with_argmax_of(reference, rng)
    float_model, stand_in = _float_and_replaced(
        x.shape,
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        x.shape,
        destroyed,
        initializers=(numpy_helper.from_array(weight, "w"),),
    )
    result = evaluate(stand_in, float_model, {"x": x})
    expected = 100 * np.mean(reference.argmax(axis=2) == destroyed.argmax(axis=2))
    assert result.output_kind == "sequence" and result.metric_name == "step_agreement"
    assert result.metric == pytest.approx(expected)
    assert result.drop > 80  # 1 in 30 classes by chance plus the forced step: measured 7.81 %, drop 92.19 pp
    assert result.fidelity.top1_agreement == 100.0


def test_sequence_agreement_counts_steps_not_flattened_rows():
    """An OCR recogniser's case: most steps agree, the flattened argmax mostly does not."""
    reference = np.zeros((4, 5, 3))
    reference[:, :, 0] = 1.0
    reference[:, 2, 1] = 2.0  # each sample's flattened argmax is at step 2, class 1
    outputs = reference.copy()
    outputs[:3, 2, 1] = 0.0  # three samples lose that one step: class 0 wins there
    assert step_agreement(reference, outputs) == pytest.approx(100 * (20 - 3) / 20)
    assert compare_outputs(reference.reshape(4, -1), outputs.reshape(4, -1)).top1_agreement == 25.0


def test_destroyed_dense_map_gets_cosine_near_zero():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    weight = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    float_model, _ = _float_and_replaced(
        x.shape, [conv], (4, 5, 8, 8), np.zeros((4, 5, 8, 8)), initializers=(numpy_helper.from_array(weight, "w"),)
    )
    reference = np.asarray(
        ort.InferenceSession(float_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
            0
        ],
        dtype=np.float64,
    )
    destroyed = _noise_with_argmax_of(reference, rng)
    float_model, stand_in = _float_and_replaced(
        x.shape, [conv], (4, 5, 8, 8), destroyed, initializers=(numpy_helper.from_array(weight, "w"),)
    )
    result = evaluate(stand_in, float_model, {"x": x})
    assert result.output_kind == "dense" and result.metric_name == "cosine"
    assert "rank 4" in result.metric_reason
    assert result.metric == pytest.approx(100 * cosine_similarity(reference, destroyed), abs=1e-3)
    assert result.drop > 80  # measured cosine -1.98 %, drop 101.98 pp (noise: a cosine near 0)
    assert result.fidelity.top1_agreement == 100.0
    assert result.fidelity.output_cosines == (pytest.approx(result.metric / 100, abs=1e-5),)


def test_class_scores_agreement_with_a_known_answer_and_labels():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 10)).astype(np.float32)
    replaced = x.copy()
    replaced[:16] = -replaced[:16]  # the first half's argmax moves (to the old argmin)
    float_model, stand_in = _float_and_replaced(
        x.shape, [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], x.shape, replaced
    )
    result = evaluate(stand_in, float_model, {"x": x})
    assert result.output_kind == "class_scores" and "Softmax" in result.metric_reason
    assert result.metric_name == "top1_agreement" and result.metric == 50.0 and result.drop == 50.0
    labels = x.argmax(axis=1).astype(np.int64)
    labelled = evaluate(stand_in, float_model, {"x": x, "labels": labels})
    assert labelled.metric_name == "top1_accuracy" and labelled.baseline == 100.0 and labelled.metric == 50.0
    assert "labels given" in labelled.metric_reason


def test_neighbour_agreement_against_a_hand_computed_case():
    # float: 0 and 1 are neighbours, 2 and 3 are; quantized: 1 moves beside 2 and 3
    reference = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    outputs = np.array([[1.0, 0.0], [0.05, 1.0], [0.0, 1.0], [0.1, 0.9]])
    # float nearest: 0->1, 1->0, 2->3, 3->2; quantized: 0->3 (0.11 beats 1's 0.05), 1->2, 2->1, 3->1
    assert neighbour_agreement(reference, reference) == 100.0
    assert neighbour_agreement(reference, outputs) == 0.0
    with pytest.raises(ValueError, match="at least 3 samples"):
        neighbour_agreement(reference[:2], outputs[:2])


def test_kind_rules_on_arrays_and_graphs():
    rng = np.random.default_rng(4)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 6])
    normalise = [
        helper.make_node("ReduceL2", ["x"], ["n"], keepdims=1),
        helper.make_node("Clip", ["n", "eps"], ["c"]),
        helper.make_node("Div", ["x", "c"], ["y"]),
    ]
    eps = numpy_helper.from_array(np.array(1e-12, np.float32), "eps")
    normalised = helper.make_model(helper.make_graph(normalise, "g", [x], [y], [eps]))
    scores = rng.standard_normal((8, 6))  # not unit rows: the graph alone says embeddings
    assert detect_kind(normalised, scores)[0] == "embeddings"
    head = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    assert detect_kind(head, scores)[0] == "class_scores"
    assert detect_kind(head, _unit(scores))[0] == "embeddings"
    assert detect_kind(head, rng.standard_normal((8, 1)))[0] == "dense"  # argmax of one value is always 0
    assert detect_kind(head, rng.standard_normal((8, 4, 6)))[0] == "dense"  # rank 3, not a classifier head
    assert detect_kind(head, rng.standard_normal((8, 2, 4, 6)))[0] == "dense"


def test_the_metric_can_be_chosen_and_unknown_names_are_refused():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 16)).astype(np.float32)
    float_model, stand_in = _float_and_replaced(
        x.shape, [helper.make_node("LpNormalization", ["x"], ["y"])], x.shape, _unit(x.astype(np.float64)) + 0.01
    )
    for metric, name in [
        ("neighbour_agreement", "neighbour_agreement"),
        ("step_agreement", "step_agreement"),
        ("cosine", "cosine"),
    ]:
        result = evaluate(stand_in, float_model, {"x": x}, metric=metric)
        assert result.metric_name == name and f"metric={metric!r}" in result.metric_reason
        assert 90 < result.metric <= 100
    with pytest.raises(ValueError, match="metric must be one of"):
        evaluate(stand_in, float_model, {"x": x}, metric="bleu")


def test_outputs_that_are_not_per_sample_are_left_out_beside_the_first():
    """A state output ([2, 128] whatever the batch, like silero-vad's) does not stop evaluation."""
    rng = np.random.default_rng(6)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    state = helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 128])
    nodes = [helper.make_node("Softmax", ["x"], ["y"]), helper.make_node("Identity", ["s"], ["state"])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y, state], [numpy_helper.from_array(np.ones((2, 128), np.float32), "s")])
    )
    data = {"x": rng.standard_normal((10, 4)).astype(np.float32)}
    result = evaluate(model, model, data, batch_size=3)
    assert result.metric_name == "top1_agreement" and result.drop == 0.0
    assert len(result.fidelity.output_cosines) == 1


def test_a_time_major_output_has_its_sample_axis_found():
    """ddddocr's CRNN answers [T, 1, C] for its one sample per run: the sample axis is the one of size 1."""
    from planner.evaluate import _rows, sample_axis

    assert sample_axis((40, 1, 8), 1) == 1 and sample_axis((3, 40, 8), 3) == 0 and sample_axis((2, 5), 3) is None
    output = np.arange(40 * 8, dtype=np.float32).reshape(40, 1, 8)
    rows = _rows(output, 1, 0, flatten=False)
    assert rows.shape == (1, 40, 8) and np.array_equal(rows[0], output[:, 0])
    with pytest.raises(ValueError, match=r"shape \(2, 5\); expected an axis of 3"):
        _rows(np.zeros((2, 5)), 3, 0)
