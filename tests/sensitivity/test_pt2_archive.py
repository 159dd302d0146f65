"""Checked loading of torch.export archives: hostile archives are refused before anything in them runs.

Each hostile archive is a real ``torch.export.save`` output with one member changed. Its payload touches a
marker file; ``test_payloads_run_under_torch_export_load`` shows, in a child process, that plain
``torch.export.load`` does run them.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sensitivity import pt2_archive
from sensitivity.pt2_archive import ArchiveSummary, UnsafeArchive, check_archive, load_exported_program
from sensitivity.torch_program import load_exported
from tests.pt2_archives import (
    ENUM_MODULE,
    PROGRAM,
    WEIGHTS,
    SmallModel,
    aotinductor_member,
    custom_object_constant,
    edit_json,
    forward_argument_name,
    from_file_target,
    guards_code,
    legacy_weights,
    member,
    opaque_constant,
    os_system_target,
    pickled_constant,
    pickled_sample_inputs,
    pickled_weight,
    placeholder_name,
    pytree_enum_import,
    rewrite,
    save_small_model,
    sympy_expression,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def benign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_small_model(tmp_path_factory.mktemp("benign") / "small.pt2")


# ---------------------------------------------------------------- hostile archives (built by tests/pt2_archives.py)


@dataclass(frozen=True)
class Case:
    build: Callable[[Path, Path, Path], None]
    entry: str  # what the refusal must name
    runs_under_torch: bool  # torch.export.load (+ .module() and a call) runs the payload


REFUSED = {
    "pickled_weight": Case(pickled_weight, "model_weights_config.json (weight 'fc.weight')", True),
    "pickled_constant": Case(pickled_constant, "model_constants_config.json (constant 'hostile')", True),
    "opaque_constant": Case(opaque_constant, "data/constants/opaque_obj_0", True),
    "custom_object_constant": Case(custom_object_constant, "data/constants/custom_obj_0", False),
    "sympy_expression": Case(sympy_expression, "tensor_values.ids.sizes[0].as_expr.expr_str", True),
    "os_system_target": Case(os_system_target, "graph_module.graph.nodes[0].target", False),  # torch's verifier
    "from_file_target": Case(from_file_target, "graph_module.graph.nodes[0].target", True),
    "placeholder_name": Case(placeholder_name, "as_tensor.name", True),
    "forward_argument_name": Case(forward_argument_name, "signature.forward_arg_names", False),
    "pytree_enum_import": Case(pytree_enum_import, "signature.in_spec", True),
    "aotinductor_member": Case(aotinductor_member, "data/aotinductor/model/model.so", False),
    "legacy_weights": Case(legacy_weights, "data/weights/model.pt", True),
    "pickled_sample_inputs": Case(pickled_sample_inputs, "data/sample_inputs/model.pt", True),
}
IGNORED = {  # allowed in an archive but never used by load_exported_program
    "guards_code": Case(guards_code, "", True),
}


def build(name: str, source: Path, directory: Path) -> tuple[Path, Path]:
    case_directory = directory / name
    case_directory.mkdir()
    archive, marker = case_directory / "hostile.pt2", case_directory / "MARKER"
    {**REFUSED, **IGNORED}[name].build(source, archive, marker)
    return archive, marker


_RUN_UNDER_TORCH = """
import sys, torch
for path in sys.argv[1:]:
    try:
        torch.export.load(path).module()(torch.zeros(2, 5, dtype=torch.long))
    except Exception:
        pass
