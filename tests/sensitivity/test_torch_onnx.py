"""A torch.export program as ONNX (sensitivity/torch_onnx.py): the digits CNN (BatchNorm after each conv)
and the token transformer (Linears on rank-3 activations: MatMuls on transposed copies), each exported
with a dynamic and with a fixed batch, saved as .pt2 and loaded without unpickling."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sensitivity.layers import find_layers
from sensitivity.normalize import normalize_model
from sensitivity.onnx_program import load_onnx
from sensitivity.results import TraceConfig
from sensitivity.run import compute_sensitivity
from sensitivity.torch_onnx import EXPORT_RTOL, TorchExportError, load_exported_onnx, module_sensitivity
from sensitivity.torch_program import load_exported
from sensitivity.zoo import export_tiny_transformer, trained_tiny_transformer
from tests.models import digits_onnx_with_batchnorm, trained_digits_module, trained_digits_onnx
from tests.pt2_archives import save_exported

pytestmark = pytest.mark.slow

FIXED_BATCH = 4


@pytest.fixture(scope="module")
def networks():
    """name -> (module, calibration arrays as the .pt2 names them, the ONNX upload of the same network
    (TorchScript exporter; "cnn-batchnorm": with its BatchNorms left unfolded, as paddle2onnx writes
    them) and its calibration arrays)."""
    digits_model, digits = trained_digits_module()
    digits_onnx, _, _ = trained_digits_onnx()
    transformer, task = trained_tiny_transformer()
    return {
        "cnn": (
            digits_model,
            {"x": digits.train_x[:128], "labels": digits.train_y[:128]},
            digits_onnx,
            {"input": digits.train_x[:128], "labels": digits.train_y[:128]},
        ),
        "cnn-batchnorm": (
            digits_model,
            {"x": digits.train_x[:128], "labels": digits.train_y[:128]},
            digits_onnx_with_batchnorm(),
            {"input": digits.train_x[:128], "labels": digits.train_y[:128]},
        ),
        "transformer": (
            transformer,
            {"ids": task.train_x[:128], "labels": task.train_y[:128]},
            export_tiny_transformer(transformer),
            {"input": task.train_x[:128], "labels": task.train_y[:128]},
        ),
    }


@pytest.fixture(scope="module", params=[("cnn", True), ("cnn", False), ("transformer", True), ("transformer", False)])
def case(request, networks, tmp_path_factory):
    name, dynamic = request.param
    module, calibration, _, _ = networks[name]
    first = next(iter(calibration.values()))
    path = tmp_path_factory.mktemp("pt2") / f"{name}.pt2"
    save_exported(module, (torch.from_numpy(first[:FIXED_BATCH]),), path, dynamic=dynamic)
    return name, dynamic, module, path, calibration


def _module_outputs(module: torch.nn.Module, array: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(array)).numpy()


def test_the_export_names_every_layer_by_its_parameter_and_computes_the_program(case):
    name, dynamic, module, path, calibration = case
    export = load_exported_onnx(path, calibration)
    torch_layers = [layer.name for layer in load_exported(path).layers]
    assert [layer.name for layer in find_layers(export.model)] == torch_layers  # one to one, in graph order
    assert export.unmatched == ()
    if name == "transformer":  # the Linears on [batch, tokens, dim] were anonymous transposed copies
        assert set(export.renamed.values()) == {
            f"block.{layer}.weight" for layer in ("query", "key", "value", "proj", "fc1", "fc2")
        }
    assert export.check is not None and export.check.max_relative_difference <= EXPORT_RTOL
    assert export.check.samples == (8 if dynamic else FIXED_BATCH)
    [graph_input] = export.model.graph.input
    batch_dim = graph_input.type.tensor_type.shape.dim[0]
    assert batch_dim.HasField("dim_param") == dynamic
    assert dynamic or batch_dim.dim_value == FIXED_BATCH
    # the export runs like the module on other samples (any count when the batch is dynamic)
    array = next(iter(calibration.values()))[20 : 20 + (13 if dynamic else FIXED_BATCH)]
    session = ort.InferenceSession(export.model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = _module_outputs(module, array)
    [actual] = session.run(None, {graph_input.name: array})
    assert np.max(np.abs(actual - expected)) <= EXPORT_RTOL * np.max(np.abs(expected))


def test_batchnorm_is_folded_into_the_conv_before_it(networks, tmp_path):
    module, calibration, upload, _ = networks["cnn"]
    path = save_exported(module, (torch.from_numpy(calibration["x"][:4]),), tmp_path / "cnn.pt2", dynamic=True)
    model = load_exported_onnx(path).model
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}
    folded = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}["conv1.weight"]
    bn = module.bn1
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    expected = module.conv1.weight.detach().numpy() * scale[:, None, None, None]
    np.testing.assert_allclose(folded, expected, rtol=1e-6, atol=1e-7)
    # the TorchScript export of the same network folds it the same way
    uploaded = {init.name: onnx.numpy_helper.to_array(init) for init in upload.graph.initializer}["conv1.weight"]
    np.testing.assert_allclose(folded, uploaded, rtol=1e-5, atol=1e-7)


def _traces(model: onnx.ModelProto, calibration: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    program = load_onnx(normalize_model(model, samples=calibration))
    config = TraceConfig(max_probes=48, min_probes=48, seed=0, device="cpu", memory_budget_mb=None)
    result = compute_sensitivity(program, calibration, config)
    assert result.traces is not None
    return {t.name: (t.average_trace, t.average_trace_standard_error) for t in result.traces}


@pytest.mark.parametrize("name", ["cnn", "cnn-batchnorm", "transformer"])
def test_a_pt2_and_the_onnx_upload_of_the_same_network_agree_within_standard_errors(name, networks, tmp_path):
    """cnn-batchnorm: the upload's BNs are folded by normalisation, as the .pt2's by torch's exporter."""
    module, calibration, upload, upload_calibration = networks[name]
    first = next(iter(calibration.values()))
    path = save_exported(module, (torch.from_numpy(first[:4]),), tmp_path / f"{name}.pt2", dynamic=True)
    from_pt2 = _traces(load_exported_onnx(path, calibration).model, calibration)
    from_onnx = _traces(upload, upload_calibration)
    assert list(from_pt2) == list(from_onnx)  # the same layer names, in the same order
    for layer, (trace, error) in from_pt2.items():
        other, other_error = from_onnx[layer]
        assert abs(trace - other) <= 2 * math.hypot(error, other_error) + 1e-9, layer


