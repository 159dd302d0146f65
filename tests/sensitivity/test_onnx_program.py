"""Whole-model behaviour of the ONNX interpreter: parity with onnxruntime and with the torch
module it was exported from, gradients (first and second order, autograd and torch.func),
layer naming, error reporting and graph handling."""

from __future__ import annotations

import functools
import random
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sensitivity import zoo
from sensitivity.examples import export_onnx
from sensitivity.layers import find_layers
from sensitivity.onnx_program import UnsupportedOpsError, check_supported, load_onnx
from sensitivity.program import Program
from tests.sensitivity.helpers import RTOL, gradient_matches_module, module_counterparts, output_loss, relative_error

OPSETS = (11, 13, 17)
MODELS = tuple(zoo.ZOO)


@functools.cache
def exported(name: str, opset: int, dynamo: bool = False) -> tuple[nn.Module, onnx.ModelProto]:
    """A zoo model and its export (cached: exporting dominates this module's run time)."""
    model = zoo.build(name)
    example = torch.randn(*zoo.ZOO[name].input_shape, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name.startswith("digits") and not dynamo:  # the project's own export path
            proto = export_onnx(model, example, opset=opset, output_name="output")
        else:
            proto = zoo.export(model, example, opset=opset, dynamo=dynamo)
    return model, proto


def random_input(name: str, batch: int, seed: int = 2) -> torch.Tensor:
    shape = (batch, *zoo.ZOO[name].input_shape[1:])
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run_onnxruntime(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


# --- parity ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_matches_onnxruntime_and_torch(name: str, opset: int) -> None:
    module, proto = exported(name, opset)
    program = load_onnx(proto)
    for batch in (3, 1):  # the export example had batch 2: the batch axis must stay dynamic
        x = random_input(name, batch)
        (output,) = program.forward(program.layer_weights, {"input": x})
        assert relative_error(output, run_onnxruntime(proto, x)) <= RTOL
        with torch.no_grad():
            assert relative_error(output, module(x)) <= RTOL


@pytest.mark.slow
def test_dynamo_export_matches_onnxruntime() -> None:
    """One torch.export-based (dynamo) export: opset 18, different naming and op patterns."""
    module, proto = exported("mobile_unet", 18, dynamo=True)
    program = load_onnx(proto)
    x = random_input("mobile_unet", 3)
    (output,) = program.forward(program.layer_weights, {"input": x})
    assert relative_error(output, run_onnxruntime(proto, x)) <= RTOL
    gradient_matches_module(module, program, x)


# --- layers and weights ---------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_layers_are_find_layers_and_weights_are_the_initializers(name: str) -> None:
    _, proto = exported(name, 13)
    program = load_onnx(proto)
    expected = find_layers(proto)
    assert list(program.layers) == expected
    assert list(program.layer_weights) == [layer.name for layer in expected]
    initializers = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for layer_name, weight in program.layer_weights.items():
        assert weight.dtype == torch.float32 and not weight.requires_grad
        np.testing.assert_array_equal(weight.numpy(), initializers[layer_name])
    assert isinstance(program, Program)


def test_forward_uses_the_given_weights() -> None:
    module, proto = exported("digits_mlp", 13)
    program = load_onnx(proto)
    x = random_input("digits_mlp", 4)
    weights = dict(program.layer_weights)
    weights["fc3.weight"] = torch.zeros_like(weights["fc3.weight"])
    (output,) = program.forward(weights, {"input": x})
    fc3 = module.get_submodule("fc3")
    assert isinstance(fc3, nn.Linear)
    torch.testing.assert_close(output, fc3.bias.detach().expand(4, -1))


def test_forward_rejects_wrong_weights_and_inputs() -> None:
    _, proto = exported("digits_mlp", 13)
    program = load_onnx(proto)
    x = {"input": random_input("digits_mlp", 2)}
    weights = dict(program.layer_weights)
    del weights["fc2.weight"]
    with pytest.raises(ValueError, match=r"fc2\.weight"):
        program.forward(weights, x)
    with pytest.raises(ValueError, match="expected"):
        program.forward({**program.layer_weights, "fc1.weight": torch.zeros(3, 3)}, x)
    with pytest.raises(ValueError, match="inputs"):
        program.forward(program.layer_weights, {"image": x["input"]})


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "transformer_block", "mobile_unet"])
@pytest.mark.parametrize("opset", [11, 17])
def test_gradients_match_the_torch_module(name: str, opset: int) -> None:
    module, proto = exported(name, opset)
    program = load_onnx(proto)
    assert len(module_counterparts(module, program)) == len(program.layers)
    assert gradient_matches_module(module, program, random_input(name, 3)) <= RTOL


