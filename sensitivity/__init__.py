"""Hessian sensitivity of quantizable layers: traces (HAWQ-V2), eigenvalues (HAWQ-V1), G,
the empirical Fisher.

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
    from sensitivity.layers import Layer, find_layers
    from sensitivity.normalize import (
        AlreadyQuantizedError,
        NormalizedModel,
        OpsetUpgradeError,
        normalize_model,
        refuse_quantized,
    )
    from sensitivity.onnx_program import UnsupportedOpsError, check_supported, load_onnx, read_onnx
    from sensitivity.outputs import detect_kind
    from sensitivity.program import Program
    from sensitivity.pt2_archive import check_archive
    from sensitivity.quantize import QuantizedWeight, quantize_weight
    from sensitivity.results import (
        EigenConfig,
        FisherConfig,
        FisherTerms,
        InterLayerConfig,
        InterLayerTerms,
        LayerEigen,
        LayerInfo,
        LayerTrace,
        MeasuredConfig,
        MeasuredTerms,
        SensitivityResult,
        TraceConfig,
        config_from_dict,
    )
    from sensitivity.run import compute_sensitivity, register_handler
    from sensitivity.samples import SampleAxes, check_sample_axes, input_sample_axes
    from sensitivity.torch_onnx import (
        OnnxExport,
        TorchExportError,
        export_module,
        export_onnx,
        load_exported_onnx,
        module_sensitivity,
    )
    from sensitivity.torch_program import TorchProgram, load_exported
    from sensitivity.validate import ValidationReport, validate_predictions

# public name -> the submodule that defines it (imported on first use)
_EXPORTS = {
    "diagonal_loss_change": "sensitivity.interlayer",
    "omega": "sensitivity.interlayer",
    "predicted_loss_change": "sensitivity.interlayer",
    "Layer": "sensitivity.layers",
    "find_layers": "sensitivity.layers",
    "AlreadyQuantizedError": "sensitivity.normalize",
    "NormalizedModel": "sensitivity.normalize",
    "OpsetUpgradeError": "sensitivity.normalize",
    "normalize_model": "sensitivity.normalize",
    "refuse_quantized": "sensitivity.normalize",
    "UnsupportedOpsError": "sensitivity.onnx_program",
    "check_supported": "sensitivity.onnx_program",
    "load_onnx": "sensitivity.onnx_program",
    "read_onnx": "sensitivity.onnx_program",
    "detect_kind": "sensitivity.outputs",
    "Program": "sensitivity.program",
    "check_archive": "sensitivity.pt2_archive",
    "QuantizedWeight": "sensitivity.quantize",
    "quantize_weight": "sensitivity.quantize",
    "EigenConfig": "sensitivity.results",
    "FisherConfig": "sensitivity.results",
    "FisherTerms": "sensitivity.results",
    "InterLayerConfig": "sensitivity.results",
    "InterLayerTerms": "sensitivity.results",
    "MeasuredConfig": "sensitivity.results",
    "MeasuredTerms": "sensitivity.results",
    "LayerEigen": "sensitivity.results",
    "LayerInfo": "sensitivity.results",
    "LayerTrace": "sensitivity.results",
    "SensitivityResult": "sensitivity.results",
    "TraceConfig": "sensitivity.results",
    "config_from_dict": "sensitivity.results",
    "compute_sensitivity": "sensitivity.run",
    "register_handler": "sensitivity.run",
    "SampleAxes": "sensitivity.samples",
    "check_sample_axes": "sensitivity.samples",
    "input_sample_axes": "sensitivity.samples",
    "TorchProgram": "sensitivity.torch_program",
    "load_exported": "sensitivity.torch_program",
    "OnnxExport": "sensitivity.torch_onnx",
    "TorchExportError": "sensitivity.torch_onnx",
    "export_module": "sensitivity.torch_onnx",
    "export_onnx": "sensitivity.torch_onnx",
    "load_exported_onnx": "sensitivity.torch_onnx",
    "module_sensitivity": "sensitivity.torch_onnx",
    "ValidationReport": "sensitivity.validate",
    "validate_predictions": "sensitivity.validate",
}

# A literal list, so that tools read it without running the module; it names the keys of
# _EXPORTS (tests/sensitivity/test_public_api.py checks both).
__all__ = [
    "AlreadyQuantizedError",
    "EigenConfig",
    "FisherConfig",
    "FisherTerms",
    "InterLayerConfig",
    "InterLayerTerms",
    "Layer",
    "LayerEigen",
    "LayerInfo",
    "LayerTrace",
    "MeasuredConfig",
    "MeasuredTerms",
    "NormalizedModel",
    "OnnxExport",
    "OpsetUpgradeError",
    "Program",
    "QuantizedWeight",
    "SampleAxes",
    "SensitivityResult",
    "TorchExportError",
    "TorchProgram",
    "TraceConfig",
    "UnsupportedOpsError",
    "ValidationReport",
    "check_archive",
    "check_sample_axes",
    "check_supported",
    "compute_sensitivity",
    "config_from_dict",
    "detect_kind",
    "diagonal_loss_change",
    "export_module",
    "export_onnx",
    "find_layers",
    "input_sample_axes",
    "load_exported",
    "load_exported_onnx",
    "load_onnx",
    "module_sensitivity",
    "normalize_model",
    "omega",
    "predicted_loss_change",
    "quantize_weight",
    "read_onnx",
    "refuse_quantized",
    "register_handler",
    "validate_predictions",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sensitivity' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
