"""torch.export archives for the tests and bench/: a small model saved with ``torch.export.save``, any
module exported with a dynamic or a fixed batch (``save_exported``), and
editors that change one member of a saved archive. Each hostile edit's payload touches a marker file
when torch runs it (``tests/sensitivity/test_pt2_archive.py`` shows which ones plain
``torch.export.load`` does run, and that ``sensitivity.pt2_archive`` refuses them all).
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"
ENUM_MODULE = "mpq_hostile_enum_module"  # what the hostile pytree spec asks torch to import


class SmallModel(nn.Module):
    """Embedding, conv and linear layers, a buffer and a lifted constant; exported with a dynamic batch."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(12, 4)
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(self.embedding(ids).transpose(1, 2)).relu().mean(-1)
        return self.fc(hidden) * self.scale + torch.tensor([0.0, 1.0, 2.0])


def save_small_model(path: Path) -> Path:
    """``SmallModel`` (seed 0) exported with a dynamic batch and saved with ``torch.export.save``."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(
        SmallModel().eval(), (torch.randint(0, 12, (3, 5)),), dynamic_shapes={"ids": {0: batch}}
    )
    torch.export.save(exported, str(path))
    return path


def save_exported(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, *, dynamic: bool) -> Path:
    """``module`` (in eval mode) exported by ``torch.export.export`` and saved: every input's axis 0 a
    dynamic batch when ``dynamic``, else fixed at the example's batch size."""
    shapes = tuple({0: torch.export.Dim("batch", min=1, max=4096)} for _ in example) if dynamic else None
    torch.export.save(torch.export.export(module.eval(), example, dynamic_shapes=shapes), str(path))
    return path


# ---------------------------------------------------------------- editing archives


def rewrite(source: Path, target: Path, changes: Mapping[str, bytes | None]) -> None:
    """Copy ``source`` member by member, replacing, removing (None) or adding the members named below its root."""
    pending = dict(changes)
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as edited:
        root = original.namelist()[0].split("/")[0]
        for info in original.infolist():
            relative = info.filename[len(root) + 1 :]
            data = pending.pop(relative) if relative in pending else original.read(info)
            if data is not None:
                edited.writestr(info, data)
        for relative, data in pending.items():
            if data is not None:  # removing a member the archive does not have: nothing to do
                edited.writestr(f"{root}/{relative}", data)


def member(source: Path, relative: str) -> bytes:
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/")[0]
        return archive.read(f"{root}/{relative}")


def edit_json(source: Path, target: Path, relative: str, edit: Callable[[Any], None], **more: bytes | None) -> None:
    document = json.loads(member(source, relative))
    edit(document)
    rewrite(source, target, {relative: json.dumps(document).encode(), **more})


class Touch:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def torch_pickle(marker: Path) -> bytes:
    target = marker.with_suffix(".payload")
    torch.save(Touch(marker), target)  # a torch zip pickle that weights_only=True refuses
    return target.read_bytes()


def float_meta(count: int) -> dict[str, Any]:
    return {
        "dtype": 7,
        "sizes": [{"as_int": count}],
        "requires_grad": False,
        "device": {"type": "cpu", "index": None},
        "strides": [{"as_int": 1}],
        "storage_offset": {"as_int": 0},
        "layout": 7,
    }


def program_nodes(program: dict[str, Any]) -> list[dict[str, Any]]:
    return program["graph_module"]["graph"]["nodes"]


# ---------------------------------------------------------------- hostile archives


def pickled_weight(source: Path, target: Path, marker: Path) -> None:
    def edit(table: dict[str, Any]) -> None:
        table["config"]["fc.weight"]["use_pickle"] = True

    path_name = json.loads(member(source, WEIGHTS))["config"]["fc.weight"]["path_name"]
    edit_json(source, target, WEIGHTS, edit, **{f"data/weights/{path_name}": torch_pickle(marker)})


def pickled_sample_inputs(source: Path, target: Path, marker: Path) -> None:
    rewrite(source, target, {"data/sample_inputs/model.pt": torch_pickle(marker)})


def pickled_constant(source: Path, target: Path, marker: Path) -> None:
    def edit(table: dict[str, Any]) -> None:
        table["config"]["hostile"] = {
            "path_name": "tensor_7",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": float_meta(1),
        }

    edit_json(source, target, CONSTANTS, edit, **{"data/constants/tensor_7": torch_pickle(marker)})


