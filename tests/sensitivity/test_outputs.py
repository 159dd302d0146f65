"""Output kinds: the rules on values and graphs (ONNX, and the FX graphs of torch.export archives)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sensitivity.outputs import (
    detect_kind,
    fx_producers,
    output_kind,
    producing_op,
    program_output_kind,
)
from sensitivity.torch_program import TorchProgram


def _softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_value_rules_without_a_graph() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 6))
    cases = {
        "logits": (logits, ("class_scores", "logits")),
        "probabilities": (_softmax_np(logits), ("class_scores", "probabilities")),
        "log-probabilities": (np.log(_softmax_np(logits)), ("class_scores", "log_probabilities")),
        "probability steps": (_softmax_np(rng.standard_normal((8, 4, 6))), ("sequence", "probabilities")),
        "unit rows": (logits / np.linalg.norm(logits, axis=1, keepdims=True), ("embeddings", "")),
        "one per sample": (rng.standard_normal((8, 1)), ("dense", "")),
        "rank 3 logits, no graph": (rng.standard_normal((8, 4, 6)), ("dense", "")),  # no head op seen
        "rank 4": (rng.standard_normal((8, 2, 4, 6)), ("dense", "")),
        # in [0, 1] without summing to 1 (sigmoid scores): values alone cannot tell them from logits
        "independent probabilities": (1 / (1 + np.exp(-logits)), ("class_scores", "logits")),
    }
    for name, (values, expected) in cases.items():
        found = output_kind(values.astype(np.float32))
        assert (found.kind, found.form) == expected, (name, found.reason)
    # a confident softmax has near-unit L2 rows: the probability rule comes first
    confident = np.full((8, 6), 1e-5) + (1 - 6e-5) * np.eye(6)[np.arange(8) % 6]  # rows sum to 1
    assert np.allclose(np.linalg.norm(confident, axis=1), 1, atol=1e-3)
    assert output_kind(confident).form == "probabilities"


def _graph(nodes, output_shape, initializers=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], list(initializers)))


def test_onnx_rules_read_the_producing_op_through_reshapes() -> None:
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((8, 6))  # the values say logits; the graph says otherwise
    for op, form in [
        ("Softmax", "probabilities"),
        ("LogSoftmax", "log_probabilities"),
        ("Sigmoid", "binary_probabilities"),
    ]:
        model = _graph(
            [
                helper.make_node(op, ["x"], ["s"]),
                helper.make_node("Identity", ["s"], ["c"]),
                helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT),
            ],
            [8, 6],
        )
        assert producing_op(model, "y") == op
        kind, reason = detect_kind(model, scores)
        assert kind == "class_scores" and reason.startswith(f"the first output is rank 2 from {op}")
        found = output_kind(scores, *_producers_and_name(model))
        assert found.form == form
        steps = output_kind(rng.standard_normal((8, 4, 6)), *_producers_and_name(model))
        assert (steps.kind, steps.form) == ("sequence", form)
    eps = numpy_helper.from_array(np.array(1e-12, np.float32), "eps")
    normalised = _graph(
        [
            helper.make_node("ReduceL2", ["x"], ["n"], keepdims=1),
            helper.make_node("Clip", ["n", "eps"], ["c"]),
            helper.make_node("Div", ["x", "c"], ["y"]),
        ],
        [8, 6],
        [eps],
    )
    assert detect_kind(normalised, scores)[0] == "embeddings"
    head = _graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [8, 4, 6],
        [numpy_helper.from_array(np.ones((6, 6), np.float32), "w")],
    )
    assert output_kind(rng.standard_normal((8, 4, 6)), *_producers_and_name(head)).kind == "sequence"


def _producers_and_name(model):
    from sensitivity.outputs import onnx_producers

    return onnx_producers(model), model.graph.output[0].name


class Ends(nn.Module):
    def __init__(self, end) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 12)
        self.end = end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.end(self.fc(x).reshape(x.shape[0], 2, 6))


@pytest.mark.parametrize(
    ("end", "plain", "exported"),
    [
        (torch.sigmoid, ("dense", ""), ("sequence", "binary_probabilities")),  # values in [0, 1]: not a distribution
        (lambda y: y, ("dense", ""), ("sequence", "logits")),  # rank 3 from a linear head
        (lambda y: F.softmax(y, dim=-1), ("sequence", "probabilities"), ("sequence", "probabilities")),
        (lambda y: F.normalize(y, dim=-1), ("embeddings", ""), ("embeddings", "")),
    ],
)
def test_torch_programs_read_the_fx_graph_of_an_export_and_values_otherwise(end, plain, exported) -> None:
    torch.manual_seed(0)
    module = Ends(end).eval()
    x = torch.randn(8, 6)
    values = module(x).detach().numpy()
    found = program_output_kind(TorchProgram(module), 0, values)
    assert (found.kind, found.form) == plain, found.reason
    archive = torch.export.export(module, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    graph_module = archive.module()
    program = TorchProgram(graph_module, set_eval=False, layers=TorchProgram(module).layers)
    found = program_output_kind(program, 0, values)
    assert (found.kind, found.form) == exported, found.reason
    producers, outputs = fx_producers(graph_module.graph)
    assert len(outputs) == 1 and outputs[0] in producers