@pytest.mark.slow
def test_gradients_of_unfolded_layers_match_with_batchnorm_folding() -> None:
    module, proto = exported("digits_cnn", 13)
    program = load_onnx(proto)
    assert sorted(module_counterparts(module, program)) == ["fc1.weight", "fc2.weight"]
    assert gradient_matches_module(module, program, random_input("digits_cnn", 3)) <= RTOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["transformer_block", "mobile_unet", "digits_cnn"])
def test_forward_over_reverse_matches_double_backward(name: str) -> None:
    _, proto = exported(name, 13)
    program = load_onnx(proto)
    x = random_input(name, 2)

    def loss(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return output_loss(program.forward(weights, {"input": x})[0])

    weights = dict(program.layer_weights)
    tangents = {name: torch.randn_like(w) for name, w in weights.items()}
    gradient, hvp = torch.func.jvp(torch.func.grad(loss), (weights,), (tangents,))[:2]  # a triple only with has_aux

    leaves = {name: w.clone().requires_grad_() for name, w in weights.items()}
    first = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    dot = torch.stack([(g * tangents[name]).sum() for name, g in zip(leaves, first)]).sum()
    second = torch.autograd.grad(dot, list(leaves.values()))
    for (layer_name, g), g_auto, h_auto in zip(gradient.items(), first, second):
        assert relative_error(g, g_auto) <= RTOL
        assert relative_error(hvp[layer_name], h_auto) <= RTOL


# --- unsupported models ---------------------------------------------------------------------


def _model(
    nodes: list[onnx.NodeProto], opset: int = 13, functions: Sequence[onnx.FunctionProto] = ()
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], [onnx.ValueInfoProto(name="y")]
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def test_unsupported_ops_are_all_named_with_a_node() -> None:
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["b"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="fine"),
        helper.make_node("NonMaxSuppression", ["a"], ["b"], name="nms_1"),
        helper.make_node("NonMaxSuppression", ["b"], ["c"], name="nms_2"),
        helper.make_node("FusedGemm", ["c"], ["d"], name="fused", domain="com.microsoft"),
        helper.make_node("Loop", ["", "d"], ["e"], name="branchy", body=branch),
        helper.make_node(
            "Resize", ["e", "", "s"], ["y"], name="crop", coordinate_transformation_mode="tf_crop_and_resize"
        ),
    ]
    model = _model(nodes)
    with pytest.raises(UnsupportedOpsError) as raised:
        check_supported(model)
    message = str(raised.value)
    for expected in (
        "NonMaxSuppression (node 'nms_1')",
        "com.microsoft::FusedGemm (node 'fused')",
        "Loop (node 'branchy'",
        "subgraph",
        "node 'crop'",
        "4 unsupported",
        "Resize with coordinate_transformation_mode='tf_crop_and_resize'",
    ):
        assert expected in message
    assert "nms_2" not in message and "Relu" not in message
    with pytest.raises(UnsupportedOpsError):
        load_onnx(model)


def test_an_older_opset_is_upgraded_and_a_newer_one_rejected() -> None:
    """Normalisation upgrades opset 10 to the interpreter's floor (11); nothing downgrades 22."""
    program = load_onnx(_model([helper.make_node("Relu", ["x"], ["y"])], opset=10))
    assert program.normalization is not None
    assert (program.normalization.source_opset, program.opset) == (10, 11)
    with pytest.raises(UnsupportedOpsError, match="opset 22"):
        load_onnx(_model([helper.make_node("Relu", ["x"], ["y"])], opset=22))


def test_dangling_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="missing_tensor"):
        load_onnx(_model([helper.make_node("Add", ["x", "missing_tensor"], ["y"], name="add")]))


