"""MACs against hand-computed values; sizes against real exported files."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from planner.candidates import CANDIDATES, Configuration
from planner.cost import (
    Cost,
    ShapesUnknown,
    configuration_cost,
    initializer_bytes,
    layer_cost_table,
)
from planner.export import export_model
from sensitivity.examples import DigitsCNN, export_onnx, load_digits
from sensitivity.layers import find_layers
from tests.models import recurrent_model, uninferable_model


def _weight(name, shape):
    return numpy_helper.from_array(np.random.default_rng(0).normal(size=shape).astype(np.float32), name)


def shapes_model() -> onnx.ModelProto:
    """One node of every layer type, with shapes chosen so the MACs can be worked out by hand."""
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),  # [N,4,8,8]
        helper.make_node("Conv", ["c", "grouped.weight"], ["gc"], name="grouped", group=2, strides=[2, 2]),  # [N,4,3,3]
        helper.make_node("ConvTranspose", ["gc", "deconv.weight"], ["dc"], name="deconv"),  # [N,3,4,4]
        helper.make_node("Flatten", ["gc"], ["f"], name="flatten"),  # [N,36]
        helper.make_node("Gemm", ["f", "gemm_t.weight"], ["g1"], name="gemm_t", transB=1),  # [N,10]
        helper.make_node("Gemm", ["f", "gemm.weight"], ["g2"], name="gemm"),  # [N,10]
        helper.make_node("MatMul", ["t", "matmul.weight"], ["m"], name="matmul"),  # [N,5,8]
    ]
    initializers = [
        _weight("conv.weight", (4, 3, 3, 3)),
        _weight("grouped.weight", (4, 2, 3, 3)),
        _weight("deconv.weight", (4, 3, 2, 2)),
        _weight("gemm_t.weight", (10, 36)),
        _weight("gemm.weight", (36, 10)),
        _weight("matmul.weight", (16, 8)),
        numpy_helper.from_array(np.zeros(7, dtype=np.int64), "unused.table"),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("dc", "g1", "g2", "m")]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
        helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 5, 16]),
    ]
    graph = helper.make_graph(nodes, "shapes", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_macs_match_hand_computed_values():
    table = layer_cost_table(shapes_model(), {"x": (2, 3, 8, 8), "t": (2, 5, 16)})
    n = 2
    assert table["conv.weight"].macs == n * 4 * 8 * 8 * (3 * 3 * 3)
    assert table["grouped.weight"].macs == n * 4 * 3 * 3 * (2 * 3 * 3)  # C_in / group = 2
    assert table["deconv.weight"].macs == (n * 4 * 3 * 3) * (3 * 2 * 2)  # every input element x (C_out x kernel)
    assert table["gemm_t.weight"].macs == n * 36 * 10
    assert table["gemm.weight"].macs == n * 36 * 10
    assert table["matmul.weight"].macs == n * 5 * 16 * 8
    assert table["grouped.weight"].num_params == 72 and table["grouped.weight"].channels == 4
    assert table["deconv.weight"].channels == 3  # ConvTranspose output channels are axis 1
    assert table.other_initializer_bytes == 7 * 8
    # the computed fp32 size is the float file: weights, other initializers and the graph's own bytes
    fp32 = configuration_cost(table, {name: "fp32" for name in table}).size_bytes
    assert table.graph_bytes > 0 and fp32 == pytest.approx(len(shapes_model().SerializeToString()), rel=0.01)


def test_macs_fall_back_to_a_runtime_run_when_inference_is_incomplete():
    model, _ = uninferable_model()
    assert not onnx.shape_inference.infer_shapes(model).graph.value_info  # the premise
    table = layer_cost_table(model, (4, 4, 4))
    assert table["fc1.weight"].macs == 4 * 16 * 8
    assert table["fc2.weight"].macs == 4 * 8 * 3


def test_without_running_the_model_unknown_shapes_are_an_error_not_a_run():
    model, _ = uninferable_model()
    with pytest.raises(ShapesUnknown, match="static shape inference"):
        layer_cost_table(model, (4, 4, 4), run_model=False)
    assert layer_cost_table(shapes_model(), {"x": (1, 3, 8, 8), "t": (1, 5, 16)}, run_model=False)


def test_bops_and_shared_weights():
    table = layer_cost_table(shapes_model(), {"x": (1, 3, 8, 8), "t": (1, 5, 16)})
    macs = {name: cost.macs for name, cost in table.items()}
    for candidate, (w, a) in {"fp32": (32, 32), "w8a8": (8, 8), "w4a8": (4, 8), "w8": (8, 32), "w4": (4, 32)}.items():
        cost = configuration_cost(table, Configuration.uniform(list(table), candidate))
        assert cost.bops == sum(macs.values()) * w * a, candidate
    mixed = dict.fromkeys(table, "fp32") | {"conv.weight": "w4a8"}
    assert (
        configuration_cost(table, mixed).bops
        == (sum(macs.values()) - macs["conv.weight"]) * 1024 + macs["conv.weight"] * 32
    )


def test_size_counts_packed_bits_scales_and_zero_points():
    table = layer_cost_table(shapes_model(), {"x": (1, 3, 8, 8), "t": (1, 5, 16)})
    fp32 = configuration_cost(table, Configuration.uniform(list(table), "fp32"))
    params = sum(cost.num_params for cost in table.values())
    channels = sum(cost.channels for cost in table.values())
    fixed = 56 + table.graph_bytes  # other initializers and the graph's own bytes
    assert fp32.size_bytes == 4 * params + fixed
    w8 = configuration_cost(table, Configuration.uniform(list(table), "w8a8"))
    assert w8.size_bytes == params + 5 * channels + fixed  # int8 weights, float32 scales, int8 zero points
    w4 = configuration_cost(table, Configuration.uniform(list(table), "w4"))
    per_layer = sum(-(-c.num_params // 2) + 4 * c.channels + -(-c.channels // 2) for c in table.values())
    assert w4.size_bytes == per_layer + fixed


def test_configuration_is_validated():
    table = layer_cost_table(shapes_model(), {"x": (1, 3, 8, 8), "t": (1, 5, 16)})
    with pytest.raises(ValueError, match=r"missing layer\(s\)"):
        configuration_cost(table, {"conv.weight": "w8a8"})
    with pytest.raises(ValueError, match="give the batch shape as a mapping"):
        layer_cost_table(shapes_model(), (1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"missing \['t'\]"):
        layer_cost_table(shapes_model(), {"x": (1, 3, 8, 8)})


@pytest.fixture(scope="module")
def wide_cnn():
    """An untrained, wider digits CNN (~140k parameters): sizes only need real shapes and weights."""
    torch.manual_seed(0)
    data = load_digits()
    model = export_onnx(DigitsCNN(width=64), torch.from_numpy(data.train_x[:1]))
    return model, {"input": data.train_x[:64]}


@pytest.mark.slow
@pytest.mark.parametrize("candidate", list(CANDIDATES))
def test_size_against_exported_file(wide_cnn, candidate):
    model, calibration = wide_cnn
    table = layer_cost_table(model, (1, 1, 8, 8))
    configuration = Configuration.uniform(find_layers(model), candidate)
    predicted = configuration_cost(table, configuration)
    exported = export_model(model, configuration, calibration).load()
    data_bytes = sum(initializer_bytes(init) for init in exported.graph.initializer)
    file_bytes = len(exported.SerializeToString())
    predicted_data = predicted.size_bytes - table.graph_bytes
    print(
        f"{candidate}: predicted {predicted.size_bytes} B, initializer data {data_bytes} B, file {file_bytes} B "
        f"({100 * (file_bytes - predicted.size_bytes) / predicted.size_bytes:+.1f} %)"
    )
    if CANDIDATES[candidate].float16:
        # The fp16 export stores the layers' biases in float16 too; the estimate counts them at float32
        # (other_initializer_bytes), so it is over by at most half of those bytes: conservative for a budget.
        assert 0 <= predicted_data - data_bytes <= table.other_initializer_bytes // 2
    elif CANDIDATES[candidate].quantizes_activations:
        # Static quantization adds activation scales/zero points and int32-bias scales/zero points.
        assert 0 < data_bytes - predicted_data <= 0.03 * predicted_data
    else:
        # Weight-only and float exports store exactly the data the estimate counts.
        assert data_bytes == predicted_data
    # The file is the float graph's bytes plus Q/DQ nodes and the plan's metadata: a few KiB more here.
    assert 0 <= file_bytes - predicted.size_bytes <= 12 * 1024


def test_cost_is_plain_data():
    assert Cost(size_bytes=1, bops=2) == Cost(1, 2)


def test_an_embedding_is_a_layer_without_macs():
    from tests.planner.helpers import embedding_model

    model, _ = embedding_model()
    table = layer_cost_table(model, {"ids": (1, 5)})
    assert (table["table"].op_type, table["table"].macs, table["table"].channels) == ("Gather", 0, 12)
    assert table["head"].macs == 6 * 3
    for candidate in ("w8a8", "w4"):
        cost = configuration_cost(table, {"table": candidate, "head": "fp32"})
        bits = 8 if candidate == "w8a8" else 4
        assert cost.bops == 18 * 32 * 32  # the lookup adds no bit operations
        weights = 72 * bits // 8 + 4 * 12 + 12 * bits // 8 + 4 * 18  # table per row + float head
        assert cost.size_bytes == weights + table.graph_bytes


def test_recurrent_layers_count_every_step_and_keep_float_activations():
    """LSTM W [2, 16, 3] multiplies each step's input, R [2, 16, 4] each step's state; their
    quantized candidates keep the LSTM input float, so BOPS count 32 activation bits."""
    model, _ = recurrent_model()
    batch, steps = 2, 5
    table = layer_cost_table(model, {"x": (batch, steps, 3)})
    assert table["lstm.W"].macs == batch * steps * 2 * 16 * 3
    assert table["lstm.R"].macs == batch * steps * 2 * 16 * 4
    assert table["lstm.R"].channels == 16  # one scale per gate row
    cost = configuration_cost(table, {"lstm.W": "w8a8", "lstm.R": "w4", "fc.weight": "w8a8"})
    assert cost.bops == table["lstm.W"].macs * 8 * 32 + table["lstm.R"].macs * 4 * 32 + table["fc.weight"].macs * 8 * 8
