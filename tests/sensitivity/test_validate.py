"""Model check on the trained digits CNN: predicted against measured loss changes."""

from __future__ import annotations

import math

import pytest

from sensitivity import InterLayerConfig, TorchProgram, compute_sensitivity
from sensitivity.examples import trained_digits_cnn
from sensitivity.validate import ValidationReport, measured_loss_change, validate_predictions

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]  # the module trains a CNN first


@pytest.fixture(scope="module")
def checked(single_thread) -> tuple[ValidationReport, ValidationReport]:
    model, digits = trained_digits_cnn(seed=0, epochs=8)  # ~4 s on one core, ~99% test accuracy
    program = TorchProgram(model)
    calibration = {"input": digits.train_x[:256], "labels": digits.train_y[:256]}
    config = InterLayerConfig(seed=0, bits=(8, 4), trace_max_probes=16, batch_size=256, device="cpu")
    result = compute_sensitivity(program, calibration, config)
    report = validate_predictions(program, calibration, result, num_random=48, max_pairs=64, seed=0)
    again = validate_predictions(program, calibration, result, num_random=48, max_pairs=64, seed=0)
    return report, again


def test_configuration_groups(checked) -> None:
    report, _ = checked
    assert report.group("single").count == 8  # 4 layers x 2 bit widths
    assert report.group("pairs").count == 12  # 6 pairs x 2 bit widths (under the cap)
    assert report.group("random").count == 48
    assert report.group("all").count == len(report.measured) == 68
    single = {
        next(iter(c.items())): m
        for c, m, g in zip(report.configurations, report.measured, report.group_of)
        if g == "single"
    }
    for name in {name for name, _ in single}:
        assert abs(single[(name, 4)]) > abs(single[(name, 8)])  # 4 bits hurt more than 8


def test_interlayer_predictor_ranks_configurations(checked) -> None:
    report, _ = checked
    random = report.group("random")
    # Measured: 0.993 (inter-layer) against 0.82 (diagonal ½Ω) on random whole configurations.
    assert random.spearman_interlayer > 0.95
    assert random.spearman_interlayer > random.spearman_diagonal
    assert report.group("single").spearman_interlayer > 0.9
    assert report.group("pairs").spearman_interlayer > 0.9
    assert random.relative_error_interlayer < 0.5  # measured 0.25
    assert random.relative_error_interlayer < random.relative_error_diagonal


def test_validation_is_seeded(checked) -> None:
    report, again = checked
    assert report == again
    assert all(math.isfinite(x) for x in report.measured)


def test_validation_needs_interlayer_terms() -> None:
    from sensitivity import TraceConfig
    from tests.sensitivity.helpers import tiny_problem

    problem = tiny_problem()
    result = compute_sensitivity(problem.program, problem.calibration, TraceConfig(max_probes=8, device="cpu"))
    with pytest.raises(ValueError, match="InterLayerConfig"):
        validate_predictions(problem.program, problem.calibration, result)
    assert measured_loss_change(problem.loss(), {}) == 0.0
