"""Measured inference latency of a model in onnxruntime (never estimated).

``device="auto"`` uses the CUDA execution provider when onnxruntime has it and a GPU is present,
else the CPU provider. Each figure comes with the device description (CPU model name from
/proc/cpuinfo, or the GPU name), the provider and the onnxruntime version.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from planner.export import check_inputs
from sensitivity.samples import SampleAxes, fixed_batch, input_sample_axes

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
MAX_REPEATS = 100_000


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
    import onnx
    import onnxruntime as ort

    _check_counts(warmup, repeats, batch_size, threads)
    model = onnx.load_from_string(model_bytes)
    feeds = check_inputs(model, inputs, what="latency inputs", sample_axes=sample_axes)
    axes = input_sample_axes(model, sample_axes)
    batch_size = fixed_batch(model, sample_axes) or batch_size  # a model exported with batch N runs N at a time
    batch = {name: _take(array, batch_size, axes[name]) for name, array in feeds.items()}
    provider = select_provider(device)

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model_bytes, options, providers=[provider])
    provider_used = session.get_providers()[0]
    if provider_used != provider:
        raise RuntimeError(f"onnxruntime did not start {provider} (got {session.get_providers()})")

    for _ in range(warmup):
        session.run(None, batch)
    timings = np.empty(repeats)
    for index in range(repeats):
        start = time.perf_counter()
        session.run(None, batch)
        timings[index] = (time.perf_counter() - start) * 1e3
    return LatencyMeasurement(
        mean_ms=float(timings.mean()),
        p50_ms=float(np.percentile(timings, 50)),
        p90_ms=float(np.percentile(timings, 90)),
        batch_size=batch_size,
        repeats=repeats,
        device_description=gpu_description() if provider == CUDA_PROVIDER else cpu_description(),
        provider=provider_used,
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


def _check_counts(warmup: int, repeats: int, batch_size: int, threads: int | None) -> None:
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not 1 <= repeats <= MAX_REPEATS:
        raise ValueError(f"repeats must be in [1, {MAX_REPEATS}], got {repeats}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be positive, got {threads}")
