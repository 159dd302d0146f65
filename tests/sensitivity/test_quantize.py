"""Q_b at b = 16 (the fp16 candidate): the float16 round trip with onnxruntime's converter's clamps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnxruntime.transformers.float16 import convert_np_to_float16

from sensitivity.interlayer import perturbations
from sensitivity.layers import find_layers, weight_array
from sensitivity.quantize import (
    FLOAT16_BITS,
    FLOAT16_MAX_FINITE,
    FLOAT16_MIN_POSITIVE,
    SUPPORTED_WEIGHT_BITS,
    dequantized,
    fake_quantize,
    qmax,
    quantize_weight,
    to_float16,
)
from tests.models import tiny_onnx_model


def test_uniform_fp16_delta_is_exactly_numpys_float16_round_trip() -> None:
    model = tiny_onnx_model(seed=3)
    layers = find_layers(model)
    weights = [torch.from_numpy(weight_array(model, layer.name).astype(np.float32)) for layer in layers]
    deltas = perturbations(layers, weights, [FLOAT16_BITS])
    assert set(deltas) == {(layer.name, FLOAT16_BITS) for layer in layers}
    for layer, weight in zip(layers, weights):
        values = weight.numpy()
        expected = values.astype(np.float16).astype(np.float32) - values
        np.testing.assert_array_equal(deltas[(layer.name, FLOAT16_BITS)].numpy(), expected)
        assert np.abs(expected).max() > 0  # float16 really rounds these weights


def test_q16_is_what_onnxruntimes_float16_converter_stores() -> None:
    rng = np.random.default_rng(0)
    magnitudes = 10.0 ** rng.uniform(-12, 7, 5000)  # below the smallest subnormal to above float16's range
    values = (magnitudes * rng.choice([-1.0, 1.0], magnitudes.size)).astype(np.float32)
    values[:4] = [0.0, -0.0, np.inf, -np.inf]
    ours = to_float16(values)
    theirs = convert_np_to_float16(values)
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))  # bit for bit, signed zeros too


def test_q16_clamps_instead_of_flushing_or_overflowing() -> None:
    values = np.array([1e-9, -1e-9, 1e5, -1e5, 0.1], dtype=np.float32)
    rounded = dequantized(values, FLOAT16_BITS, 0)
    assert rounded[0] == pytest.approx(FLOAT16_MIN_POSITIVE, rel=1e-2) and rounded[1] == -rounded[0]
    assert (rounded[2], rounded[3]) == (FLOAT16_MAX_FINITE, -FLOAT16_MAX_FINITE)
    assert rounded[4] == np.float32(np.float16(0.1))
    torch_rounded = fake_quantize(torch.from_numpy(values), FLOAT16_BITS, 0)
    np.testing.assert_array_equal(torch_rounded.numpy(), rounded)


def test_16_bits_is_float16_not_an_integer_grid() -> None:
    assert FLOAT16_BITS in SUPPORTED_WEIGHT_BITS
    with pytest.raises(ValueError, match="integer weight bit width 16"):
        qmax(16)
    with pytest.raises(ValueError, match="integer weight bit width 16"):
        quantize_weight(np.ones((2, 2), dtype=np.float32), 16, 0)