def opaque_constant(source: Path, target: Path, marker: Path) -> None:
    def edit(table: dict[str, Any]) -> None:
        table["config"]["hostile"] = {
            "path_name": "opaque_obj_0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }

    payload = pickle.dumps(Touch(marker))
    edit_json(source, target, CONSTANTS, edit, **{"data/constants/opaque_obj_0": payload})


def custom_object_constant(source: Path, target: Path, marker: Path) -> None:
    def edit(table: dict[str, Any]) -> None:
        table["config"]["hostile"] = {
            "path_name": "custom_obj_0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }

    edit_json(source, target, CONSTANTS, edit, **{"data/constants/custom_obj_0": pickle.dumps(Touch(marker))})


def sympy_expression(source: Path, target: Path, marker: Path) -> None:
    def edit(program: dict[str, Any]) -> None:
        size = program["graph_module"]["graph"]["tensor_values"]["ids"]["sizes"][0]["as_expr"]
        size["expr_str"] = f"__import__('os').system('touch {marker}') or {size['expr_str']}"

    edit_json(source, target, PROGRAM, edit)


def guards_code(source: Path, target: Path, marker: Path) -> None:
    def edit(program: dict[str, Any]) -> None:
        program["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]

    edit_json(source, target, PROGRAM, edit)


def os_system_target(source: Path, target: Path, marker: Path) -> None:
    def edit(program: dict[str, Any]) -> None:
        program_nodes(program).insert(
            0,
            {
                "target": "torch.os.system",
                "inputs": [{"name": "", "arg": {"as_string": f"touch {marker}"}, "kind": 1}],
                "outputs": [{"as_none": True}],
                "metadata": {},
                "is_hop_single_tensor_return": None,
                "name": "hostile",
            },
        )

    edit_json(source, target, PROGRAM, edit)


def from_file_target(source: Path, target: Path, marker: Path) -> None:
    """aten.from_file(path, shared=True) creates the file: an aten operator that torch's verifier accepts."""

    def edit(program: dict[str, Any]) -> None:
        program["graph_module"]["graph"]["tensor_values"]["mapped"] = {**float_meta(8), "dtype": 1}
        program_nodes(program).insert(
            0,
            {
                "target": "torch.ops.aten.from_file.default",
                "inputs": [
                    {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                    {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                    {"name": "size", "arg": {"as_int": 8}, "kind": 1},
                    {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2},
                ],
                "outputs": [{"as_tensor": {"name": "mapped"}}],
                "metadata": {},
                "is_hop_single_tensor_return": None,
                "name": "mapped",
            },
        )

    edit_json(source, target, PROGRAM, edit)


def placeholder_name(source: Path, target: Path, marker: Path) -> None:
    """FX writes placeholder names into `def forward(...)`: a name with a default argument runs at load."""

    def edit(program: dict[str, Any]) -> None:
        module = program["graph_module"]
        call_graph = module.pop("module_call_graph")
        hostile = json.dumps(f"ids=__import__('os').system('touch {marker}')")
        program["graph_module"] = json.loads(json.dumps(module).replace('"ids"', hostile))
        program["graph_module"]["module_call_graph"] = call_graph

    edit_json(source, target, PROGRAM, edit)


def forward_argument_name(source: Path, target: Path, marker: Path) -> None:
    def edit(program: dict[str, Any]) -> None:
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        signature["forward_arg_names"] = [f"ids=__import__('os').system('touch {marker}')"]

    edit_json(source, target, PROGRAM, edit)


def pytree_enum_import(source: Path, target: Path, marker: Path) -> None:
    """torch's pytree parser imports the module an "__enum__" context names; this one touches the marker."""
    (target.parent / f"{ENUM_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    def edit(program: dict[str, Any]) -> None:
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        enum = {"__enum__": True, "fqn": f"{ENUM_MODULE}:Kind", "name": "A"}
        spec[1]["children_spec"][1]["context"] = json.dumps([enum])
        signature["in_spec"] = json.dumps(spec)

    edit_json(source, target, PROGRAM, edit)


def aotinductor_member(source: Path, target: Path, marker: Path) -> None:
    rewrite(source, target, {"data/aotinductor/model/model.so": b"\x7fELF\x02\x01\x01"})


def legacy_weights(source: Path, target: Path, marker: Path) -> None:
    rewrite(source, target, {"data/weights/model.pt": torch_pickle(marker)})
