"""The names ``sensitivity`` exports, and that importing the package alone does not import torch
(the API process and the upload inspector import it and must stay torch-free)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sensitivity

PUBLIC_NAMES = [
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
REPOSITORY = Path(__file__).resolve().parents[2]


def test_all_is_pinned() -> None:
    assert sensitivity.__all__ == PUBLIC_NAMES
    assert sorted(sensitivity._EXPORTS) == PUBLIC_NAMES  # the lazy table serves exactly these


def test_every_exported_name_resolves_to_its_module() -> None:
    for name in sensitivity.__all__:
        value = getattr(sensitivity, name)
        defining = sensitivity._EXPORTS[name]
        assert value is getattr(sys.modules[defining], name), name


def test_import_does_not_import_torch() -> None:
    """Run in a fresh interpreter: this one has imported torch long ago."""
    code = "import sensitivity, sys; assert 'torch' not in sys.modules, 'importing sensitivity imported torch'"
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
