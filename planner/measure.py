"""Measuring configurations for real: export, evaluate in onnxruntime, time (a step of ``planner.plan``).

``Measurer`` exports and measures each configuration once (cached), timing it interleaved with
the float model so that every ``Measurement`` carries its latency as a ratio to float: the searches
measure frontier points and bisection steps through it, and the chosen plan's artifact is the very
export that was measured. Before the first configuration it measures the baseline models
(``baselines``: every layer fp32, the float model; every layer fp16), and every measurement carries
its comparison with each (``Measurement.against``), so ``max_drop`` can be held against either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from planner.candidates import Configuration
from planner.evaluate import evaluate
from planner.export import ExportedModel, ExportError, export_model
from planner.latency import RelativeLatency
from planner.latency_table import compare, measurement_timing
from planner.request import PlanRequest
from planner.result import Measurement, PlanPoint
from sensitivity.layers import find_layers
from sensitivity.normalize import NormalizedModel

logger = logging.getLogger(__name__)

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
        self._timing = measurement_timing(request)  # one way to time every configuration against float
        self.progress = progress
        # Every artifact carries the same metadata, so the chosen one is byte-identical to the measured one.
        self._metadata = {REQUEST_METADATA_KEY: json.dumps(request.to_dict(), sort_keys=True)}
        self._exports: dict[Configuration, ExportedModel] = {}
        self._measurements: dict[Configuration, Measurement] = {}  # with their comparisons (``against``)
        self._alone: dict[Configuration, Measurement] = {}  # without: the baselines are measured this way
        self._baselines: dict[str, Measurement] | None = None

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
        """The configuration measured, against each baseline model (``baselines``)."""
        key = Configuration(dict(configuration))
        if key not in self._measurements:
            baselines = self.baselines()
            self._measurements[key] = self._measure_alone(key).compared(baselines)
        return self._measurements[key]

    def baselines(self) -> dict[str, Measurement]:
        """The baseline models measured (once), each against all of them: ``fp32`` (every layer fp32) and
        ``fp16`` (every layer fp16, excluded layers too: the 16-bit model). An fp16 model that does
        not export is left out with a warning, unless the request's ``baseline`` is fp16."""
        if self._baselines is None:
            layers = find_layers(self._model.model)
            found = {"fp32": self._measure_alone(Configuration.uniform(layers, "fp32"))}
            try:
                found["fp16"] = self._measure_alone(Configuration.uniform(layers, "fp16"))
            except ExportError as error:
                if self._request.baseline == "fp16":
                    raise ExportError(f"the fp16 baseline model does not export: {error}") from error
                logger.warning("fp16 baseline skipped: %s", error)
                self.progress("measure", 1.0, f"fp16 baseline skipped: it does not export ({error})"[:500])
            self._baselines = {name: measured.compared(found) for name, measured in found.items()}
        return self._baselines

    def _measure_alone(self, key: Configuration) -> Measurement:
        if key not in self._alone:
            self.progress("measure", 0.0, f"exporting and evaluating configuration {len(self._alone) + 1}")
            exported = self.export(key)
            result = evaluate(
                exported, self._float_bytes, self._evaluation, metric=self._request.metric, sample_axes=self.sample_axes
            )
            (latency,) = self._compare_with_float([exported.model_bytes])
            self._alone[key] = Measurement(
                metric_name=result.metric_name,
                metric=result.metric,
                baseline=result.baseline,
                drop=result.drop,
                num_samples=result.num_samples,
                size_bytes=len(exported.model_bytes),
                sha256=exported.sha256,
                latency=latency.measurement,
                output_kind=result.output_kind,
                metric_reason=result.metric_reason,
                ratio_to_float=latency.ratio,
                ratio_spread=latency.ratio_spread,
                float_p50_ms=latency.reference_p50_ms,
            )
            self.progress("measure", 1.0, f"{result.metric_name} {result.metric:.2f} % (drop {result.drop:.2f} pp)")
        return self._alone[key]

    def relative_latency(self, configurations: Sequence[Mapping[str, str]]) -> list[RelativeLatency]:
        """Each configuration's artifact timed against the float model, all interleaved in one run
        (``planner.latency_table.compare``): ratios to compare, never ms from separate runs."""
        return self._compare_with_float([self.export(configuration).model_bytes for configuration in configurations])

    def _compare_with_float(self, models: Sequence[bytes]) -> list[RelativeLatency]:
        """``models`` timed interleaved with the float model (``planner.latency_table.compare``)."""
        return compare(models, self._float_bytes, self._evaluation, self._timing, self.sample_axes)

    def measured(self, point: PlanPoint) -> PlanPoint:
        return dataclasses.replace(point, measured=self.measure(point.configuration))
