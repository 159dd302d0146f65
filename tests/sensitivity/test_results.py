"""Configurations validate every field once, with explicit bounds, whatever JSON sends them."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensitivity.checks import shown
from sensitivity.results import (
    MAX_BATCH_SIZE,
    MAX_ITERATIONS,
    MAX_MEMORY_BUDGET_MB,
    MAX_PROBES,
    MAX_PROBES_PER_PASS,
    MAX_SEED,
    MAX_TIME_BUDGET_S,
    MIN_MEMORY_BUDGET_MB,
    EigenConfig,
    InterLayerConfig,
    TraceConfig,
    config_from_dict,
)
from tests.values import JSON_VALUES, NOT_INTS

CONFIGS = (TraceConfig, EigenConfig, InterLayerConfig)

# NOT_INTS (tests/values.py): what JSON can hold where an int is expected, none of it an int in range.
# Tolerances are relative errors in (0, 1].
NOT_TOLERANCES = [0, 0.0, -0.1, 1.01, 2, math.inf, -math.inf, math.nan, True, "0.1", None, [0.1], 10**400]
BAD_VALUES: dict[str, list[Any]] = {
    "seed": [*NOT_INTS, -1, MAX_SEED + 1],
    "batch_size": [*NOT_INTS, 0, -1, MAX_BATCH_SIZE + 1],
    "device": ["tpu", "", "CPU", "cuda:", "cuda:x", "cuda:100", "cuda:0 ", 5, None, True, ["cpu"], {"cpu": 1}],
    "task": ["vision", "", None, 1, ["auto"], math.nan],
    "hvp_method": ["magic", None, 0, ["double_backward"]],
    "probes_per_pass": [*NOT_INTS, 0, MAX_PROBES_PER_PASS + 1],
    # None is valid for both budgets: no memory adaptation, no time limit.
    "memory_budget_mb": [v for v in NOT_INTS if v is not None] + [MIN_MEMORY_BUDGET_MB - 1, MAX_MEMORY_BUDGET_MB + 1],
    "time_budget_s": [0, -1.0, math.inf, math.nan, True, "60", [60], 10**400, MAX_TIME_BUDGET_S * 2],
    "tolerance": NOT_TOLERANCES,
    "min_probes": [*NOT_INTS, 1, MAX_PROBES + 1],
    "max_probes": [*NOT_INTS, 7, MAX_PROBES + 1, 10**9],  # 7: below the default min_probes (8)
    "max_iterations": [*NOT_INTS, 1, MAX_ITERATIONS + 1],
    "bits": [[], [9], [1], [1e400], [8.0], [True], [8, 8], (8, 4.5), "84", 8, None, {8: 1}, [[8]], [None]],
    "trace_tolerance": NOT_TOLERANCES,
    "trace_min_probes": [*NOT_INTS, 1, MAX_PROBES + 1],
    "trace_max_probes": [*NOT_INTS, 7, MAX_PROBES + 1, 10**9],
}
BAD_CASES = [
    pytest.param(cls, field.name, value, id=f"{cls.__name__}-{field.name}-{shown(value)}")
    for cls in CONFIGS
    for field in dataclasses.fields(cls)
    for value in BAD_VALUES[field.name]
]


def test_every_field_has_bad_values() -> None:
    assert {field.name for cls in CONFIGS for field in dataclasses.fields(cls)} == set(BAD_VALUES)


@pytest.mark.parametrize(("cls", "name", "value"), BAD_CASES)
def test_a_bad_value_is_a_value_error_naming_its_field(cls: type, name: str, value: Any) -> None:
    named = rf"(?<![a-z_]){re.escape(name)}\b"  # "tolerance" is not named by "trace_tolerance"
    with pytest.raises(ValueError, match=named):
        cls(**{name: value})
    with pytest.raises(ValueError, match=named):
        config_from_dict({"type": cls.__name__, name: value})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TraceConfig(min_probes=10, max_probes=9), r"max_probes must be an integer in \[10, 8192\]; got 9"),
        (lambda: InterLayerConfig(bits=(8, 9)), r"bits: unsupported weight bit widths \[9\]"),
        (lambda: InterLayerConfig(bits=()), "bits must be a non-empty list"),
        (
            lambda: TraceConfig(seed=2**70),
            r"seed must be an integer in \[0, 9223372036854775807\]; got 1180591620717411303424",
        ),
        (lambda: TraceConfig(tolerance=math.inf), r"tolerance must be a finite number in \(0, 1\]; got inf"),
        (lambda: TraceConfig(batch_size=10**5000), "batch_size must be an integer .*; got an int too large to print"),
        (lambda: TraceConfig(device="x" * 10**6), r"device must be one of .*; got 'x{10,20}\.\.\.x+'$"),
        (lambda: config_from_dict({"type": "Pickle"}), "unknown configuration type 'Pickle'"),
        (lambda: config_from_dict({"type": ["TraceConfig"]}), "unknown configuration type"),
        (lambda: config_from_dict({"type": "TraceConfig", "probes": 3}), r"unknown keys for TraceConfig: \['probes'\]"),
        (lambda: config_from_dict({"type": "TraceConfig", 3: 3}), r"unknown keys for TraceConfig: \['3'\]"),
        (lambda: config_from_dict([("type", "TraceConfig")]), "must be a JSON object; got list"),
        (lambda: config_from_dict(None), "must be a JSON object; got NoneType"),
        (lambda: EigenConfig(time_budget_s=60), "time_budget_s bounds Hutchinson probes"),
    ],
)
def test_bad_configs_are_named(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_bounds_are_inclusive_and_values_become_their_canonical_types() -> None:
    config = TraceConfig(
        seed=np.int64(MAX_SEED),  # type: ignore[arg-type]  # a numpy integer on purpose: it becomes an int
        batch_size=MAX_BATCH_SIZE,
        probes_per_pass=MAX_PROBES_PER_PASS,
        tolerance=1,
        min_probes=MAX_PROBES,
        max_probes=MAX_PROBES,
        device="cuda:7",
    )
    assert type(config.seed) is int and config.seed == MAX_SEED
    assert type(config.tolerance) is float and config.tolerance == 1.0
    # numpy scalars and a list on purpose: they become a float and a tuple of ints
    assert EigenConfig(max_iterations=MAX_ITERATIONS, tolerance=np.float32(0.5)).tolerance == 0.5  # type: ignore[arg-type]
    assert InterLayerConfig(bits=[np.int8(8), 2]).bits == (8, 2)  # type: ignore[arg-type]
    assert config_from_dict(json.loads(json.dumps(config.to_dict(), allow_nan=False))) == config


def test_configs_round_trip_through_json() -> None:
    for config in (TraceConfig(seed=2, tolerance=0.1), EigenConfig(max_iterations=7), InterLayerConfig(bits=(8, 6, 4))):
        data = json.loads(json.dumps(config.to_dict()))
        assert config_from_dict(data) == config
    assert InterLayerConfig(bits=[8, 4]).bits == (8, 4)  # type: ignore[arg-type]  # a JSON list becomes a tuple


# ------------------------------------------------------------------ any JSON value (tests/values.py), in any field

# Values that pass, mixed in so that valid configurations are drawn too.
GOOD_VALUES: dict[str, list[Any]] = {
    "seed": [0, 7, MAX_SEED],
    "batch_size": [1, 64, MAX_BATCH_SIZE],
    "device": ["auto", "cpu", "cuda:1"],
    "task": ["auto", "regression"],
    "hvp_method": ["auto", "double_backward", "forward_over_reverse"],
    "probes_per_pass": [1, 4],
    "tolerance": [1e-9, 0.05, 1],
    "min_probes": [2, 8],
    "max_probes": [8, 300],
    "max_iterations": [2, 50],
    "bits": [[8], (4, 8), [2, 3, 5]],
    "trace_tolerance": [0.5],
    "trace_min_probes": [3],
    "trace_max_probes": [MAX_PROBES],
    "memory_budget_mb": [None, MIN_MEMORY_BUDGET_MB, 4096],
    "time_budget_s": [None, 0.5, MAX_TIME_BUDGET_S],
}


def _fields(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    names = [field.name for field in dataclasses.fields(cls)]
    return st.fixed_dictionaries({}, optional={n: JSON_VALUES | st.sampled_from(GOOD_VALUES[n]) for n in names})


def _assert_plain(config: Any) -> None:
    """A valid configuration holds canonical, finite, JSON-able values and round-trips."""
    for field in dataclasses.fields(config):
        assert isinstance(field.type, str)  # results.py postpones its annotations: they are strings
        value = getattr(config, field.name)
        expected = {
            "int": int,
            "float": float,
            "str": str,
            "tuple[int, ...]": tuple,
            "int | None": (int, type(None)),
            "float | None": (float, type(None)),
        }[field.type]
        assert type(value) in (expected if isinstance(expected, tuple) else (expected,)), (field.name, value)
        assert not isinstance(value, float) or math.isfinite(value)
    assert config_from_dict(json.loads(json.dumps(config.to_dict(), allow_nan=False))) == config


@pytest.mark.slow
@pytest.mark.parametrize("cls", CONFIGS)
@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data())
def test_any_json_values_give_a_valid_config_or_a_value_error(cls: type, data) -> None:
    values = data.draw(_fields(cls))
    try:
        config = cls(**values)
    except ValueError:
        config = None
    if config is not None:
        _assert_plain(config)
    try:
        rebuilt = config_from_dict({"type": cls.__name__, **values})
    except ValueError:
        rebuilt = None
    assert rebuilt == config


@settings(max_examples=150, deadline=None, database=None)
@given(
    data=JSON_VALUES
    | st.dictionaries(
        st.sampled_from(["type", "seed", "bits", "tolerance", "x"]) | st.text(max_size=4) | st.integers(),
        JSON_VALUES | st.sampled_from(["TraceConfig", "InterLayerConfig", 8, [8]]),
        max_size=5,
    )
)
def test_config_from_dict_takes_any_value(data: Any) -> None:
    try:
        config = config_from_dict(data)
    except ValueError:
        return
    _assert_plain(config)


def test_layer_info_keeps_node_name_and_scope_and_older_records_load_without() -> None:
    from sensitivity.results import LayerInfo

    info = LayerInfo(
        "onnx::MatMul_984",
        "MatMul",
        (384, 384),
        147456,
        1,
        node_name="/encoder/layer.0/attention/self/query/MatMul",
        scope="/encoder/layer.0/attention/self/query",
    )
    data = json.loads(json.dumps(info.to_dict()))
    assert data["node_name"] == info.node_name and data["scope"] == info.scope
    assert LayerInfo.from_dict(data) == info
    stored = {k: v for k, v in data.items() if k not in ("node_name", "scope")}  # written before the fields existed
    assert LayerInfo.from_dict(stored) == dataclasses.replace(info, node_name="", scope="")
