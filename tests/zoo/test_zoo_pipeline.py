"""Every zoo model through the whole pipeline at small settings: sensitivity, a plan, and the plan's
artifact run in onnxruntime on evaluation data it was not calibrated on."""

from __future__ import annotations

import math
from typing import TypedDict

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.zoo import models as zoo

MISSING = zoo.missing_packages()
pytestmark = [
    pytest.mark.zoo,
    pytest.mark.skipif(bool(MISSING), reason=f"zoo packages missing ({', '.join(MISSING)}): {zoo.SETUP_HINT}"),
]


class _SensitivityOptions(TypedDict):
    batch_size: int
    memory_budget_mb: int | None
    hvp_method: str


# Small enough for CI (a 224x224 HVP pass takes seconds here): 1 sample, 2 probes, no measuring
# (memory budget off, HVP method named), one frontier point, one latency run.
SENSITIVITY = _SensitivityOptions(batch_size=2, memory_budget_mb=None, hvp_method="double_backward")
SAMPLES = 1
CASES = [pytest.param(m, id=m.name) for m in zoo.ZOO if not m.quantized]


@pytest.mark.parametrize("model", CASES)
def test_sensitivity_then_a_plan_whose_artifact_runs(model: zoo.ZooModel, tmp_path) -> None:
    from planner import PlanRequest, normalize_for_plan, plan
    from sensitivity import TraceConfig, compute_sensitivity
    from sensitivity.onnx_program import load_onnx

    proto = onnx.load_from_string(model.model_bytes())
    calibration = zoo.planner_inputs(proto, model.calibration(SAMPLES, seed=0))
    evaluation = zoo.planner_inputs(proto, model.evaluation(SAMPLES, seed=1))
    request = PlanRequest(
        method="hawq_v2",  # the traces computed below; measured (the default) is covered by bench/fidelity.py
        candidates=("fp32", "w8"),
        max_frontier_points=1,
        measure_uniform=False,
        measure_activation_terms=False,
        latency_repeats=1,
        latency_warmup=0,
        sensitivity_options={"trace_max_probes": 2, "trace_min_probes": 2, **SENSITIVITY},
        device="cpu",
    )
    normalized = normalize_for_plan(proto, calibration, request)
    result = compute_sensitivity(
        load_onnx(normalized), calibration, TraceConfig(max_probes=2, min_probes=2, device="cpu", **SENSITIVITY)
    )
    assert result.traces is not None
    assert result.layers and all(math.isfinite(t.trace) and t.standard_error >= 0 for t in result.traces)
    assert result.loss_kind and result.execution["traces"]["probes"] == 2

    planned = plan(normalized, calibration, request, evaluation=evaluation, sensitivity=result)
    measured = planned.plan.measured
    assert measured is not None and math.isfinite(measured.metric) and measured.metric_name
    assert set(planned.plan.configuration) == {layer.name for layer in result.layers}

    session = ort.InferenceSession(planned.artifact_bytes, providers=["CPUExecutionProvider"])
    float_session = ort.InferenceSession(model.model_bytes(), providers=["CPUExecutionProvider"])
    fixed = session.get_inputs()[0].shape[0]
    rows = slice(fixed if isinstance(fixed, int) and fixed > 0 else None)
    feeds = {
        i.name: evaluation[i.name] if evaluation[i.name].ndim == 0 else evaluation[i.name][rows]
        for i in session.get_inputs()
    }  # silero's sr is one scalar for every sample
    quantized, reference = session.run(None, feeds), float_session.run(None, feeds)
    assert [q.shape for q in quantized] == [r.shape for r in reference]
    assert all(np.isfinite(q).all() for q in quantized)