"""


@pytest.mark.slow
def test_payloads_run_under_torch_export_load(benign: Path, tmp_path: Path) -> None:
    live = [name for name, case in {**REFUSED, **IGNORED}.items() if case.runs_under_torch]
    built = {name: build(name, benign, tmp_path) for name in live}
    enum_directory = built["pytree_enum_import"][0].parent  # torch imports the module from the working folder
    run = subprocess.run(
        [sys.executable, "-c", _RUN_UNDER_TORCH, *(str(a) for a, _ in built.values())],
        cwd=enum_directory,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert {name for name, (_, marker) in built.items() if not marker.exists()} == set()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_hostile_archive_is_refused_naming_the_entry_and_nothing_runs(
    name: str, benign: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, marker = build(name, benign, tmp_path)
    monkeypatch.syspath_prepend(str(archive.parent))  # the enum module would import if torch were asked to
    monkeypatch.delitem(sys.modules, ENUM_MODULE, raising=False)
    for load in (check_archive, load_exported_program, load_exported):
        with pytest.raises(UnsafeArchive) as refused:
            load(archive)
        assert REFUSED[name].entry in str(refused.value)
        assert isinstance(refused.value, ValueError)
    assert not marker.exists()
    assert ENUM_MODULE not in sys.modules


@pytest.mark.parametrize("name", sorted(IGNORED))
def test_sample_inputs_and_guards_are_never_run(name: str, benign: Path, tmp_path: Path) -> None:
    archive, marker = build(name, benign, tmp_path)
    ids = torch.randint(0, 12, (4, 5), generator=torch.Generator().manual_seed(1))
    expected = load_exported_program(benign).module()(ids)
    assert torch.equal(load_exported_program(archive).module()(ids), expected)
    program = load_exported(archive)
    assert torch.equal(program.forward(dict(program.layer_weights), {"ids": ids})[0], expected)
    assert not marker.exists()


# ---------------------------------------------------------------- benign archives


def test_benign_archive_loads_like_torch_export_load(benign: Path) -> None:
    ours, theirs = load_exported_program(benign), torch.export.load(str(benign))
    assert ours.example_inputs is None and ours._guards_code == []
    assert (
        set(ours.state_dict)
        == set(theirs.state_dict)
        == {"embedding.weight", "conv.weight", "conv.bias", "fc.weight", "fc.bias", "scale"}
    )
    assert all(torch.equal(ours.state_dict[k], theirs.state_dict[k]) for k in ours.state_dict)
    assert isinstance(ours.state_dict["fc.weight"], nn.Parameter) and ours.state_dict["fc.weight"].requires_grad
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 5, 64):
        ids = torch.randint(0, 12, (batch, 5), generator=generator)
        assert torch.equal(ours.module()(ids), theirs.module()(ids))
    # without guards the module still checks its inputs against the program's range constraints
    with pytest.raises(RuntimeError, match="<= 64"):
        ours.module()(torch.zeros(65, 5, dtype=torch.long))


def test_check_archive_describes_the_weights(benign: Path) -> None:
    summary = check_archive(benign)
    assert isinstance(summary, ArchiveSummary) and summary.model_names == ("model",)
    model = summary.model("model")
    described = {entry.name: (entry.shape, entry.dtype, entry.is_param) for entry in model.weights}
    expected = {name: (tuple(p.shape), "float32", True) for name, p in SmallModel().named_parameters()}
    assert described == {**expected, "scale": ((3,), "float32", False)}
    assert [entry.shape for entry in model.constants] == [(3,)]
    layers = [e.name for e in model.parameters if len(e.shape) >= 2]
    assert layers == ["embedding.weight", "conv.weight", "fc.weight"]
    with pytest.raises(ValueError, match="no program named 'other'"):
        summary.model("other")


def test_check_archive_describes_the_program_as_its_loader_does(benign: Path) -> None:
    """The layers, inputs and outputs read off the JSON (torch-free, for the upload's description) are
    those of the loaded program: the layers of ``load_exported``, with the same op types and FX nodes."""
    from sensitivity.torch_program import load_exported

    model = check_archive(benign).model("model")
    loaded = load_exported(benign)
    assert [(e.name, e.op_type, e.node_name) for e in model.layers] == [
        (layer.name, layer.op_type, layer.node_name) for layer in loaded.layers
    ]
    assert [e.op_type for e in model.layers] == ["Gather", "Conv", "Gemm"]
    [ids] = model.inputs
    assert (ids.name, ids.dtype) == ("ids", "int64") and ids.shape is not None and len(ids.shape) == 2
    assert isinstance(ids.shape[0], str) and ids.shape[1] == 5  # the dynamic batch by its symbol
    assert [value.name for value in model.outputs] == list(loaded.output_names) and model.node_count > 5


_TORCH_FREE = """
import json, sys
from sensitivity.pt2_archive import check_archive
summary = check_archive(sys.argv[1])
print(json.dumps({"torch": "torch" in sys.modules, "numpy": "numpy" in sys.modules, "sympy": "sympy" in sys.modules,
                  "layers": [[e.name, list(e.shape)] for e in summary.models[0].parameters if len(e.shape) >= 2]}))
"""


def test_check_archive_runs_without_importing_torch(benign: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE, str(benign)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["torch"], report["numpy"], report["sympy"]) == (False, False, False)
    assert report["layers"] == [["embedding.weight", [12, 4]], ["conv.weight", [6, 4, 3]], ["fc.weight", [3, 6]]]


def test_refusals_survive_a_trip_between_processes() -> None:
    error = UnsafeArchive("small/models/model.json", "graph_module.graph.nodes[0].target", "not allowed")
    copy = pickle.loads(pickle.dumps(error))  # our own exception object, as a process pool sends it back
    assert (copy.member, copy.entry, copy.reason, str(copy)) == (error.member, error.entry, error.reason, str(error))


# ---------------------------------------------------------------- malformed archives


def _weight_edit(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(table: dict[str, Any]) -> None:
        table["config"]["fc.weight"]["tensor_meta"][key] = value

    return edit


def _ints(*values: Any) -> list[dict[str, Any]]:
    return [{"as_int": v} for v in values]


MALFORMED_TABLES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "size is a string": (_weight_edit("sizes", _ints("3", 6)), '"sizes"[0]'),
    "size is a float": (_weight_edit("sizes", _ints(3.0, 6)), '"sizes"[0]'),
    "size is a bool": (_weight_edit("sizes", _ints(True, 6)), '"sizes"[0]'),
    "size is negative": (_weight_edit("sizes", _ints(-3, 6)), '"sizes"[0]'),
    "size is symbolic": (_weight_edit("sizes", [{"as_expr": {"expr_str": "s0"}}, {"as_int": 6}]), '"sizes"[0]'),
    "sizes overflow int64": (_weight_edit("sizes", _ints(2**40, 2**40)), "overflows int64"),
    "tensor larger than its file": (_weight_edit("sizes", _ints(1000, 6)), "needs 24000 bytes"),
    "strides out of bounds": (_weight_edit("strides", _ints(600, 1)), "reach past"),
    "offset out of bounds": (_weight_edit("storage_offset", {"as_int": 17}), "reach past"),
    "unknown dtype": (_weight_edit("dtype", 99), 'unknown "dtype"'),
    "dtype as a name": (_weight_edit("dtype", "float32"), 'unknown "dtype"'),
    "sizes not a list": (_weight_edit("sizes", {"as_int": 3}), '"sizes" must be a list'),
    "meta not an object": (lambda t: t["config"].__setitem__("fc.weight", "weight_3"), "expected an object"),
    "config a list": (lambda t: t.__setitem__("config", []), '"config" object'),
    "path outside the folder": (
        lambda t: t["config"]["fc.weight"].__setitem__("path_name", "../models/model.json"),
        '"path_name"',
    ),
    "grad on an int tensor": (
        lambda t: t["config"]["fc.weight"]["tensor_meta"].update(dtype=5, requires_grad=True),
        "requires_grad",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_TABLES))
def test_malformed_weight_table_is_refused(name: str, benign: Path, tmp_path: Path) -> None:
    edit, message = MALFORMED_TABLES[name]
    archive = tmp_path / "malformed.pt2"
    edit_json(benign, archive, WEIGHTS, edit)
    for load in (check_archive, load_exported_program):
        with pytest.raises(UnsafeArchive, match=r"model_weights_config\.json") as refused:
            load(archive)
        assert message in str(refused.value)


def test_deeply_nested_and_oversized_json_is_refused(benign: Path, tmp_path: Path) -> None:
    nested = tmp_path / "nested.pt2"
    rewrite(benign, nested, {WEIGHTS: b'{"config": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"})
    with pytest.raises(UnsafeArchive, match="nested too deeply"):
        check_archive(nested)
    program_size = len(member(benign, PROGRAM))
    with pytest.raises(UnsafeArchive, match=f"models/model.json: {program_size} bytes of JSON; at most 4096"):
        check_archive(benign, max_json_bytes=4096)
    with pytest.raises(UnsafeArchive, match="at most 5 are accepted"):
        check_archive(benign, max_members=5)


def test_archives_that_are_not_pt2_are_refused(benign: Path, tmp_path: Path) -> None:
    not_zip = tmp_path / "model.pt2"
    not_zip.write_bytes(b"not a zip")
    cases: dict[str, tuple[Path, str]] = {"not a zip": (not_zip, "not a readable zip archive")}
    edits: list[tuple[str, dict[str, bytes | None], str]] = [
        ("no format", {"archive_format": None}, "archive_format: missing"),
        ("other format", {"archive_format": b"onnx"}, "expected 'pt2'"),
        ("big endian", {"byteorder": b"big"}, "little-endian"),
        ("unknown member", {"data/weights/notes.txt": b""}, "torch.export.save does not write"),
        ("no weight table", {WEIGHTS: None}, "model_weights_config.json: missing"),
        ("program not an object", {PROGRAM: b"[1, 2]"}, '"graph_module"'),
    ]
    for name, changes, message in edits:
        cases[name] = (tmp_path / f"{name}.pt2", message)
        rewrite(benign, cases[name][0], changes)
    outside = tmp_path / "outside.pt2"
    with zipfile.ZipFile(benign) as original, zipfile.ZipFile(outside, "w") as edited:
        for info in original.infolist():
            edited.writestr(info, original.read(info))
        edited.writestr("elsewhere/archive_format", b"pt2")
    cases["member outside the folder"] = (outside, "lies under one folder")
    for name, (archive, message) in cases.items():
        with pytest.raises(UnsafeArchive) as refused:
            check_archive(archive)
        assert message in str(refused.value), name


def _with_expression(benign: Path, target: Path, expression: str) -> None:
    def edit(program: dict[str, Any]) -> None:
        program["graph_module"]["graph"]["sym_int_values"]["probe"] = {"as_expr": {"expr_str": expression}}

    edit_json(benign, target, PROGRAM, edit)


ACCEPTED_EXPRESSIONS = [  # what torch 2.13 writes (sympy.srepr), collected from exports with derived dims
    "Symbol('s77', positive=True, integer=True)",
    "Add(FloorDiv(Add(Symbol('s77', positive=True, integer=True), Integer(-1)), Integer(2)), Integer(1))",
    "Pow(Symbol('s77', positive=True, integer=True), Integer(2))",
    "StrictLessThan(Symbol('u0', integer=True), Integer(100))",
    "Max(Integer(4), Symbol('s77', positive=True, integer=True))",
    "Mul(Rational(1, 2), Float('1.5', precision=53), s0)",
    "s0 * 2 + 1 <= s1 and not s2 == oo",
]
REFUSED_EXPRESSIONS = [
    "__import__('os').system('true')",
    "Symbol('s0').__class__",
    "Integer(1) if s0 else Integer(2)",
    "[s0][0]",
    "(lambda: 0)()",
    "Symbol('s0; import os')",
    "Symbol(s0)",
    "Symbol('s0', positive=__import__('os'))",
    "Float(__import__('os').getpid())",
    "Add(s0, 'text')",
    "sympify('s0')",
    "Pow(Integer(10), Integer(10**18))",
    "Pow(Pow(Integer(2), Integer(64)), Integer(64))",
    "s0 ** s1",
    "Add(*[s0, s1])",
    "ｅｖａｌ('1')",
]


@pytest.mark.parametrize("expression", ACCEPTED_EXPRESSIONS + REFUSED_EXPRESSIONS)
def test_shape_expressions_are_plain_arithmetic(expression: str, benign: Path, tmp_path: Path) -> None:
    archive = tmp_path / "expression.pt2"
    _with_expression(benign, archive, expression)
    if expression in ACCEPTED_EXPRESSIONS:
        check_archive(archive)
        return
    with pytest.raises(UnsafeArchive, match=r"sym_int_values\.probe\.as_expr\.expr_str"):
        check_archive(archive)


# ---------------------------------------------------------------- random weight tables

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _slots(value: Any) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every value inside ``value``, including a new key in each object."""
    stack = [value]
    while stack:
        container = stack.pop()
        keys = list(container) if isinstance(container, dict) else range(len(container))
        for key in keys:
            yield container, key
            if isinstance(container[key], (dict, list)):
                stack.append(container[key])
        if isinstance(container, dict):
            yield container, "tensor_meta" if "dtype" not in container else "extra"


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_weight_tables_only_raise_unsafe_archive(benign: Path, tmp_path: Path, data: st.DataObject) -> None:
    table = json.loads(member(benign, WEIGHTS))
    container, key = data.draw(st.sampled_from(list(_slots(table))))
    container[key] = data.draw(_JSON_VALUES)
    archive = tmp_path / "fuzzed.pt2"
    rewrite(benign, archive, {WEIGHTS: json.dumps(table).encode()})
    try:
        check_archive(archive)
    except UnsafeArchive:
        return
    with contextlib.suppress(ValueError):  # UnsafeArchive or ArchiveLoadError
        load_exported_program(archive)


# ---------------------------------------------------------------- the allowlists match torch 2.13


def test_the_checks_were_written_against_this_torch() -> None:
    # Every check in sensitivity/pt2_archive.py follows torch 2.13's deserialiser: re-review it before upgrading.
    assert torch.__version__.startswith("2.13."), torch.__version__


def test_allowlists_are_derived_from_torch() -> None:
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE, _SYM_OPS, GraphModuleSerializer

    serializer = GraphModuleSerializer.__new__(GraphModuleSerializer)
    assert {serializer.serialize_operator(op) for op in _SYM_OPS} == pt2_archive._SYMBOLIC_OPS
    dtypes = {int(k): (str(d).removeprefix("torch."), d.itemsize) for k, d in _SERIALIZE_TO_TORCH_DTYPE.items()}
    assert dtypes == pt2_archive._DTYPES
    file_ops = {
        schema.name.removeprefix("aten::")
        for schema in torch._C._jit_get_all_schemas()
        if schema.name.startswith("aten::")
        and any(arg.name in ("filename", "path", "file") and "str" in str(arg.type) for arg in schema.arguments)
    }
    assert file_ops == pt2_archive._FILE_OPS
