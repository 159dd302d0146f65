"""Hessian sensitivity of quantizable layers: traces (HAWQ-V2), eigenvalues (HAWQ-V1), G.

The one verb is ``compute_sensitivity(program, calibration, config)``; the configuration's
type picks the analysis. See docs/sensitivity.md.

The names below are imported on first use (PEP 562), so that importing a torch-free submodule
(``sensitivity.pt2_archive.check_archive``, ``sensitivity.layers``) does not import torch: the
upload inspector runs in a process that must not.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sensitivity.interlayer import (
        diagonal_loss_change,
        omega,
        predicted_loss_change,
    )
    from sensitivity.normalize import (
        AlreadyQuantizedError,
        NormalizedModel,
        OpsetUpgradeError,
        normalize_model,
    )
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

_EXPORTS = {
    "diagonal_loss_change": "sensitivity.interlayer",
    "omega": "sensitivity.interlayer",
    "predicted_loss_change": "sensitivity.interlayer",
    "AlreadyQuantizedError": "sensitivity.normalize",
    "NormalizedModel": "sensitivity.normalize",
    "OpsetUpgradeError": "sensitivity.normalize",
    "normalize_model": "sensitivity.normalize",
    "Program": "sensitivity.program",
    "EigenConfig": "sensitivity.results",
    "InterLayerConfig": "sensitivity.results",
    "InterLayerTerms": "sensitivity.results",
    "LayerEigen": "sensitivity.results",
    "LayerInfo": "sensitivity.results",
    "LayerTrace": "sensitivity.results",
    "SensitivityResult": "sensitivity.results",
    "TraceConfig": "sensitivity.results",
    "config_from_dict": "sensitivity.results",
    "compute_sensitivity": "sensitivity.run",
    "register_handler": "sensitivity.run",
    "TorchProgram": "sensitivity.torch_program",
    "load_exported": "sensitivity.torch_program",
    "ValidationReport": "sensitivity.validate",
    "validate_predictions": "sensitivity.validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sensitivity' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
