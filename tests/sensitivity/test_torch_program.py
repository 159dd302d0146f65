"""TorchProgram over nn.Modules and torch.export archives."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sensitivity.examples import DigitsCNN
from sensitivity.program import Program
from sensitivity.torch_program import TorchProgram, load_exported

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/sensitivity/conftest.py


class Mixed(nn.Module):
    """Every layer kind, plus a weight shared by two Linear modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(2, 3, 3, padding=1)
        self.up = nn.ConvTranspose1d(3, 4, 2, stride=2)
        self.head = nn.Linear(64, 5)
        self.tied = nn.Linear(64, 5)
        self.tied.weight = self.head.weight
        self.norm = nn.LayerNorm(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(torch.relu(self.conv1d(x))).flatten(1)
        return self.norm(self.head(h) + self.tied(h))


def test_layers_are_named_by_parameter_with_onnx_op_and_channel_axis() -> None:
    program = TorchProgram(Mixed())
    assert isinstance(program, Program)
    summary = [
        (layer.name, layer.op_type, layer.shape, layer.num_params, layer.channel_axis) for layer in program.layers
    ]
    assert summary == [
        ("conv1d.weight", "Conv", (3, 2, 3), 18, 0),
        ("up.weight", "ConvTranspose", (3, 4, 2), 24, 1),
        ("head.weight", "Gemm", (5, 64), 320, 0),
    ]
    assert list(program.layer_weights) == ["conv1d.weight", "up.weight", "head.weight"]
    assert all(not w.requires_grad for w in program.layer_weights.values())


def test_layers_carry_node_names_and_module_scopes() -> None:
    """A module program's node is its module; an exported graph's its FX node, scoped by nn_module_stack."""
    from sensitivity.torch_program import exported_layers
    from tests.sensitivity.helpers import Encoder

    program = TorchProgram(Encoder())
    assert [(layer.name, layer.node_name, layer.scope) for layer in program.layers] == [
        ("blocks.0.fc.weight", "blocks.0.fc", "/blocks.0/fc"),
        ("blocks.1.fc.weight", "blocks.1.fc", "/blocks.1/fc"),
        ("head.weight", "head", "/head"),
    ]  # the ModuleList is no scope: it never runs, as in torch's own paths
    exported = exported_layers(torch.export.export(Encoder().eval(), (torch.zeros(2, 8),)))
    assert [(layer.name, layer.node_name, layer.scope) for layer in exported] == [
        ("blocks.0.fc.weight", "linear", "/blocks.0/fc"),
        ("blocks.1.fc.weight", "linear_1", "/blocks.1/fc"),
        ("head.weight", "linear_2", "/head"),
    ]


def test_forward_swaps_weights_without_mutating_the_module() -> None:
    torch.manual_seed(0)
    module = Mixed().eval()
    program = TorchProgram(module)
    x = torch.randn(4, 2, 8)
    weights = dict(program.layer_weights)
    assert torch.equal(program.forward(weights, {"input": x})[0], module(x))
    zeroed = {**weights, "head.weight": torch.zeros(5, 64)}
    out = program.forward(zeroed, {"input": x})[0]
    assert not torch.allclose(out, module(x))
    assert float(module.head.weight.abs().sum()) > 0  # untouched
    moved = program.to(torch.device("cpu"))
    assert torch.equal(moved.forward(weights, {"input": x})[0], module(x))


def test_gradients_flow_only_to_the_passed_weights() -> None:
    program = TorchProgram(DigitsCNN())
    weights = {n: w.clone().requires_grad_(True) for n, w in program.layer_weights.items()}
    out = program.forward(weights, {"input": torch.randn(2, 1, 8, 8)})[0].square().sum()
    grads = torch.autograd.grad(out, list(weights.values()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_module_without_layers_is_rejected() -> None:
    with pytest.raises(ValueError, match="no quantizable layer"):
        TorchProgram(nn.Sequential(nn.ReLU()))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A digits CNN exported with a dynamic batch, and its output on a batch of ones."""
    path = tmp_path_factory.mktemp("export") / "digits.pt2"
    return path, _export(path)


def _export(path: Path) -> torch.Tensor:
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    example = torch.randn(3, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(exported, str(path))
    return model(torch.ones(5, 1, 8, 8)).detach()


_SUMMARY = """
import json, sys, torch
from sensitivity.torch_program import load_exported
p = load_exported(sys.argv[1])
out = p.forward(dict(p.layer_weights), {p.input_names[0]: torch.ones(5, 1, 8, 8)})[0]
print(json.dumps({"layers": [[layer.name, layer.op_type, layer.channel_axis] for layer in p.layers],
                  "inputs": list(p.input_names), "outputs": list(p.output_names), "y": out.tolist()}))
"""


@pytest.mark.slow
def test_exported_archive_loads_with_stable_names_in_this_and_a_fresh_process(archive) -> None:
    path, expected = archive
    first, second = load_exported(path), load_exported(path)
    names = [layer.name for layer in first.layers]
    assert names == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert names == [layer.name for layer in second.layers]
    assert [layer.op_type for layer in first.layers] == ["Conv", "Conv", "Gemm", "Gemm"]
    # FX node names; no scope: the loader drops node metadata unread (sensitivity.pt2_archive)
    assert all(layer.node_name for layer in first.layers) and {layer.scope for layer in first.layers} == {""}
    x = {first.input_names[0]: torch.ones(5, 1, 8, 8)}
    y1 = first.forward(dict(first.layer_weights), x)[0]
    assert torch.equal(y1, second.forward(dict(second.layer_weights), x)[0])
    assert torch.allclose(y1, expected, atol=1e-6)

    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _SUMMARY, str(path)], capture_output=True, text=True, timeout=120, env=environment
    )
    assert run.returncode == 0, run.stderr
    fresh = json.loads(run.stdout.strip().splitlines()[-1])
    assert [name for name, _, _ in fresh["layers"]] == names
    assert fresh["inputs"] == list(first.input_names) and fresh["outputs"] == list(first.output_names)
    assert np.array_equal(np.array(fresh["y"], dtype=np.float32), y1.detach().numpy())


def test_exported_program_differentiates_and_matches_the_module_program(archive) -> None:
    path, _ = archive
    torch.manual_seed(0)
    module_program = TorchProgram(DigitsCNN())
    exported = load_exported(path)
    x = torch.randn(6, 1, 8, 8)
    weights = {n: w.clone().requires_grad_(True) for n, w in exported.layer_weights.items()}
    out = exported.forward(weights, {exported.input_names[0]: x})[0]
    reference = module_program.forward(weights, {"input": x})[0]
    assert torch.allclose(out, reference, atol=1e-6)
    grad = torch.autograd.grad(out.square().sum(), weights["fc1.weight"])[0]
    assert grad.abs().sum() > 0


def test_embeddings_are_layers_of_modules_and_of_exported_archives(tmp_path) -> None:
    from sensitivity.zoo import TinyTokenTransformer

    torch.manual_seed(0)
    model = TinyTokenTransformer().eval()
    module_layers = {layer.name: layer for layer in TorchProgram(model).layers}
    embedding = module_layers["embedding.weight"]
    assert (embedding.op_type, embedding.channel_axis, embedding.shape) == ("Gather", 0, (16, 16))
    ids = torch.randint(0, 16, (3, 8))
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (ids,), dynamic_shapes={"ids": {0: batch}})
    torch.export.save(exported, str(tmp_path / "tokens.pt2"))
    archive_layers = {layer.name: layer for layer in load_exported(tmp_path / "tokens.pt2").layers}
    # the same layer; only the module program knows its scope (the archive's node metadata is dropped unread)
    assert archive_layers["embedding.weight"] == dataclasses.replace(module_layers["embedding.weight"], scope="")
    assert module_layers["embedding.weight"].scope == "/embedding"
    assert set(archive_layers) >= {"embedding.weight", "head.weight"}
