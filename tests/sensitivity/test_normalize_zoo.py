"""Regression tests of normalisation on the real exports that have each quirk (the ``zoo`` extra):

- PP-OCRv4 det/rec and PP-OCR v2 cls (rapidocr_onnxruntime 1.4.4, paddle2onnx): every weight in a
  Constant node (0 layers found before normalisation), and cls writes its batch dim as -1;
- ddddocr 1.6.1's ``common_old.onnx``: dynamically quantized by onnxruntime (ConvInteger,
  DynamicQuantizeLSTM, ...), refused as such.

The files are located without importing their packages: ``rapidocr_onnxruntime/__init__`` imports
cv2, which the zoo extra does not install (only the .onnx files are read), so
``importlib.resources.files`` would fail with ModuleNotFoundError.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from planner.export import check_inputs
from sensitivity.layers import find_layers
from sensitivity.normalize import AlreadyQuantizedError, normalize_model, static_dims
from sensitivity.onnx_program import load_onnx
from tests.zoo.models import resource_or_skip

pytestmark = pytest.mark.zoo


def ppocr(name: str) -> Path:
    return resource_or_skip("rapidocr_onnxruntime", "models", name)


# file -> (input shape rapidocr feeds, layers by op type after normalisation)
PPOCR = {
    "ch_PP-OCRv4_det_infer.onnx": ((1, 3, 640, 640), {"Conv": 62, "ConvTranspose": 2}),
    "ch_PP-OCRv4_rec_infer.onnx": ((1, 3, 48, 320), {"Conv": 38, "MatMul": 9}),  # 4 more MatMuls: attention
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ((1, 3, 48, 192), {"Conv": 53, "MatMul": 1}),
}


def _image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """An image normalised as rapidocr does, (pixel - 0.5) / 0.5, from seeded uniform pixels."""
    return ((np.random.default_rng(seed).random(shape) - 0.5) / 0.5).astype(np.float32)


@pytest.mark.parametrize("name", PPOCR)
def test_ppocr_layers_are_found_after_normalisation(name):
    model = onnx.load(str(ppocr(name)))
    assert find_layers(model) == []  # every weight is a Constant node's output
    layers = find_layers(normalize_model(model).model)
    assert Counter(layer.op_type for layer in layers) == PPOCR[name][1]
    constants = {node.output[0] for node in model.graph.node if node.op_type == "Constant"}
    assert {layer.name for layer in layers} <= constants  # named by the Constant outputs


@pytest.mark.parametrize("name", PPOCR)
def test_ppocr_interpreter_matches_onnxruntime(name):
    """Measured max |difference| (seed 0): det 1.3e-7 on outputs up to 4.9e-3, rec 1.3e-6 on
    probabilities up to 0.88, cls 1.5e-7 up to 0.57."""
    model = onnx.load(str(ppocr(name)))
    x = _image(PPOCR[name][0])
    (expected,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    program = load_onnx(model)
    with torch.no_grad():
        (ours,) = program.forward(dict(program.layer_weights), {"x": torch.from_numpy(x)})
    assert ours.shape == expected.shape
    assert np.abs(ours.numpy() - expected).max() <= 1e-4 * np.abs(expected).max() + 1e-6


def test_ppocr_cls_minus_one_batch_takes_any_batch():
    """paddle2onnx writes cls's batch dim as -1: 'x' has shape (256, 3, 48, 192), the model expects
    [-1, 3, ?, ?] was refused before normalisation read it as dynamic."""
    model = onnx.load(str(ppocr("ch_ppocr_mobile_v2.0_cls_infer.onnx")))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    batch = {"x": _image((256, 3, 48, 192))}
    assert check_inputs(model, batch)["x"].shape[0] == 256
    normalized = normalize_model(model)
    assert static_dims(normalized.model.graph.input[0]) == [None, 3, None, None]
    assert "x[0]" in normalized.dynamic_dims


def test_ppocr_cls_upgrade_to_opset_21_is_checked_in_onnxruntime():
    model = onnx.load(str(ppocr("ch_ppocr_mobile_v2.0_cls_infer.onnx")))
    normalized = normalize_model(model, opset=21, samples={"x": _image((4, 3, 48, 192))})
    assert (normalized.source_opset, normalized.opset) == (11, 21)
    assert normalized.upgrade_check.samples == 4
    assert normalized.upgrade_check.max_relative_difference < 1e-5  # measured: 0


def test_ddddocr_quantized_model_is_refused_as_quantized():
    model = onnx.load(str(resource_or_skip("ddddocr", "common_old.onnx")))
    with pytest.raises(AlreadyQuantizedError) as error:
        normalize_model(model)
    message = str(error.value)
    for op in (
        "DynamicQuantizeLinear (22 nodes",
        "ConvInteger (21 nodes",
        "MatMulInteger",
        "com.microsoft::DynamicQuantizeLSTM",
    ):
        assert op in message, message
    assert "unsupported" not in message
