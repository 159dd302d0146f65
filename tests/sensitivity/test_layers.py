"""Layers' node names and scopes (sensitivity.layers): what reports show beside anonymous weight names."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sensitivity.examples import DigitsMLP, export_onnx
from sensitivity.layers import MAX_SCOPE_LENGTH, find_layers, node_scope, scope_path
from tests.sensitivity.helpers import Encoder


def test_torchscript_exports_name_nodes_by_path_and_the_scope_drops_the_op():
    layers = find_layers(export_onnx(DigitsMLP(), torch.zeros(1, 64)))
    assert [(layer.name, layer.node_name, layer.scope) for layer in layers] == [
        ("fc1.weight", "/fc1/Gemm", "/fc1"),
        ("fc2.weight", "/fc2/Gemm", "/fc2"),
        ("fc3.weight", "/fc3/Gemm", "/fc3"),
    ]


@pytest.mark.slow
def test_dynamo_exports_give_the_same_path_from_their_namespace_metadata():
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder().eval(), (torch.zeros(2, 8),), buffer, dynamo=True, input_names=["x"], verbose=False)
    layers = find_layers(onnx.load_from_string(buffer.getvalue()))
    assert [(layer.name, layer.scope) for layer in layers] == [
        ("blocks.0.fc.weight", "/blocks.0/fc"),
        ("blocks.1.fc.weight", "/blocks.1/fc"),
        ("head.weight", "/head"),
    ]
    assert all(layer.node_name and "/" not in layer.node_name for layer in layers)  # node_linear, ...: no path


def node(name: str, **metadata: str) -> onnx.NodeProto:
    made = helper.make_node("MatMul", ["x", "w"], ["y"], name=name)
    for key, value in metadata.items():
        made.metadata_props.add(key=key, value=value)
    return made


@pytest.mark.parametrize(
    ("made", "scope"),
    [
        (node("/encoder/layer.0/attention/self/query/MatMul"), "/encoder/layer.0/attention/self/query"),
        (node("/MatMul"), ""),  # a top-level op has no module
        (node("MatMul_3"), ""),
        (node("model/dense/MatMul"), "model/dense"),  # tf2onnx writes paths without the leading slash
        (
            node("node_linear", namespace=": M/enc.0: Block/enc.0.fc: torch.nn.Linear/linear: aten.linear.default"),
            "/enc.0/fc",
        ),
        (node("node_linear", namespace=": M/linear: aten.linear.default"), ""),
        (node("/a/b/MatMul", namespace="x" * (MAX_SCOPE_LENGTH + 1)), "/a/b"),  # too long to read: the name's path
    ],
)
def test_node_scope(made: onnx.NodeProto, scope: str):
    assert node_scope(made) == scope


def test_scope_path_writes_each_module_by_its_name_in_its_parent():
    assert scope_path(["", "encoder", "encoder.layer.0", "encoder.layer.0.attention"]) == "/encoder/layer.0/attention"
    assert scope_path([]) == scope_path([""]) == ""
    assert scope_path(["a", "unrelated.b"]) == "/a/unrelated.b"


def test_an_unnamed_node_gets_the_fallback_name_and_no_scope():
    weight = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight],
    )
    (layer,) = find_layers(helper.make_model(graph))
    assert (layer.node_name, layer.scope) == ("MatMul_0", "")
