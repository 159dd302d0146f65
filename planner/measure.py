"""Measuring configurations for real: export, evaluate in onnxruntime, time (a step of ``planner.plan``).

``Measurer`` exports and measures each configuration once (cached): the searches measure frontier
points and bisection steps through it, and the chosen plan's artifact is the very export that was
measured.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from planner.candidates import Configuration
from planner.evaluate import evaluate
from planner.export import ExportedModel, export_model
from planner.latency import measure_latency
from planner.latency_table import RelativeLatency, compare, timing_for
from planner.request import PlanRequest
from planner.result import Measurement, PlanPoint
from sensitivity.normalize import NormalizedModel

Progress = Callable[[str, float, str], None]  # (phase, fraction done, message)
REQUEST_METADATA_KEY = "mpq.request"


class Measurer:
    """Exports and measures configurations once each (cached); counts the distinct ones."""

    def __init__(
        self,
        model: NormalizedModel,
        calibration: Mapping[str, np.ndarray],
        evaluation: Mapping[str, np.ndarray],
        request: PlanRequest,
        progress: Progress,
        sample_axes: Mapping[str, int | None],
    ) -> None:
        self._model = model  # normalised at the export's opset: export_model uses it as it is
        self.sample_axes = dict(sample_axes)  # every input's, resolved (sensitivity.samples)
        self._float_bytes = model.model.SerializeToString()
        self._calibration = calibration
        self._evaluation = evaluation
        self._request = request
        self.progress = progress
        # Every artifact carries the same metadata, so the chosen one is byte-identical to the measured one.
        self._metadata = {REQUEST_METADATA_KEY: json.dumps(request.to_dict(), sort_keys=True)}
        self._exports: dict[Configuration, ExportedModel] = {}
        self._measurements: dict[Configuration, Measurement] = {}

    @property
    def count(self) -> int:
        return len(self._measurements)

    def has(self, configuration: Mapping[str, str]) -> bool:
        return Configuration(dict(configuration)) in self._measurements

    def export(self, configuration: Mapping[str, str]) -> ExportedModel:
        key = Configuration(dict(configuration))
        if key not in self._exports:
            self._exports[key] = export_model(
                self._model,
                key,
                self._calibration,
                metadata=self._metadata,
                constraints=self._request.constraints(),
                sample_axes=self.sample_axes,
            )
        return self._exports[key]

    def measure(self, configuration: Mapping[str, str]) -> Measurement:
        key = Configuration(dict(configuration))
        if key not in self._measurements:
            self.progress("measure", 0.0, f"exporting and evaluating configuration {len(self._measurements) + 1}")
            exported = self.export(key)
            result = evaluate(
                exported, self._float_bytes, self._evaluation, metric=self._request.metric, sample_axes=self.sample_axes
            )
            latency = measure_latency(
                exported.model_bytes,
                self._evaluation,
                device=_latency_device(self._request.device),
                warmup=self._request.latency_warmup,
                repeats=self._request.latency_repeats,
                batch_size=self._request.latency_batch_size,
                sample_axes=self.sample_axes,
            )
            self._measurements[key] = Measurement(
                metric_name=result.metric_name,
                metric=result.metric,
                baseline=result.baseline,
                drop=result.drop,
                num_samples=result.num_samples,
                size_bytes=len(exported.model_bytes),
                sha256=exported.sha256,
                latency=latency,
                output_kind=result.output_kind,
                metric_reason=result.metric_reason,
            )
            self.progress("measure", 1.0, f"{result.metric_name} {result.metric:.2f} % (drop {result.drop:.2f} pp)")
        return self._measurements[key]

    def relative_latency(self, configurations: Sequence[Mapping[str, str]]) -> list[RelativeLatency]:
        """Each configuration's artifact timed against the float model, all interleaved in one run
        (``planner.latency_table.compare``): ratios to compare, never ms from separate runs."""
        models = [self.export(configuration).model_bytes for configuration in configurations]
        return compare(models, self._float_bytes, self._evaluation, timing_for(self._request), self.sample_axes)

    def measured(self, point: PlanPoint) -> PlanPoint:
        return dataclasses.replace(point, measured=self.measure(point.configuration))


def _latency_device(device: str) -> str:
    """The latency module knows auto, cpu and cuda; a numbered CUDA device counts as cuda."""
    return "cuda" if device.startswith("cuda") else device
