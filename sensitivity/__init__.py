"""Hessian sensitivity of quantizable layers: traces (HAWQ-V2), eigenvalues (HAWQ-V1), G.

The one verb is ``compute_sensitivity(program, calibration, config)``; the configuration's
type picks the analysis. See docs/sensitivity.md.
"""

from sensitivity.interlayer import diagonal_loss_change, omega, predicted_loss_change
from sensitivity.program import Program
from sensitivity.results import (
    EigenConfig,
    InterLayerConfig,
    InterLayerTerms,
    LayerEigen,
    LayerInfo,
    LayerTrace,
    SensitivityResult,
    TraceConfig,
    config_from_dict,
)
from sensitivity.run import compute_sensitivity, register_handler
from sensitivity.torch_program import TorchProgram, load_exported
from sensitivity.validate import ValidationReport, validate_predictions

__all__ = [
    "EigenConfig",
    "InterLayerConfig",
    "InterLayerTerms",
    "LayerEigen",
    "LayerInfo",
    "LayerTrace",
    "Program",
    "SensitivityResult",
    "TorchProgram",
    "TraceConfig",
    "ValidationReport",
    "compute_sensitivity",
    "config_from_dict",
    "diagonal_loss_change",
    "load_exported",
    "omega",
    "predicted_loss_change",
    "register_handler",
    "validate_predictions",
]
