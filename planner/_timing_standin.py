"""STAND-IN, TO BE DELETED AT MERGE: a minimal ``compare_latency`` with the shared interface's exact
signature (``planner.latency.compare_latency``, owned by the ``timing`` branch), so the latency table
can be built before that lands. Only ``planner.latency_table.compare`` imports it; at merge that
import becomes ``from planner.latency import RelativeLatency, compare_latency`` and this file goes.

Interleaving: each round times ``runs_per_round`` runs of the reference and of each model, in a
rotating order (round r starts at session r mod (n + 1), the reference included); a model's ratio for a round is its median run
over the reference's median run of the same round. ``ratio`` is the median over rounds and
``ratio_spread`` the half-width of the 5-95 % percentile interval of the per-round ratios.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from planner.export import check_inputs
from planner.latency import (
    CUDA_PROVIDER,
    LatencyMeasurement,
    _take,
    cpu_description,
    gpu_description,
    select_provider,
)
from sensitivity.samples import SampleAxes, fixed_batch, input_sample_axes


@dataclass(frozen=True)
class RelativeLatency:
    measurement: LatencyMeasurement
    reference_p50_ms: float
    ratio: float
    ratio_spread: float
    rounds: int


def compare_latency(
    models: Sequence[bytes],
    reference: bytes,
    inputs: Mapping[str, np.ndarray],
    *,
    device: str = "auto",
    batch_size: int = 1,
    sample_axes: SampleAxes | None = None,
    threads: int | None = None,
    warmup: int = 10,
    min_rounds: int = 5,
    max_rounds: int = 50,
    runs_per_round: int = 5,
    target_spread: float = 0.03,
) -> list[RelativeLatency]:
    import onnx
    import onnxruntime as ort

    reference_model = onnx.load_from_string(reference)
    feeds = check_inputs(reference_model, inputs, what="latency inputs", sample_axes=sample_axes)
    axes = input_sample_axes(reference_model, sample_axes)
    batch_size = fixed_batch(reference_model, sample_axes) or batch_size
    batch = {name: _take(array, batch_size, axes[name]) for name, array in feeds.items()}
    provider = select_provider(device)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle sessions' worker threads spin after each run and take the 2 cores from the next session.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    sessions = [ort.InferenceSession(m, options, providers=[provider]) for m in (reference, *models)]
    for session in sessions:
        for _ in range(warmup):
            session.run(None, batch)
    times: list[list[np.ndarray]] = [[] for _ in sessions]
    n = len(models)
    for round_ in range(max_rounds):
        # The reference rotates too: timed first in every round, it measured 5-8 % slower than an
        # identical copy of itself (the tiny token transformer, 2-core machine).
        order = [(round_ + k) % (n + 1) for k in range(n + 1)]
        for index in order:
            times[index].append(_timed(sessions[index], batch, runs_per_round))
        if round_ + 1 >= min_rounds and all(
            _spread(_ratios(times[0], times[k])) <= target_spread for k in range(1, n + 1)
        ):
            break
    reference_all = np.concatenate(times[0])
    description = gpu_description() if provider == CUDA_PROVIDER else cpu_description()
    results = []
    for k in range(1, n + 1):
        ratios = _ratios(times[0], times[k])
        runs = np.concatenate(times[k])
        results.append(
            RelativeLatency(
                measurement=LatencyMeasurement(
                    mean_ms=float(runs.mean()),
                    p50_ms=float(np.percentile(runs, 50)),
                    p90_ms=float(np.percentile(runs, 90)),
                    batch_size=batch_size,
                    repeats=len(runs),
                    device_description=description,
                    provider=sessions[k].get_providers()[0],
                    onnxruntime_version=ort.__version__,
                ),
                reference_p50_ms=float(np.percentile(reference_all, 50)),
                ratio=float(np.median(ratios)),
                ratio_spread=_spread(ratios),
                rounds=len(ratios),
            )
        )
    return results


def _timed(session: Any, batch: Mapping[str, np.ndarray], runs: int) -> np.ndarray:
    timings = np.empty(runs)
    for index in range(runs):
        start = time.perf_counter()
        session.run(None, batch)
        timings[index] = (time.perf_counter() - start) * 1e3
    return timings


def _ratios(reference: list[np.ndarray], model: list[np.ndarray]) -> np.ndarray:
    return np.array([np.median(m) / np.median(r) for r, m in zip(reference, model)])


def _spread(ratios: np.ndarray) -> float:
    low, high = np.percentile(ratios, [5, 95])
    return float((high - low) / 2)
