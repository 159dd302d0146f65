"""The interface every model source (ONNX interpreter, torch.export archive) loads into.

A ``Program`` is a pure function of (layer weights, inputs): the weights of quantizable
layers are passed in explicitly so that ``torch.autograd`` and ``torch.func`` can
differentiate with respect to them, and so that a perturbed copy (Q_b(W)) can be run
without mutating anything. Every other constant (biases, norms, shapes) lives inside.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from sensitivity.layers import Layer


@runtime_checkable
class Program(Protocol):
    @property
    def layers(self) -> Sequence[Layer]:
        """Quantizable layers in graph order; ``layer.name`` keys ``layer_weights``."""

    @property
    def layer_weights(self) -> Mapping[str, torch.Tensor]:
        """Full-precision weights (float32, detached) keyed by layer name."""

    @property
    def input_names(self) -> Sequence[str]: ...

    @property
    def output_names(self) -> Sequence[str]: ...

    @property
    def fixed_batch_size(self) -> int | None:
        """N when the model only takes batches of exactly N samples (its batch dim is fixed)."""

    @property
    def sample_axes(self) -> Mapping[str, int | None]:
        """Each input's sample axis, None for an input shared by every sample (``sensitivity.samples``)."""

    def forward(self, weights: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run the model with the given layer weights; returns the outputs in order."""

    def to(self, device: torch.device) -> Program:
        """A copy of the program whose constants live on ``device``."""


class ProgramAttributes:
    """The read-only attributes of the ``Program`` protocol, for implementations that set
    ``_layers``, ``_layer_weights``, ``_input_names`` and ``_output_names`` (and
    ``_fixed_batch_size`` when the model's batch dim is fixed, ``_sample_axes`` when some input
    does not hold its samples on axis 0)."""

    _layers: Sequence[Layer]
    _layer_weights: Mapping[str, torch.Tensor]
    _input_names: Sequence[str]
    _output_names: Sequence[str]
    _fixed_batch_size: int | None = None
    _sample_axes: Mapping[str, int | None] | None = None

    @property
    def layers(self) -> Sequence[Layer]:
        return self._layers

    @property
    def layer_weights(self) -> Mapping[str, torch.Tensor]:
        return self._layer_weights

    @property
    def input_names(self) -> Sequence[str]:
        return self._input_names

    @property
    def output_names(self) -> Sequence[str]:
        return self._output_names

    @property
    def fixed_batch_size(self) -> int | None:
        return self._fixed_batch_size

    @property
    def sample_axes(self) -> Mapping[str, int | None]:
        if self._sample_axes is None:
            return {name: 0 for name in self._input_names}
        return self._sample_axes