# --- graph handling -------------------------------------------------------------------------


def test_local_functions_are_inlined() -> None:
    function = helper.make_function(
        "local",
        "Swish",
        ["t"],
        ["u"],
        [helper.make_node("Sigmoid", ["t"], ["s"]), helper.make_node("Mul", ["t", "s"], ["u"])],
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model = _model([helper.make_node("Swish", ["x"], ["y"], domain="local")], functions=[function])
    before = model.SerializeToString()
    program = load_onnx(model)
    x = torch.randn(2, 3)
    (output,) = program.forward({}, {"x": x})
    torch.testing.assert_close(output, x * torch.sigmoid(x))
    assert model.SerializeToString() == before


def test_unsorted_graph_is_sorted_and_the_proto_is_not_mutated() -> None:
    _, proto = exported("transformer_block", 13)
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(proto)
    nodes = list(shuffled.graph.node)
    random.Random(0).shuffle(nodes)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(nodes)
    before = shuffled.SerializeToString()

    x = random_input("transformer_block", 2)
    sorted_program, shuffled_program = load_onnx(proto), load_onnx(shuffled)
    expected = sorted_program.forward(sorted_program.layer_weights, {"input": x})[0]
    actual = shuffled_program.forward(shuffled_program.layer_weights, {"input": x})[0]
    torch.testing.assert_close(actual, expected)
    assert shuffled.SerializeToString() == before


def test_load_from_path(tmp_path) -> None:
    _, proto = exported("digits_mlp", 17)
    path = tmp_path / "mlp.onnx"
    onnx.save(proto, path)
    program = load_onnx(path)
    x = random_input("digits_mlp", 2)
    assert relative_error(program.forward(program.layer_weights, {"input": x})[0], run_onnxruntime(proto, x)) <= RTOL
    with pytest.raises(ValueError, match="no ONNX file"):
        load_onnx(tmp_path / "missing.onnx")
    external = tmp_path / "external.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # saving with external data rewrites the proto it is given
    onnx.save(copy, external, save_as_external_data=True, location="weights.bin", size_threshold=0)
    program = load_onnx(external)  # onnx.load reads the weights file next to the model
    assert relative_error(program.forward(program.layer_weights, {"input": x})[0], run_onnxruntime(proto, x)) <= RTOL
    with pytest.raises(ValueError, match="external file"):  # a bare proto never opens paths
        load_onnx(onnx.load(external, load_external_data=False))
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        load_onnx(tmp_path / "junk.onnx")


def test_intermediate_tensors_are_released_after_their_last_use() -> None:
    """Reference counting: a chain of n nodes never holds more than one intermediate."""
    nodes = [helper.make_node("Relu" if i % 2 else "Neg", [f"t{i}" if i else "x"], [f"t{i + 1}"]) for i in range(9)]
    nodes.append(helper.make_node("Identity", ["t9"], ["y"]))
    plan = load_onnx(_model(nodes))._graph.full
    for step, release in zip(plan.steps[:-1], plan.releases):
        assert list(release) == list(step.inputs)  # the environment's reference only
    assert plan.releases[-1] == ("t9",)  # the graph output "y" is kept


def test_constants_are_folded_at_load() -> None:
    """Shape arithmetic on constants runs once at load; per call only the data path runs."""
    _, proto = exported("mobile_unet", 13)
    program = load_onnx(proto)
    assert len(program._graph.full.steps) < len(proto.graph.node)
    assert {step.node.op_type for step in program._graph.full.steps}.isdisjoint({"Constant"})


def test_shape_values_are_cached_per_input_shape() -> None:
    """Shape -> Gather -> Concat -> Reshape chains run once per input shape, then are skipped."""
    _, proto = exported("transformer_block", 11)
    program = load_onnx(proto, shape_cache_size=2)
    assert program.num_steps <= 0.6 * len(program._graph.full.steps)
    outputs = {}
    for batch in (3, 1, 3, 2, 1):  # misses, a hit, then eviction of the oldest signature
        x = random_input("transformer_block", batch)
        outputs[batch] = program.forward(program.layer_weights, {"input": x})[0]
        assert relative_error(outputs[batch], run_onnxruntime(proto, x)) <= RTOL
    assert len(program._shape_cache) == 2
    uncached = load_onnx(proto, shape_cache_size=0)
    x = random_input("transformer_block", 1)
    torch.testing.assert_close(uncached.forward(uncached.layer_weights, {"input": x})[0], outputs[1])


@pytest.mark.slow
def test_shape_cache_filled_inside_a_transform_is_reused_outside() -> None:
    """Values recorded during torch.func calls must not carry the transform's wrappers."""
    _, proto = exported("transformer_block", 13)
    program = load_onnx(proto)
    x = random_input("transformer_block", 2)
    weights = dict(program.layer_weights)

    def loss(w: dict[str, torch.Tensor]) -> torch.Tensor:
        return output_loss(program.forward(w, {"input": x})[0])

    gradient = torch.func.grad(loss)(weights)  # records the shape values inside the transform
    assert len(program._shape_cache) == 1
    torch.func.jvp(torch.func.grad(loss), (weights,), (gradient,))  # reads them inside another transform
    leaves = {name: w.clone().requires_grad_() for name, w in weights.items()}
    autograd = torch.autograd.grad(loss(leaves), list(leaves.values()))
    for g, g_auto in zip(gradient.values(), autograd):
        assert relative_error(g, g_auto) <= RTOL
    fresh = load_onnx(proto)
    (expected,) = fresh.forward(weights, {"input": x})
    torch.testing.assert_close(program.forward(weights, {"input": x})[0], expected)


def test_shape_arguments_stay_on_the_host() -> None:
    """Reshape targets and axes are read with .tolist(): they never move to an accelerator."""
    _, proto = exported("transformer_block", 11)
    program = load_onnx(proto)
    host = program._graph.host
    reshape_targets = {step.inputs[1] for step in program._graph.full.steps if step.node.op_type == "Reshape"}
    assert reshape_targets and reshape_targets <= host
    assert program._graph.data is not None
    read_as_data = {
        name
        for step in program._graph.data.steps
        for name in step.inputs
        if step.node.op_type not in ("Reshape", "Unsqueeze", "ReduceMean")
    }
    assert host.isdisjoint(read_as_data)


def test_data_dependent_shapes_disable_the_shape_cache() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["n"], to=TensorProto.INT64),
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),  # length depends on values of x
        helper.make_node("Shape", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [onnx.ValueInfoProto(name="y")],
        [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one")],
    )
    program = load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert program._graph.data is None
    for top in (2.0, 5.0):
        (length,) = program.forward({}, {"x": torch.tensor([0.0, top, 1.0])})
        assert length.tolist() == [int(top)]


def test_to_returns_a_copy_on_the_device() -> None:
    _, proto = exported("digits_cnn", 13)
    program = load_onnx(proto)
    moved = program.to(torch.device("cpu"))
    assert moved is not program and list(moved.layers) == list(program.layers)
    x = random_input("digits_cnn", 2)
    torch.testing.assert_close(
        moved.forward(moved.layer_weights, {"input": x})[0], program.forward(program.layer_weights, {"input": x})[0]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    for name in MODELS:
        _, proto = exported(name, 13)
        program = load_onnx(proto)
        cuda = program.to(torch.device("cuda"))
        x = random_input(name, 3)
        expected = program.forward(program.layer_weights, {"input": x})[0]
        actual = cuda.forward(cuda.layer_weights, {"input": x.cuda()})[0]
        assert actual.device.type == "cuda"
        assert relative_error(actual.cpu(), expected) <= RTOL


def test_inlining_is_counted_before_it_is_done():
    """Functions calling functions twice per level: 2**(depth+1) - 1 nodes once inlined. Depth 22
    took the inspector past 3 GiB; it is now refused from the count, in milliseconds."""
    import time

    from sensitivity.onnx_program import check_supported, inlined_node_count
    from tests.payloads import inlining_bomb_model

    assert inlined_node_count(inlining_bomb_model(3)) == 15
    check_supported(inlining_bomb_model(3))  # small enough: inlined and checked
    started = time.monotonic()
    with pytest.raises(ValueError, match="functions calling functions too deeply"):
        check_supported(inlining_bomb_model(40))
    assert time.monotonic() - started < 5
