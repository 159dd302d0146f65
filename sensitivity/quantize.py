"""The one weight quantizer Q_b shared by the sensitivity code and the ONNX exporter.

Symmetric, per output channel, restricted range: integers in [-(2^(b-1)-1), 2^(b-1)-1]
and scale = max|W_channel| / (2^(b-1)-1). For int8 this is exactly what onnxruntime's
quantizer computes with ``WeightSymmetric=True`` (range [-127, 127], scale computed in
float64 then stored as float32, round half to even on float32 data). onnxruntime's
symmetric int4 instead uses [-8, 7] with scale 2·absmax/15, which clips +absmax; we keep
the restricted range for every width so Q_b is symmetric, and the exporter writes the
int4 weights it needs from this module (see planner/).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)


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
    if bits not in SUPPORTED_WEIGHT_BITS:
        raise ValueError(f"unsupported weight bit width {bits}; supported: {SUPPORTED_WEIGHT_BITS}")
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


def fake_quantize(weight: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Q_b(W) as a torch tensor on W's device and dtype (no gradient flows through it)."""
    quantized = quantize_weight(weight.detach().cpu().numpy(), bits, axis).dequantize()
    return torch.from_numpy(quantized).to(device=weight.device, dtype=weight.dtype)


def perturbation(weight: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Δᵢᵇ = Q_b(Wᵢ) − Wᵢ."""
    return fake_quantize(weight, bits, axis) - weight.detach()
