"""Measured inference latency of a model in onnxruntime (never estimated).

``device="auto"`` uses the CUDA execution provider when onnxruntime has it and a GPU is present,
else the CPU provider. Each figure comes with the device description (CPU model name from
/proc/cpuinfo, or the GPU name), the provider and the onnxruntime version.

``measure_latency`` times one model alone. ``compare_latency`` times models against a reference
(the float model) interleaved in one process and reports each as a ratio to it: on a busy machine
absolute milliseconds from separate runs are not comparable (a plan recorded at 12.6 ms measured
43-48 ms when re-timed), while two sessions timed alternately share the load. Decisions (is it
faster than float? which is fastest?) use the ratios.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from planner.export import check_inputs
from sensitivity.samples import SampleAxes, fixed_batch, input_sample_axes

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
MAX_REPEATS = 100_000
# compare_latency's rounds: at least 2 (one round has no spread), and at most MAX_REPEATS runs per model.
MIN_ROUNDS = 2
# The ratio's interval: a distribution-free 90 % confidence interval of the median over rounds.
RATIO_CONFIDENCE = 0.90
EXACT_BINOMIAL_LIMIT = 1000


@dataclass(frozen=True)
class LatencyMeasurement:
    mean_ms: float
    p50_ms: float
    p90_ms: float
    batch_size: int
    repeats: int
    device_description: str
    provider: str
    onnxruntime_version: str


def measure_latency(
    model_bytes: bytes,
    inputs: Mapping[str, np.ndarray],
    *,
    device: str = "auto",
    warmup: int = 10,
    repeats: int = 50,
    batch_size: int = 1,
    threads: int | None = None,
    sample_axes: SampleAxes | None = None,
) -> LatencyMeasurement:
    """Time ``repeats`` runs of one batch of ``batch_size`` samples after ``warmup`` untimed runs.

    ``inputs`` maps every model input to samples on its sample axis (``sensitivity.samples``, with
    ``sample_axes`` merged over the declared shapes); the batch is its first ``batch_size`` samples,
    repeated cyclically when there are fewer (a model whose batch dim is fixed at N runs N, the
    ``batch_size`` recorded), and a shared input is fed whole. ``threads`` sets onnxruntime's
    intra-op threads (default: onnxruntime's choice).
    """
    _check_counts(warmup, repeats, batch_size, threads)
    provider = select_provider(device)
    timed = _session(model_bytes, inputs, provider, batch_size, threads, sample_axes)
    timed.times(warmup)
    return _figures(timed.times(repeats), timed, provider)


@dataclass(frozen=True)
class RelativeLatency:
    """A model's latency measured interleaved with a reference (the float model) in one process."""

    measurement: LatencyMeasurement  # the timed model's own figures over all its runs in the interleaved run
    reference_p50_ms: float  # the reference's median over all its runs in the same run
    ratio: float  # median over rounds of (model time / reference time); < 1 is faster than the reference
    # Half-width of the median ratio's 90 % confidence interval (order statistics of the rounds'
    # ratios, distribution-free: ``median_interval``), in ratio units.
    ratio_spread: float
    rounds: int

    @property
    def faster(self) -> bool:
        return faster_than_reference(self.ratio, self.ratio_spread)


def faster_than_reference(ratio: float, spread: float) -> bool:
    """Measured faster: the ratio's 90 % interval lies wholly below 1 (the only ground for "faster")."""
    return ratio < 1.0 - spread


def slower_than_reference(ratio: float, spread: float) -> bool:
    """Measured slower: the ratio's 90 % interval lies wholly above 1."""
    return ratio > 1.0 + spread


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
    """Each of ``models`` timed against ``reference``, interleaved, as a ratio of their times.

    Every model and the reference get their own onnxruntime session in this process, each warmed up
    with ``warmup`` untimed runs. A round times, for each model in turn, ``runs_per_round`` runs of
    the reference and ``runs_per_round`` of the model, back to back (the reference first in even
    rounds, the model first in odd ones, so a drift within the pair cancels); the round's ratio is
    the model's median run over the reference's median run next to it. Rounds continue from
    ``min_rounds`` until every model's ``ratio_spread`` is at most ``target_spread`` or
    ``max_rounds`` have run. The batch and ``inputs`` are as for ``measure_latency``.
    """
    _check_models(models, reference)
    _check_rounds(min_rounds, max_rounds, runs_per_round, target_spread)
    _check_counts(warmup, runs_per_round, batch_size, threads)
    provider = select_provider(device)
    baseline = _session(reference, inputs, provider, batch_size, threads, sample_axes)
    timed = [_session(model, inputs, provider, batch_size, threads, sample_axes) for model in models]
    for session in (baseline, *timed):
        session.times(warmup)

    reference_times: list[np.ndarray] = []
    model_times: list[list[np.ndarray]] = [[] for _ in models]
    ratios: list[list[float]] = [[] for _ in models]
    for round_index in range(max_rounds):
        reference_first = round_index % 2 == 0
        for times, round_ratios, session in zip(model_times, ratios, timed, strict=True):
            if reference_first:
                reference_run, model_run = baseline.times(runs_per_round), session.times(runs_per_round)
            else:
                model_run, reference_run = session.times(runs_per_round), baseline.times(runs_per_round)
            reference_times.append(reference_run)
            times.append(model_run)
            round_ratios.append(float(np.median(model_run) / np.median(reference_run)))
        if round_index + 1 >= min_rounds and all(_spread(r) <= target_spread for r in ratios):
            break

    reference_p50 = float(np.median(np.concatenate(reference_times)))
    return [
        RelativeLatency(
            measurement=_figures(np.concatenate(times), session, provider),
            reference_p50_ms=reference_p50,
            ratio=float(np.median(round_ratios)),
            ratio_spread=_spread(round_ratios),
            rounds=len(round_ratios),
        )
        for times, round_ratios, session in zip(model_times, ratios, timed, strict=True)
    ]


def median_interval(values: Sequence[float], confidence: float = RATIO_CONFIDENCE) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of ``values``: the order statistics
    (k-th smallest, k-th largest) with the largest k such that Binomial(n, 1/2) puts at most
    (1 - confidence)/2 below k. Fewer than 5 values have no such k at 90 %: then (min, max)."""
    ordered = np.sort(np.asarray(values, dtype=float))
    k = _order_statistic(len(ordered), (1.0 - confidence) / 2.0)
    return float(ordered[k - 1]), float(ordered[len(ordered) - k])


def _order_statistic(count: int, tail: float) -> int:
    """The largest k >= 1 with P(Binomial(count, 1/2) <= k - 1) <= tail (1 when none); above
    EXACT_BINOMIAL_LIMIT values, the normal approximation (2**count overflows a float)."""
    if count > EXACT_BINOMIAL_LIMIT:
        z = statistics.NormalDist().inv_cdf(1.0 - tail)
        return max(1, math.floor(count / 2.0 - z * math.sqrt(count) / 2.0))
    k, below = 1, 2.0**-count  # below: P(B <= k - 1)
    while k < count:
        below_next = below + math.comb(count, k) * 2.0**-count
        if below_next > tail:
            break
        k, below = k + 1, below_next
    return k


def _spread(values: Sequence[float]) -> float:
    """Half-width of ``median_interval``."""
    low, high = median_interval(values)
    return (high - low) / 2.0


@dataclass(frozen=True)
class _Timed:
    """An onnxruntime session with the batch it runs."""

    session: Any
    batch: Mapping[str, np.ndarray]
    batch_size: int

    def times(self, runs: int) -> np.ndarray:
        """Milliseconds of each of ``runs`` runs of the batch."""
        timings = np.empty(runs)
        for index in range(runs):
            start = time.perf_counter()
            self.session.run(None, self.batch)
            timings[index] = (time.perf_counter() - start) * 1e3
        return timings


def _session(
    model_bytes: bytes,
    inputs: Mapping[str, np.ndarray],
    provider: str,
    batch_size: int,
    threads: int | None,
    sample_axes: SampleAxes | None,
) -> _Timed:
    """An onnxruntime session of ``model_bytes`` on ``provider`` with its batch (``measure_latency``'s)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(model_bytes)
    feeds = check_inputs(model, inputs, what="latency inputs", sample_axes=sample_axes)
    axes = input_sample_axes(model, sample_axes)
    batch_size = fixed_batch(model, sample_axes) or batch_size  # a model exported with batch N runs N at a time
    batch = {name: _take(array, batch_size, axes[name]) for name, array in feeds.items()}
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    # Sessions timed in turn in one process: a session's threads spinning after its run take the cores
    # from the next one (an identical copy of a model timed 0.92-0.95x itself with spinning on, 1.005x off).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model_bytes, options, providers=[provider])
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"onnxruntime did not start {provider} (got {session.get_providers()})")
    return _Timed(session, batch, batch_size)


def _figures(timings: np.ndarray, timed: _Timed, provider: str) -> LatencyMeasurement:
    import onnxruntime as ort

    return LatencyMeasurement(
        mean_ms=float(timings.mean()),
        p50_ms=float(np.percentile(timings, 50)),
        p90_ms=float(np.percentile(timings, 90)),
        batch_size=timed.batch_size,
        repeats=len(timings),
        device_description=gpu_description() if provider == CUDA_PROVIDER else cpu_description(),
        provider=timed.session.get_providers()[0],
        onnxruntime_version=ort.__version__,
    )


def select_provider(device: str) -> str:
    """The execution provider for ``device`` ("auto", "cpu" or "cuda")."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    has_cuda = CUDA_PROVIDER in ort.get_available_providers() and gpu_description() != ""
    if device == "cuda" and not has_cuda:
        raise RuntimeError(
            "device='cuda' requested but onnxruntime has no usable CUDA provider "
            f"(available: {ort.get_available_providers()})"
        )
    return CUDA_PROVIDER if device in ("cuda", "auto") and has_cuda else CPU_PROVIDER


def cpu_description() -> str:
    """CPU model name from /proc/cpuinfo (platform's processor string elsewhere) and logical core count."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith(("model name", "hardware")):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} logical cores available)"


def gpu_description() -> str:
    """Name of the first GPU from nvidia-smi; empty when there is none."""
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    names = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return names[0] if result.returncode == 0 and names else ""


def _take(array: np.ndarray, batch_size: int, axis: int | None) -> np.ndarray:
    """The first ``batch_size`` samples along ``axis``, repeated cyclically when there are fewer; a
    shared input (axis None) whole."""
    if axis is None:
        return np.asarray(array, order="C")  # not ascontiguousarray: it makes a rank-0 array 1-d
    rows = np.arange(batch_size) % array.shape[axis]
    return np.ascontiguousarray(np.take(array, rows, axis=axis))


def _check_models(models: Sequence[bytes], reference: bytes) -> None:
    if isinstance(models, (bytes, bytearray)) or not isinstance(models, Sequence):
        raise ValueError(f"models must be a sequence of serialized ONNX models (bytes); got {type(models).__name__}")
    if not models:
        raise ValueError("models is empty: give at least one model to compare with the reference")
    for index, model in enumerate(models):
        if not isinstance(model, bytes) or not model:
            raise ValueError(f"models[{index}] must be a serialized ONNX model (non-empty bytes)")
    if not isinstance(reference, bytes) or not reference:
        raise ValueError("reference must be a serialized ONNX model (non-empty bytes)")


def _check_rounds(min_rounds: int, max_rounds: int, runs_per_round: int, target_spread: float) -> None:
    if min_rounds < MIN_ROUNDS:
        raise ValueError(f"min_rounds must be >= {MIN_ROUNDS} (one round has no spread), got {min_rounds}")
    if max_rounds < min_rounds:
        raise ValueError(f"max_rounds must be >= min_rounds ({min_rounds}), got {max_rounds}")
    if runs_per_round >= 1 and max_rounds * runs_per_round > MAX_REPEATS:
        raise ValueError(
            f"max_rounds x runs_per_round must be <= {MAX_REPEATS} runs per model, got {max_rounds} x {runs_per_round}"
        )
    if not (math.isfinite(target_spread) and target_spread > 0):
        raise ValueError(f"target_spread must be a positive number (ratio units, 0.03 = 3 %), got {target_spread}")


def _check_counts(warmup: int, repeats: int, batch_size: int, threads: int | None) -> None:
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not 1 <= repeats <= MAX_REPEATS:
        raise ValueError(f"repeats must be in [1, {MAX_REPEATS}], got {repeats}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be positive, got {threads}")
