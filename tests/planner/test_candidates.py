import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from planner.candidates import CANDIDATES, Candidate, Configuration, get_candidate, parse_candidates
from planner.cost import layer_bops, layer_cost_table, layer_size_bytes
from planner.export import required_opset
from sensitivity.layers import Layer
from tests.models import tiny_onnx_model

LAYERS = [
    Layer("conv.weight", "/conv/Conv", "Conv", (4, 1, 3, 3), 36, 0),
    Layer("fc.weight", "/fc/Gemm", "Gemm", (10, 4), 40, 0),
]


def test_menu_matches_design():
    assert CANDIDATES["fp32"] == Candidate("fp32", None, None)
    assert CANDIDATES["w8a8"] == Candidate("w8a8", 8, 8)
    assert CANDIDATES["w4a8"] == Candidate("w4a8", 4, 8)
    assert CANDIDATES["w8"] == Candidate("w8", 8, None)
    assert CANDIDATES["w4"] == Candidate("w4", 4, None)
    assert CANDIDATES["w4"].weight_only and not CANDIDATES["w4a8"].weight_only
    assert (CANDIDATES["w8"].effective_weight_bits, CANDIDATES["w8"].effective_activation_bits) == (8, 32)
    assert (CANDIDATES["fp32"].effective_weight_bits, CANDIDATES["fp32"].effective_activation_bits) == (32, 32)


def test_candidate_is_frozen() -> None:
    with pytest.raises(AttributeError):
        CANDIDATES["w8a8"].weight_bits = 4  # type: ignore[misc]


def test_parse_candidates_keeps_order_and_drops_repeats():
    assert [c.name for c in parse_candidates("fp32, w8a8,w4,w8a8")] == ["fp32", "w8a8", "w4"]
    assert [c.name for c in parse_candidates(["w4a8", "w8"])] == ["w4a8", "w8"]


def test_parse_candidates_names_unknown_and_lists_valid():
    with pytest.raises(ValueError) as error:
        parse_candidates("fp32,int3,w2")
    message = str(error.value)
    assert "'int3'" in message and "'w2'" in message
    assert all(name in message for name in CANDIDATES)
    with pytest.raises(ValueError, match="no candidates"):
        parse_candidates(" , ")
    with pytest.raises(ValueError, match="valid candidates"):
        get_candidate("w16")


def test_configuration_validates_against_layers():
    configuration = Configuration({"conv.weight": "w8a8", "fc.weight": "w4"})
    assert configuration.validate(LAYERS) is configuration
    assert configuration.candidate("fc.weight") == CANDIDATES["w4"]
    with pytest.raises(ValueError) as error:
        Configuration({"conv.weight": "w8a8", "head.weight": "w4"}).validate(LAYERS)
    assert "unknown layer(s) 'head.weight'" in str(error.value)
    assert "missing layer(s) 'fc.weight'" in str(error.value)
    with pytest.raises(ValueError, match=r"unknown candidate\(s\) 'w3'.*valid candidates"):
        Configuration({"conv.weight": "w3", "fc.weight": "w4"})


def test_configuration_is_an_immutable_mapping() -> None:
    configuration = Configuration.uniform(LAYERS, "w8")
    assert dict(configuration) == {"conv.weight": "w8", "fc.weight": "w8"}
    assert configuration == {"conv.weight": "w8", "fc.weight": "w8"}
    assert hash(configuration) == hash(Configuration(dict(configuration)))
    demoted = configuration.updated({"fc.weight": "w4"})
    assert demoted == {"conv.weight": "w8", "fc.weight": "w4"} and configuration["fc.weight"] == "w8"
    with pytest.raises(TypeError):
        configuration.assignments["conv.weight"] = "fp32"  # type: ignore[index]


def test_configuration_json_errors():
    with pytest.raises(ValueError, match="not valid JSON"):
        Configuration.from_json("{")
    with pytest.raises(ValueError, match="JSON object"):
        Configuration.from_json("[1, 2]")
    with pytest.raises(ValueError, match="must be strings"):
        Configuration.from_json(json.dumps({"conv.weight": 8}))


@pytest.mark.slow
@given(st.dictionaries(st.text(min_size=1, max_size=20), st.sampled_from(list(CANDIDATES)), max_size=8))
def test_configuration_json_round_trip(assignments):
    configuration = Configuration(assignments)
    assert Configuration.from_json(configuration.to_json()) == configuration
    assert Configuration.from_dict(json.loads(configuration.to_json())).to_dict() == assignments


def test_fp16_and_w8a16_candidates() -> None:
    fp16, w8a16 = CANDIDATES["fp16"], CANDIDATES["w8a16"]
    assert fp16 == Candidate("fp16", 16, 16, float16=True)
    assert w8a16 == Candidate("w8a16", 8, 16)
    # fp16 stores and computes in float16: no integer grid, no calibrated activation ranges
    assert fp16.quantizes_weights and not fp16.integer_weights and not fp16.integer_activations
    assert w8a16.integer_weights and w8a16.integer_activations and not w8a16.float16
    assert (fp16.effective_weight_bits, fp16.effective_activation_bits) == (16, 16)
    table = layer_cost_table(tiny_onnx_model(), {"x": (1, 8)})
    cost = table["fc1.weight"]
    assert layer_size_bytes(cost, "fp16") == 2 * cost.num_params  # float16 values, no scales
    assert layer_size_bytes(cost, "w8a16") == layer_size_bytes(cost, "w8")
    assert layer_bops(cost, "fp16") == cost.macs * 16 * 16 == layer_bops(cost, "fp32") // 4
    assert layer_bops(cost, "w8a16") == 2 * layer_bops(cost, "w8a8")
    # float16 needs no newer opset; 16-bit QuantizeLinear types need 21
    assert required_opset(["fp32", "fp16"]) == 0
    assert required_opset(["fp16", "w8a16"]) == 21
