"""The one weight quantizer Q_b shared by the sensitivity code and the ONNX exporter.

Symmetric, per output channel, restricted range: integers in [-(2^(b-1)-1), 2^(b-1)-1]
and scale = max|W_channel| / (2^(b-1)-1). For int8 this is exactly what onnxruntime's
quantizer computes with ``WeightSymmetric=True`` (range [-127, 127], scale computed in
float64 then stored as float32, round half to even on float32 data). onnxruntime's
symmetric int4 instead uses [-8, 7] with scale 2·absmax/15, which clips +absmax; we keep
the restricted range for every width so Q_b is symmetric, and the exporter writes the
int4 weights it needs from this module (see planner/).

``bits = 16`` (``FLOAT16_BITS``) is IEEE half precision, the ``fp16`` candidate, not a 16-bit
integer grid: Q_16(W) = W rounded to float16 (round half to even) after the clamps onnxruntime's
float16 converter (``onnxruntime.transformers.float16``, which the exporter runs) applies first:
a nonzero |w| below the smallest subnormal 5.96e-8 becomes ±5.96e-8 rather than 0, |w| above
65504 becomes ±65504 rather than inf. So Δ = Q_16(W) − W is exactly the exported weights' error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INTEGER_WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT16_BITS = 16  # IEEE half precision (the fp16 candidate), not an integer grid
SUPPORTED_WEIGHT_BITS = (*INTEGER_WEIGHT_BITS, FLOAT16_BITS)
# onnxruntime.transformers.float16.convert_float_to_float16's defaults (its min_positive_val and
# max_finite_val): the smallest float16 subnormal and the largest finite float16.
FLOAT16_MIN_POSITIVE = 5.96e-08
FLOAT16_MAX_FINITE = 65504.0


@dataclass(frozen=True)
class QuantizedWeight:
    """Integers and per-channel scales; ``dequantize()`` is Q_b(W)."""

    integers: np.ndarray  # int8 array with the weight's shape
    scales: np.ndarray  # float32, one per channel along ``axis``
    axis: int
    bits: int

    def dequantize(self) -> np.ndarray:
        shape = [1] * self.integers.ndim
        shape[self.axis] = -1
        return (self.integers.astype(np.float32) * self.scales.reshape(shape)).astype(np.float32)


def qmax(bits: int) -> int:
    if bits not in INTEGER_WEIGHT_BITS:
        raise ValueError(f"unsupported integer weight bit width {bits}; supported: {INTEGER_WEIGHT_BITS}")
    return 2 ** (bits - 1) - 1


def channel_scales(weight: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """float32 scale per channel, computed as onnxruntime does (float64 division, then float32)."""
    reduce_axes = tuple(a for a in range(weight.ndim) if a != axis % weight.ndim)
    absmax = np.abs(weight.astype(np.float32)).max(axis=reduce_axes) if reduce_axes else np.abs(weight)
    scale64 = (2.0 * absmax.astype(np.float64)) / (2.0 * qmax(bits))
    scale = scale64.astype(np.float32)
    # An all-zero (or denormal-only) channel gets scale 1 (its integers are all 0), as onnxruntime does;
    # like onnxruntime, compare the float64 scale (a float64 just below tiny may round up to tiny in float32).
    return np.where(scale64 < np.finfo(np.float32).tiny, np.float32(1.0), scale).astype(np.float32)


def quantize_weight(weight: np.ndarray, bits: int, axis: int) -> QuantizedWeight:
    weight = np.asarray(weight, dtype=np.float32)
    axis = axis % weight.ndim
    scales = channel_scales(weight, bits, axis)
    shape = [1] * weight.ndim
    shape[axis] = -1
    limit = qmax(bits)
    integers = np.clip(np.round(weight / scales.reshape(shape)), -limit, limit).astype(np.int8)
    return QuantizedWeight(integers=integers, scales=scales, axis=axis, bits=bits)


def to_float16(weight: np.ndarray) -> np.ndarray:
    """W as the float16 array the exporter stores: onnxruntime's converter's clamps, then rounding
    (``convert_np_to_float16``; NaN and ±inf pass through as they are)."""
    values = np.asarray(weight, dtype=np.float32)
    magnitude = np.abs(values)
    tiny = (magnitude > 0) & (magnitude < FLOAT16_MIN_POSITIVE)
    huge = (magnitude > FLOAT16_MAX_FINITE) & np.isfinite(values)
    clamped = np.where(tiny, np.copysign(np.float32(FLOAT16_MIN_POSITIVE), values), values)
    clamped = np.where(huge, np.copysign(np.float32(FLOAT16_MAX_FINITE), values), clamped)
    return clamped.astype(np.float16)


def dequantized(weight: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Q_b(W) as float32 numpy: the integer grid's values, or W's float16 values for ``FLOAT16_BITS``."""
    if bits == FLOAT16_BITS:
        return to_float16(weight).astype(np.float32)
    return quantize_weight(weight, bits, axis).dequantize()


def fake_quantize(weight: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Q_b(W) as a torch tensor on W's device and dtype (no gradient flows through it)."""
    quantized = dequantized(weight.detach().cpu().numpy(), bits, axis)
    return torch.from_numpy(quantized).to(device=weight.device, dtype=weight.dtype)


def perturbation(weight: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Δᵢᵇ = Q_b(Wᵢ) − Wᵢ."""
    return fake_quantize(weight, bits, axis) - weight.detach()
