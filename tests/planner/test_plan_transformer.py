"""plan() on the trained tiny token transformer: int64 token ids through an embedding, attention
written out with MatMul/Softmax, LayerNorm, GELU, a Gemm head (``sensitivity.zoo``)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import onnxruntime as ort
import pytest

from planner.bisection import max_evaluations
from planner.choose import minimum_cost
from planner.cost import layer_cost_table
from planner.export import read_plan
from planner.plan import plan
from planner.request import PlanRequest
from sensitivity.onnx_program import load_onnx
from sensitivity.results import InterLayerConfig
from sensitivity.run import compute_sensitivity
from sensitivity.zoo import export_tiny_transformer, trained_tiny_transformer

pytestmark = pytest.mark.slow  # whole plans on a trained transformer

FAST = {"measure_uniform": False, "max_frontier_points": 2, "latency_repeats": 5, "latency_warmup": 1, "device": "cpu"}
PROBES = {"trace_max_probes": 8, "trace_min_probes": 4}
SAMPLE_SHAPE = {"input": (1, 8)}  # one sequence of 8 token ids


@pytest.fixture(scope="module")
def transformer():
    model, task = trained_tiny_transformer(seed=0)
    proto = export_tiny_transformer(model)
    calibration = {"input": task.train_x[:128], "labels": task.train_y[:128]}
    evaluation = {"input": task.test_x, "labels": task.test_y}  # the 768 held-out sequences
    return proto, calibration, evaluation


@pytest.fixture(scope="module")
def sensitivity(transformer):
    proto, calibration, _ = transformer
    config = InterLayerConfig(bits=(8, 4), **PROBES, device="cpu")
    return compute_sensitivity(load_onnx(proto), calibration, config)


def onnxruntime_accuracy(model_bytes: bytes, dataset) -> float:
    """A fresh session over the whole set in one run, on the int64 ids as they are."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(int64)"
    logits = session.run(None, {"input": dataset["input"]})[0]
    return 100.0 * float(np.mean(logits.argmax(axis=1) == dataset["labels"]))


def test_pareto_plan_between_uniform_w4a8_and_w8a8_meets_the_budget_and_measures_what_it_reports(transformer):
    """A BOPS budget: on this tiny model the Q/DQ nodes outweigh the weights they shrink (the
    float file is 23.5 kB, uniform w4a8 33 kB), so a size budget would choose fp32."""
    proto, calibration, evaluation = transformer
    assert evaluation["input"].dtype == np.int64
    table = layer_cost_table(proto, SAMPLE_SHAPE)
    w4a8, w8a8 = (minimum_cost(table, (name,), "bops") for name in ("w4a8", "w8a8"))
    budget = (w4a8 + w8a8) // 2
    request = PlanRequest(method="hawq_v2", max_bops=budget, sensitivity_options=PROBES, **FAST)
    result = plan(proto, calibration, request, evaluation=evaluation)  # the whole path, sensitivity included

    assert w4a8 < result.plan.bops <= budget < w8a8
    assert result.meets_constraints
    assert len(set(result.plan.configuration.values())) > 1  # a mix: neither uniform configuration fits
    assert set(result.plan.configuration) == set(table)
    # The artifact is the chosen configuration; a fresh onnxruntime session on the int64 ids
    # measures exactly the reported accuracy (and the float model exactly the reported baseline).
    assert hashlib.sha256(result.artifact_bytes).hexdigest() == result.artifact_sha256
    assert read_plan(result.artifact_bytes)["configuration"] == dict(result.plan.configuration)
    measured = result.plan.measured
    assert measured.metric_name == "top1_accuracy"
    assert measured.num_samples == len(evaluation["labels"])
    assert measured.metric == onnxruntime_accuracy(result.artifact_bytes, evaluation)
    assert measured.baseline == onnxruntime_accuracy(proto.SerializeToString(), evaluation)
    assert measured.baseline > 95.0  # trained: the most frequent class is 34 %
    assert measured.drop < 5.0


def test_bisection_meets_max_drop_within_the_evaluation_bound(transformer, sensitivity):
    proto, calibration, evaluation = transformer
    max_drop = 0.3  # percentage points: about two of the 768 sequences
    for method in ("hawq_v2", "interlayer"):
        request = PlanRequest(method=method, search="bisection", max_drop=max_drop, **FAST)
        result = plan(proto, calibration, request, evaluation=evaluation, sensitivity=sensitivity)
        layers = len(result.plan.configuration)
        assert result.run.evaluations <= math.ceil(math.log2(layers)) + 2 == max_evaluations(layers)
        assert result.run.evaluations == len(result.run.search["steps"])
        # All seven layers at w4a8 drop more than 0.3 pp (3 of 768 sequences), so the search bisects.
        assert result.run.evaluations > 1 and result.run.search["steps"][0]["k"] == layers
        assert result.plan.measured.drop <= max_drop
        assert result.meets_constraints
        assert result.run.search["low"] == "w4a8" and result.run.search["high"] == "fp32"
        # The chosen step is the cheapest measured one within the drop.
        good = [p for p in result.frontier if p.measured.drop <= max_drop]
        assert result.plan.size_bytes == min(p.size_bytes for p in good)
        assert result.plan.measured.metric == onnxruntime_accuracy(result.artifact_bytes, evaluation)
