"""Model check: predicted loss changes against losses measured with fake-quantized weights.

For a set of configurations c the measured change is L(Q_c(W)) − L(W₀), with the same
calibration loss the sensitivity used (same data, batch size and loss kind). Two
predictors are compared with it:

- inter-layer: g·Δ(c) + ½ Σᵢⱼ G[(i,cᵢ),(j,cⱼ)] (``predicted_loss_change``);
- diagonal: ½Ω(c) (``diagonal_loss_change``, HAWQ-V2's proxy with the ½ of Taylor's
  expansion, so both predict the same quantity).

Configurations: every single layer at every bit width, pairs of layers (all, or a seeded
sample of ``max_pairs``) at a common bit width, and ``num_random`` seeded random whole
configurations (each layer unquantized or at one of the bit widths, uniformly).
Reported per group: Spearman rank correlation (``scipy.stats.spearmanr``) and the mean
absolute relative error |pred − meas| / |meas| (over configurations with meas ≠ 0).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from sensitivity.interlayer import Configuration, diagonal_loss_change, predicted_loss_change
from sensitivity.losses import CalibrationLoss
from sensitivity.program import Program
from sensitivity.quantize import fake_quantize
from sensitivity.results import SensitivityResult
from sensitivity.run import program_on_device, resolve_device, validate_calibration


@dataclass(frozen=True)
class GroupCheck:
    group: str  # "single", "pairs", "random" or "all"
    count: int
    spearman_interlayer: float
    spearman_diagonal: float
    relative_error_interlayer: float  # mean |pred − meas| / |meas|
    relative_error_diagonal: float


@dataclass(frozen=True)
class ValidationReport:
    groups: tuple[GroupCheck, ...]
    configurations: tuple[dict[str, int | None], ...]
    group_of: tuple[str, ...]
    measured: tuple[float, ...]
    predicted_interlayer: tuple[float, ...]
    predicted_diagonal: tuple[float, ...]

    def group(self, name: str) -> GroupCheck:
        return next(g for g in self.groups if g.group == name)

    def to_dict(self) -> dict:
        return asdict(self)


def _configurations(
    names: Sequence[str], bits: Sequence[int], num_random: int, max_pairs: int, seed: int
) -> list[tuple[str, dict[str, int | None]]]:
    rng = np.random.default_rng(seed)
    configs: list[tuple[str, dict[str, int | None]]] = []
    configs += [("single", {name: b}) for name in names for b in bits]
    pairs = [(a, b, w) for a, b in itertools.combinations(names, 2) for w in bits]
    if len(pairs) > max_pairs:
        pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), size=max_pairs, replace=False))]
    configs += [("pairs", {a: w, b: w}) for a, b, w in pairs]
    choices: list[int | None] = [None, *bits]
    for _ in range(num_random):
        picks = rng.integers(0, len(choices), size=len(names))
        configs.append(("random", {name: choices[k] for name, k in zip(names, picks)}))
    return configs


def measured_loss_change(loss: CalibrationLoss, configuration: Configuration) -> float:
    """L(Q_c(W)) − L(W₀) with the weights of quantized layers replaced by Q_b(W)."""
    axes = {layer.name: layer.channel_axis for layer in loss.program.layers}
    weights = dict(loss.weights0)
    for name, bits in configuration.items():
        if bits is not None:
            weights[name] = fake_quantize(weights[name], bits, axes[name])
    return loss.value(weights) - loss.value()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr  # imported here: scipy.stats takes seconds to import

    if len(a) < 3:
        return math.nan
    return float(spearmanr(a, b).statistic)


def _relative_error(predicted: np.ndarray, measured: np.ndarray) -> float:
    nonzero = measured != 0  # an all-unquantized configuration changes nothing: no relative error
    if not nonzero.any():
        return math.nan
    return float(np.mean(np.abs(predicted[nonzero] - measured[nonzero]) / np.abs(measured[nonzero])))


def _group_check(name: str, mask: np.ndarray, measured: np.ndarray, inter: np.ndarray, diag: np.ndarray) -> GroupCheck:
    m, i, d = measured[mask], inter[mask], diag[mask]
    return GroupCheck(
        name, int(mask.sum()), _spearman(i, m), _spearman(d, m), _relative_error(i, m), _relative_error(d, m)
    )


def validate_predictions(
    program: Program,
    calibration: Mapping[str, np.ndarray],
    result: SensitivityResult,
    *,
    num_random: int = 32,
    max_pairs: int = 64,
    seed: int = 0,
) -> ValidationReport:
    """Compare both predictors with measured loss changes; see the module docstring."""
    if result.interlayer is None:
        raise ValueError("validation needs inter-layer terms; compute the result with an InterLayerConfig")
    validate_calibration(program, calibration)
    config = result.config
    device = resolve_device(config.device)
    loss = CalibrationLoss(program_on_device(program, device), calibration, config.batch_size, device, config.task)
    names = [layer.name for layer in result.layers]
    bits = sorted({b for _, b in result.interlayer.labels}, reverse=True)
    configs = _configurations(names, bits, num_random, max_pairs, seed)
    measured = np.array([measured_loss_change(loss, c) for _, c in configs])
    inter = np.array([predicted_loss_change(result, c) for _, c in configs])
    diag = np.array([diagonal_loss_change(result, c) for _, c in configs])
    groups = np.array([g for g, _ in configs])
    checks = [_group_check(g, groups == g, measured, inter, diag) for g in ("single", "pairs", "random")]
    checks.append(_group_check("all", np.ones(len(configs), dtype=bool), measured, inter, diag))
    return ValidationReport(
        groups=tuple(checks),
        configurations=tuple(c for _, c in configs),
        group_of=tuple(str(g) for g in groups),
        measured=tuple(float(x) for x in measured),
        predicted_interlayer=tuple(float(x) for x in inter),
        predicted_diagonal=tuple(float(x) for x in diag),
    )