def test_an_export_that_computes_other_outputs_is_refused(case):
    _name, _dynamic, _module, path, calibration = case
    export = load_exported_onnx(path)
    weight = next(init for init in export.model.graph.initializer if init.name == find_layers(export.model)[-1].name)
    weight.CopyFrom(onnx.numpy_helper.from_array(1.5 * onnx.numpy_helper.to_array(weight), weight.name))
    with pytest.raises(TorchExportError, match="computes different outputs"):
        export.verified(calibration)


def test_samples_the_program_does_not_take_are_named(case):
    _name, _dynamic, _module, path, calibration = case
    [key] = [key for key in calibration if key != "labels"]
    wrong = {key: np.zeros((8, 3), calibration[key].dtype)}
    with pytest.raises(TorchExportError, match="does not run on the given samples"):
        load_exported_onnx(path, wrong)


def test_module_sensitivity_is_the_sensitivity_of_the_module_saved_as_pt2(networks, tmp_path):
    """The Python API for a module in hand computes what ``mpq sensitivity model.pt2`` computes: the same
    layers and traces (the same ONNX export, analysed alike)."""
    module, calibration, _, _ = networks["transformer"]
    example = (torch.from_numpy(calibration["ids"][:4]),)
    config = TraceConfig(max_probes=16, min_probes=16, seed=0, device="cpu", memory_budget_mb=None)
    result = module_sensitivity(module, example, calibration, config)
    assert result.traces is not None
    path = save_exported(module, example, tmp_path / "transformer.pt2", dynamic=True)
    program = load_onnx(normalize_model(load_exported_onnx(path, calibration).model, samples=calibration))
    expected = compute_sensitivity(program, calibration, config)
    assert expected.traces is not None
    assert [t.name for t in result.traces] == [t.name for t in expected.traces]
    for ours, theirs in zip(result.traces, expected.traces, strict=True):
        assert ours.trace == pytest.approx(theirs.trace, rel=1e-5, abs=1e-9)


def test_a_module_torch_cannot_export_is_a_clear_error():
    from sensitivity.torch_onnx import export_module

    class Branching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if float(x.sum()) > 0 else -self.fc(x)  # control flow on values

    with pytest.raises(TorchExportError, match=r"torch\.export\.export could not export the module"):
        export_module(Branching(), (torch.ones(2, 4),))
