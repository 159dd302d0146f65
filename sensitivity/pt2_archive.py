"""Checked loading of ``torch.export`` archives (``.pt2``): nothing in an archive is unpickled, evaluated or imported.

``torch.export.load`` (torch 2.13) runs code from a hostile archive: pickled weights, constants and custom
objects are unpickled (``torch.load(weights_only=False)``, ``pickle.loads``); sample inputs fall back to
``weights_only=False``; legacy ``weights/<model>.pt`` files are unpickled; symbolic-shape strings go through
``sympy.sympify`` (``eval``); ``guards_code`` strings are ``exec``'d by ``ExportedProgram.module()``; graph value
names and ``forward_arg_names`` are spliced into the Python source FX generates; pytree specs can name an enum
to import (``importlib.import_module``); call targets are resolved by ``getattr`` chains from ``torch`` (and
``torch.ops.aten.from_file`` creates and writes any file the worker can reach); AOTInductor members are
shared libraries. This module closes each path in two steps:

- ``check_archive`` (standard library only: it runs in the torch-free inspector process) reads the zip's
  central directory and its JSON members, bounded, and refuses every construct above (the sample inputs'
  pickle is read opcode by opcode with ``pickletools``, never executed, and refused if it names anything
  but tensor rebuilding); it returns an
  ``ArchiveSummary`` (models, their weights with shape and dtype, and the layers, inputs and outputs read
  off each checked program's JSON: ``LAYER_CALLS``) to describe the upload.
- ``load_exported_program`` checks the same open file, builds the weights and constants itself from the raw
  tensor members, drops what it does not need (sample inputs, guards code, node metadata) and only then hands
  the checked program JSON to torch's deserialiser.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    import torch

MAX_JSON_BYTES = 64 * 2**20
MAX_MEMBERS = 4096
# Deepest JSON nesting accepted: torch's own archives nest 10 levels (models/model.json) and 7 (weight tables);
# torch parses them recursively, so a bound far above that but far below Python's recursion limit.
_MAX_JSON_DEPTH = 64
_MAX_EXPRESSION_CHARS = 16384
_MAX_LITERAL = 2**64  # integer literals in shape expressions
_MAX_EXPONENT = 64  # literal exponents / shift counts: sympy evaluates 10**(10**18) eagerly and never returns
_INT64_MAX = 2**63 - 1
_MAX_DIMS = 64  # also bounds math.prod: millions of 62-bit sizes would take minutes to multiply

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")  # fc1.weight, layers.0.bias
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")  # torch's shape symbols: s0, u3, zf1, ... (symbolic_shapes.prefix_str)
_MEMBER_NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")
_FLOAT_TEXT = re.compile(r"-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]{1,3})?")

# torch._export.serde.schema.ScalarType value -> (torch dtype name, bytes per element), torch 2.13.0.
_DTYPES: dict[int, tuple[str, int]] = {
    1: ("uint8", 1),
    2: ("int8", 1),
    3: ("int16", 2),
    4: ("int32", 4),
    5: ("int64", 8),
    6: ("float16", 2),
    7: ("float32", 4),
    8: ("float64", 8),
    9: ("complex32", 4),
    10: ("complex64", 8),
    11: ("complex128", 16),
    12: ("bool", 1),
    13: ("bfloat16", 2),
    28: ("uint16", 2),
    29: ("float8_e4m3fn", 1),
    30: ("float8_e5m2", 1),
    31: ("float8_e4m3fnuz", 1),
    32: ("float8_e5m2fnuz", 1),
    33: ("float8_e8m0fnu", 1),
    34: ("uint32", 4),
    35: ("uint64", 8),
}
_GRADIENT_DTYPES = frozenset({"float16", "float32", "float64", "bfloat16", "complex32", "complex64", "complex128"})
_STRIDED_LAYOUT = 7  # schema.Layout.Strided
_DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})

# The non-aten call_function targets torch.export writes: the serialised names of
# torch._export.serde.serialize._SYM_OPS (torch 2.13.0), i.e. GraphModuleSerializer.serialize_operator(op) for
# each. operator.getitem is not among them: the serialiser folds it into its producer's outputs.
_SYMBOLIC_OPS = frozenset(
    {
        "_operator.add",
        "_operator.and_",
        "_operator.eq",
        "_operator.floordiv",
        "_operator.ge",
        "_operator.gt",
        "_operator.le",
        "_operator.lshift",
        "_operator.lt",
        "_operator.mod",
        "_operator.mul",
        "_operator.ne",
        "_operator.neg",
        "_operator.or_",
        "_operator.pos",
        "_operator.pow",
        "_operator.rshift",
        "_operator.sub",
        "_operator.truediv",
        "math.trunc",
        "torch._sym_sqrt",
        "torch.sym_float",
        "torch.sym_int",
        "torch.sym_ite",
        "torch.sym_max",
        "torch.sym_min",
        "torch.sym_not",
    }
)
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
# aten operators that open files: every aten schema of torch 2.13.0 with a `str filename` argument. torch's
# verifier accepts them (they are OpOverloads): aten.from_file(path, shared=True) creates and maps any file,
# and an in-place op on the result writes into it.
_FILE_OPS = frozenset({"from_file", "save"})

# Callables a shape expression may name. torch 2.13.0's deserialiser passes these to sympify as locals
# (GraphModuleDeserializer.deserialize: self.sympy_functions) ...
_TORCH_SYMPY_FUNCTIONS = frozenset(
    {
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "Mod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
    }
)
# ... and expressions are written with sympy.srepr (serialize.py: _print_sympy), which spells them with these
# sympy classes: Add(Symbol('s0', positive=True, integer=True), Integer(-1)).
_SYMPY_CLASSES = frozenset(
    {
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "StrictLessThan",
        "LessThan",
        "StrictGreaterThan",
        "GreaterThan",
        "And",
        "Or",
        "Not",
    }
)
_SYMPY_CALLABLES = _TORCH_SYMPY_FUNCTIONS | _SYMPY_CLASSES
_SYMPY_CONSTANTS = frozenset({"true", "false", "oo", "zoo", "nan", "int_oo"})
_POWER_CALLS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"})
_POWER_OPERATORS = (ast.Pow, ast.LShift, ast.RShift)
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, *_POWER_OPERATORS)
_COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)

# Container types a pytree spec (module_call_graph in_spec / out_spec) may name; their contexts are plain JSON.
_TREESPEC_TYPES = frozenset({"builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"})
_VERIFIERS = frozenset({"ATEN", "TRAINING"})

_WEIGHTS_DIR, _CONSTANTS_DIR = "data/weights/", "data/constants/"
_FIXED_MEMBERS = frozenset(
    {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
)
# Members torch loads as code or pickles, with the reason given to the user.
_REFUSED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("data/aotinductor/", "AOTInductor compiled code (a shared library that runs when loaded)"),
    ("data/executorch/", "an ExecuTorch program (compiled code)"),
    ("data/mtia", "MTIA compiled code"),
    ("xl_model_weights/", "AOTInductor weights, loaded with torch.load"),
    ("data/constants/custom_obj_", "a pickled TorchScript object"),
    ("data/constants/opaque_obj_", "a pickled Python object"),
)


class UnsafeArchive(ValueError):
    """A ``.pt2`` archive refused before anything in it was loaded: unsafe or malformed.

    ``member`` is the zip member and ``entry`` the weight, JSON key or node inside it (or None).
    """

    def __init__(self, member: str, entry: str | None, reason: str) -> None:
        self.member, self.entry, self.reason = member, entry, reason
        where = f"{member} ({entry})" if entry else member
        super().__init__(f"refused torch.export archive entry {where}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str | None, str]]:
        return type(self), (self.member, self.entry, self.reason)  # survives a trip between processes


class ArchiveLoadError(ValueError):
    """A ``.pt2`` archive that passed ``check_archive`` but that torch's deserialiser could not build."""


@dataclass(frozen=True)
class TensorEntry:
    """One weight or constant tensor of an archive, as its table describes it (nothing was read yet)."""

    name: str  # fully qualified name: fc1.weight
    shape: tuple[int, ...]
    dtype: str  # torch dtype name: float32
    is_param: bool
    member: str  # zip member holding its bytes
    strides: tuple[int, ...]
    storage_offset: int
    requires_grad: bool


# aten operator -> (ONNX op type, output-channel axis of its weight): the calls whose weight argument,
# when a parameter, is a layer (sensitivity.torch_program reads the loaded graph with the same table, the
# summary reads the checked JSON: both name the layers the program's ONNX export has).
LAYER_CALLS: dict[str, tuple[str, int]] = {
    "aten.embedding.default": ("Gather", 0),
    "aten.linear.default": ("Gemm", 0),
    "aten.conv1d.default": ("Conv", 0),
    "aten.conv2d.default": ("Conv", 0),
    "aten.conv3d.default": ("Conv", 0),
    "aten.conv1d.padding": ("Conv", 0),
    "aten.conv2d.padding": ("Conv", 0),
    "aten.conv3d.padding": ("Conv", 0),
    "aten.conv_transpose1d.default": ("ConvTranspose", 1),
    "aten.conv_transpose2d.input": ("ConvTranspose", 1),
    "aten.conv_transpose3d.input": ("ConvTranspose", 1),
}
_SYMBOL_IN_EXPRESSION = re.compile(r"Symbol\('([a-z]+[0-9]+)'")  # "Symbol('s77', positive=True, ...)"


@dataclass(frozen=True)
class LayerEntry:
    """A layer of a program as its checked JSON describes it: the parameter used as the weight of a
    conv / linear / embedding call, the ONNX op it exports to and the FX node of the call."""

    name: str  # the parameter's fully qualified name: conv1.weight
    op_type: str  # Conv, ConvTranspose, Gemm or Gather
    node_name: str  # the FX node: conv2d, linear_1


@dataclass(frozen=True)
class ValueEntry:
    """A user input or output of a program: name, dtype (torch's name) and dims (a symbol for a dynamic one)."""

    name: str
    dtype: str | None
    shape: tuple[int | str, ...] | None


@dataclass(frozen=True)
class ModelSummary:
    name: str  # "model" for torch.export.save
    weights: tuple[TensorEntry, ...]  # parameters and buffers (state dict)
    constants: tuple[TensorEntry, ...]  # lifted tensor constants and non-persistent buffers
    layers: tuple[LayerEntry, ...] = ()  # in graph order, a shared weight once
    inputs: tuple[ValueEntry, ...] = ()
    outputs: tuple[ValueEntry, ...] = ()
    node_count: int = 0

    @property
    def parameters(self) -> tuple[TensorEntry, ...]:
        return tuple(entry for entry in self.weights if entry.is_param)


@dataclass(frozen=True)
class ArchiveSummary:
    root: str  # the zip's top-level folder
    models: tuple[ModelSummary, ...]

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(model.name for model in self.models)

    def model(self, name: str) -> ModelSummary:
        for model in self.models:
            if model.name == name:
                return model
        raise ValueError(f"the archive holds no program named {name!r}; it holds {list(self.model_names)}")


@dataclass(frozen=True)
class _Checked:
    summary: ArchiveSummary
    programs: dict[str, dict[str, Any]]  # model name -> parsed, checked models/<name>.json


# ---------------------------------------------------------------- the static check


def check_archive(
    path: str | os.PathLike[str] | IO[bytes], *, max_json_bytes: int = MAX_JSON_BYTES, max_members: int = MAX_MEMBERS
) -> ArchiveSummary:
    """Statically check a ``.pt2`` archive and describe it; raises ``UnsafeArchive`` naming what was refused.

    Reads the zip's central directory, its JSON members and the sample inputs' pickle opcodes (each at most
    ``max_json_bytes``); tensor bytes are never read, nothing is unpickled. Imports only the standard library.
    """
    with _open_zip(path) as archive:
        return _check(archive, max_json_bytes, max_members).summary


def _open_zip(path: str | os.PathLike[str] | IO[bytes]) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "(the upload)"
        raise UnsafeArchive(where, None, f"not a readable zip archive ({error})") from None


def _check(archive: zipfile.ZipFile, max_json_bytes: int, max_members: int) -> _Checked:
    infos = archive.infolist()
    if len(infos) > max_members:
        raise UnsafeArchive("(zip directory)", None, f"{len(infos)} members; at most {max_members} are accepted")
    root, members = _members_by_path(infos)
    _check_format(archive, root, members)
    models = sorted(p[len("models/") : -len(".json")] for p in members if p.startswith("models/"))
    if not models:
        raise UnsafeArchive(f"{root}/models/", None, "the archive holds no exported program (models/<name>.json)")
    for path, info in members.items():
        if path.startswith("data/sample_inputs/"):
            _check_sample_inputs(archive, info, max_json_bytes)
    read = _json_reader(archive, root, members, max_json_bytes)
    summaries, programs = [], {}
    for model in models:
        weights = _tensor_table(read(f"{_WEIGHTS_DIR}{model}_weights_config.json"), root, members, "weight")
        constants = _tensor_table(read(f"{_CONSTANTS_DIR}{model}_constants_config.json"), root, members, "constant")
        programs[model], program_member = read(f"models/{model}.json")
        _check_program(programs[model], program_member)
        summaries.append(ModelSummary(model, weights, constants, *_describe_program(programs[model])))
    return _Checked(ArchiveSummary(root, tuple(summaries)), programs)


def _members_by_path(infos: list[zipfile.ZipInfo]) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """Members by their path under the archive's one top-level folder, after refusing what torch would run."""
    if not infos:
        raise UnsafeArchive("(zip directory)", None, "the zip archive is empty")
    root = infos[0].filename.split("/", 1)[0]
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if not _MEMBER_NAME.fullmatch(name.rstrip("/")) or ".." in name.split("/") or "/" not in name:
            raise UnsafeArchive(name, None, "a member name with characters or parts a torch.export archive never has")
        if name.split("/", 1)[0] != root:
            raise UnsafeArchive(name, None, f"every member of a .pt2 archive lies under one folder ({root!r})")
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UnsafeArchive(name, None, "encrypted or compressed with a method other than store/deflate")
        path = name[len(root) + 1 :]
        if path in members:
            raise UnsafeArchive(name, None, "the member appears twice in the zip directory")
        if not name.endswith("/"):  # folder entries (zip -r) carry nothing
            _check_member_path(path, name)
            members[path] = info
    return root, members


def _check_member_path(path: str, name: str) -> None:
    for prefix, what in _REFUSED_PREFIXES:
        if path.startswith(prefix):
            raise UnsafeArchive(name, None, f"the member is {what}; such archives are refused")
    legacy = re.fullmatch(r"data/(weights|constants)/([^/]+)\.pt", path)
    if legacy:
        raise UnsafeArchive(
            name,
            None,
            f"legacy {legacy[1]} file: a pickle, which can run code when loaded; "
            "re-save the program with torch.export.save from torch >= 2.7",
        )
    known = (
        path in _FIXED_MEMBERS
        or re.fullmatch(r"models/[A-Za-z0-9_]+\.json", path)
        or re.fullmatch(r"data/weights/([A-Za-z0-9_]+_weights_config\.json|weight_[0-9]+)", path)
        or re.fullmatch(r"data/constants/([A-Za-z0-9_]+_constants_config\.json|tensor_[0-9]+)", path)
        or re.fullmatch(r"data/sample_inputs/[A-Za-z0-9_]+\.pt", path)  # scanned, never unpickled
        or path.startswith("extra/")  # user extra files: never read
    )
    if not known:
        raise UnsafeArchive(name, None, "a member torch.export.save does not write; such archives are refused")


# What a weights-only pickle of tensors may name (torch.save's protocol 2 writes GLOBAL opcodes).
_PICKLE_GLOBALS = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("collections", "OrderedDict"),
        ("torch", "device"),
        ("torch", "Size"),
    }
)
_STORAGE_GLOBAL = re.compile(r"[A-Z][A-Za-z0-9]*Storage")  # torch.FloatStorage, torch.LongStorage, ...
_PICKLE_REFUSED_OPS = frozenset({"STACK_GLOBAL", "OBJ", "EXT1", "EXT2", "EXT4"})


def _check_sample_inputs(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> None:
    """The sample inputs are a torch.save zip holding a pickle. mpq never unpickles them (torch's own
    loader would fall back to an unrestricted unpickler), but an archive whose pickle names anything
    but tensor rebuilding is refused: its opcodes are read with ``pickletools`` and never executed."""
    import io
    import pickletools

    name = info.filename
    if info.file_size > max_bytes:
        raise UnsafeArchive(name, None, f"sample inputs of {info.file_size} bytes; at most {max_bytes} are read")
    try:
        with zipfile.ZipFile(io.BytesIO(archive.read(info))) as inner:
            pickles = [entry for entry in inner.infolist() if entry.filename.endswith("data.pkl")]
            if len(pickles) != 1 or pickles[0].file_size > max_bytes:
                raise UnsafeArchive(name, None, "sample inputs that are not one torch.save pickle")
            data = inner.read(pickles[0])
        for opcode, argument, _position in pickletools.genops(data):
            if opcode.name in _PICKLE_REFUSED_OPS:
                raise UnsafeArchive(
                    name, None, f"sample inputs whose pickle uses {opcode.name}, which can import and run anything"
                )
            if opcode.name in ("GLOBAL", "INST"):
                module, _, attribute = str(argument).partition(" ")
                if (module, attribute) not in _PICKLE_GLOBALS and not (
                    module == "torch" and _STORAGE_GLOBAL.fullmatch(attribute)
                ):
                    raise UnsafeArchive(
                        name,
                        None,
                        f"sample inputs whose pickle calls {module}.{attribute}: unpickling them would run it",
                    )
    except (zipfile.BadZipFile, ValueError, EOFError) as error:
        if isinstance(error, UnsafeArchive):
            raise
        raise UnsafeArchive(name, None, f"sample inputs that are not a readable torch.save pickle ({error})") from None


def _check_format(archive: zipfile.ZipFile, root: str, members: dict[str, zipfile.ZipInfo]) -> None:
    expected = {"archive_format": b"pt2", "archive_version": b"0"}
    for path, value in expected.items():
        info = members.get(path)
        if info is None:
            raise UnsafeArchive(f"{root}/{path}", None, "missing: the file is not a torch.export (.pt2) archive")
        if info.file_size > 16 or _read(archive, info).strip() != value:
            raise UnsafeArchive(f"{root}/{path}", None, f"expected {value.decode()!r}: an unknown archive format")
    byteorder = members.get("byteorder")
    if byteorder is not None and (byteorder.file_size > 16 or _read(archive, byteorder).strip() != b"little"):
        raise UnsafeArchive(f"{root}/byteorder", None, "only little-endian archives are supported")


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return archive.read(info)  # at most info.file_size bytes; the CRC is checked
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as error:
        raise UnsafeArchive(info.filename, None, f"the member cannot be read ({error})") from None


def _json_reader(
    archive: zipfile.ZipFile, root: str, members: dict[str, zipfile.ZipInfo], max_bytes: int
) -> Callable[[str], tuple[Any, str]]:
    def read(path: str) -> tuple[Any, str]:
        name = f"{root}/{path}"
        info = members.get(path)
        if info is None:
            raise UnsafeArchive(name, None, "missing: every exported program needs its weight and constant tables")
        if info.file_size > max_bytes:
            raise UnsafeArchive(name, None, f"{info.file_size} bytes of JSON; at most {max_bytes} are accepted")
        return _parse_json(_read(archive, info), name), name

    return read


def _parse_json(data: bytes | str, where: str) -> Any:
    try:
        value = json.loads(data)
    except RecursionError:
        raise UnsafeArchive(where, None, "JSON nested too deeply to parse") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, integers of more than 4300 digits
        raise UnsafeArchive(where, None, f"not valid JSON ({error})") from None
    depth = _json_depth(value)
    if depth > _MAX_JSON_DEPTH:
        raise UnsafeArchive(where, None, f"JSON nested {depth} levels deep; at most {_MAX_JSON_DEPTH} are accepted")
    return value


def _shown(value: Any) -> str:
    """A value from the archive as shown in a message: its repr, cut short (it may be megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


# ---------------------------------------------------------------- weight and constant tables


def _tensor_table(
    parsed: tuple[Any, str], root: str, members: dict[str, zipfile.ZipInfo], kind: str
) -> tuple[TensorEntry, ...]:
    table, where = parsed
    config = table.get("config") if isinstance(table, dict) else None
    if not isinstance(config, dict):
        raise UnsafeArchive(where, None, 'expected an object with a "config" object of tensors')
    return tuple(_tensor_entry(name, meta, where, root, members, kind) for name, meta in config.items())


def _tensor_entry(
    name: str, payload: Any, where: str, root: str, members: dict[str, zipfile.ZipInfo], kind: str
) -> TensorEntry:
    entry = f"{kind} {_shown(name)}"

    def refuse(reason: str) -> UnsafeArchive:
        return UnsafeArchive(where, entry, reason)

    if not _QUALIFIED_NAME.fullmatch(name):
        raise refuse("not a module attribute name (letters, digits, '_' and '-' between dots)")
    if not isinstance(payload, dict):
        raise refuse("expected an object describing the tensor")
    path_name = payload.get("path_name")
    if isinstance(path_name, str) and path_name.startswith(("custom_obj_", "opaque_obj_")):
        raise refuse("a pickled object (custom or opaque): unpickling can run arbitrary code")
    if payload.get("use_pickle") is not False:
        raise refuse(
            'stored as a pickle ("use_pickle" is not false): unpickling can run arbitrary code; '
            "export plain tensors (no tensor subclasses)"
        )
    prefix = "weight_" if kind == "weight" else "tensor_"
    if not isinstance(path_name, str) or not re.fullmatch(prefix + "[0-9]+", path_name):
        raise refuse(f'"path_name" must name a {prefix}<n> file')
    directory = _WEIGHTS_DIR if kind == "weight" else _CONSTANTS_DIR
    info = members.get(directory + path_name)
    if info is None:
        raise refuse(f"its data file {root}/{directory}{path_name} is missing")
    is_param = payload.get("is_param")
    if not isinstance(is_param, bool):
        raise refuse('"is_param" must be true or false')
    return _tensor_meta(payload.get("tensor_meta"), refuse, name, is_param, info)


def _tensor_meta(
    meta: Any, refuse: Callable[[str], UnsafeArchive], name: str, is_param: bool, info: zipfile.ZipInfo
) -> TensorEntry:
    if not isinstance(meta, dict):
        raise refuse('"tensor_meta" must be an object')
    dtype = meta.get("dtype")
    if type(dtype) is not int or dtype not in _DTYPES:
        raise refuse(f'unknown "dtype" {_shown(dtype)}')
    dtype_name, itemsize = _DTYPES[dtype]
    if meta.get("layout") != _STRIDED_LAYOUT:
        raise refuse("only dense (strided) tensors are supported")
    requires_grad = meta.get("requires_grad")
    if not isinstance(requires_grad, bool) or (requires_grad and dtype_name not in _GRADIENT_DTYPES):
        raise refuse('"requires_grad" must be a boolean, and false for integer tensors')
    device = meta.get("device")
    if not isinstance(device, dict) or not isinstance(device.get("type"), str) or device["type"] not in _DEVICE_TYPES:
        raise refuse('"device" must name a known device type')
    if device.get("index") is not None and not _is_count(device.get("index")):
        raise refuse('"device" index must be null or a non-negative integer')
    shape = _sym_ints(meta.get("sizes"), "sizes", refuse)
    strides = _sym_ints(meta.get("strides"), "strides", refuse)
    offset = _sym_ints([meta.get("storage_offset")], "storage_offset", refuse)[0]
    if len(strides) != len(shape):
        raise refuse(f"{len(shape)} sizes but {len(strides)} strides")
    _check_extent(shape, strides, offset, itemsize, info, refuse)
    return TensorEntry(name, shape, dtype_name, is_param, info.filename, strides, offset, requires_grad)


def _is_count(value: object) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= _INT64_MAX


def _sym_ints(values: Any, key: str, refuse: Callable[[str], UnsafeArchive]) -> tuple[int, ...]:
    """A list of {"as_int": n}, each a non-negative int64 (weights have concrete shapes)."""
    if not isinstance(values, list) or len(values) > _MAX_DIMS:
        raise refuse(f'"{key}" must be a list of at most {_MAX_DIMS} {{"as_int": n}}')
    numbers = []
    for index, value in enumerate(values):
        number = value.get("as_int") if isinstance(value, dict) and len(value) == 1 else None
        if not _is_count(number):
            raise refuse(f'"{key}"[{index}] is {_shown(value)}; expected {{"as_int": n}} with 0 <= n < 2**63')
        numbers.append(number)
    return tuple(numbers)


def _check_extent(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    offset: int,
    itemsize: int,
    info: zipfile.ZipInfo,
    refuse: Callable[[str], UnsafeArchive],
) -> None:
    """The tensor and every element its strides reach lie inside its member (Python ints: nothing overflows)."""
    numel = math.prod(shape)
    if numel * itemsize > _INT64_MAX:
        raise refuse(f"shape {list(shape)} holds {numel} elements: the byte count overflows int64")
    if info.file_size % itemsize:
        raise refuse(f"its data file holds {info.file_size} bytes, not a whole number of {itemsize}-byte elements")
    if numel * itemsize > info.file_size:
        raise refuse(f"shape {list(shape)} needs {numel * itemsize} bytes but its data file holds {info.file_size}")
    if numel and (offset + sum((size - 1) * stride for size, stride in zip(shape, strides)) + 1) * itemsize > (
        info.file_size
    ):
        raise refuse(f"strides {list(strides)} at offset {offset} reach past the {info.file_size} bytes of its data")


# ---------------------------------------------------------------- the program (models/<name>.json)

# Every field that torch 2.13.0's deserialiser (or ExportedProgram.module()) turns into code, a getattr or
# import lookup, or generated Python source is checked below; the other fields only ever become data.
_MAP_FIELDS = frozenset(
    {  # objects whose keys are names chosen by the exporter, not schema fields
        "tensor_values",
        "sym_int_values",
        "sym_bool_values",
        "sym_float_values",
        "custom_obj_values",
        "range_constraints",
        "opset_version",
        "treespec_namedtuple_fields",
        "metadata",
        "as_string_to_argument",
    }
)
_VALUE_MAPS = frozenset({"tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values"})
_REFUSED_FIELDS = {
    "as_graph": "a subgraph argument: higher-order operators (cond, map, ...) are not supported",
    "as_operator": "an operator-valued argument: higher-order operators are not supported",
    "as_custom_obj": "a custom object argument: custom objects are stored as pickles",
    "custom_obj": "a custom object input: custom objects are stored as pickles",
}
_FQN_FIELDS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name", "user_input_name", "fqn"})


@dataclass(frozen=True)
class _Place:
    """Where a JSON value sits, as a chain to its parent: made into a path only for an error message."""

    key: str | int | None
    parent: _Place | None

    def path(self) -> str:
        parts: list[str] = []
        place: _Place | None = self
        while place is not None and place.key is not None:
            key = place.key if isinstance(place.key, int) or len(place.key) <= 60 else place.key[:57] + "..."
            parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
            place = place.parent
        return "".join(reversed(parts)).lstrip(".") or "(top level)"


def _check_program(program: Any, where: str) -> None:
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise UnsafeArchive(where, None, 'expected an exported program object with a "graph_module"')
    for key, value, place in _fields(program, where):
        refuse = _refuser(where, place)
        if key in _REFUSED_FIELDS:
            raise refuse(_REFUSED_FIELDS[key])
        checker = _FIELD_CHECKS.get(key)
        if checker is not None:
            checker(value, refuse)


def _describe_program(
    program: dict[str, Any],
) -> tuple[tuple[LayerEntry, ...], tuple[ValueEntry, ...], tuple[ValueEntry, ...], int]:
    """(layers, user inputs, user outputs, node count) read off a checked program's JSON; what does not
    have the shape torch writes is left out (the program was checked, not its description)."""
    module = program["graph_module"]
    graph = _mapping(module.get("graph"))
    signature = _mapping(module.get("signature"))
    nodes = [node for node in _listed(graph.get("nodes")) if isinstance(node, dict)]
    values = _mapping(graph.get("tensor_values"))
    parameters: dict[str, str] = {}
    user_inputs: list[str] = []
    for spec in _listed(signature.get("input_specs")):
        parameter = spec.get("parameter") if isinstance(spec, dict) else None
        if isinstance(parameter, dict) and isinstance(parameter.get("parameter_name"), str):
            parameters[str(_dig(parameter, "arg", "name"))] = parameter["parameter_name"]
        elif isinstance(spec, dict) and isinstance(_dig(spec, "user_input", "arg", "as_tensor", "name"), str):
            user_inputs.append(_dig(spec, "user_input", "arg", "as_tensor", "name"))
    user_outputs = [
        _dig(spec, "user_output", "arg", "as_tensor", "name") for spec in _listed(signature.get("output_specs"))
    ]
    layers: list[LayerEntry] = []
    for node in nodes:
        target = node.get("target")
        call = LAYER_CALLS.get(target[len("torch.ops.") :]) if isinstance(target, str) else None
        arguments = {a.get("name"): a for a in _listed(node.get("inputs")) if isinstance(a, dict)}
        weight = parameters.get(str(_dig(arguments.get("weight"), "arg", "as_tensor", "name")))
        node_name = _dig(_first(node.get("outputs")), "as_tensor", "name")
        if call is None or weight is None or weight in {layer.name for layer in layers}:
            continue
        layers.append(LayerEntry(weight, call[0], node_name if isinstance(node_name, str) else ""))
    inputs = tuple(_value_entry(name, values.get(name)) for name in user_inputs)
    outputs = tuple(_value_entry(name, values.get(name)) for name in user_outputs if isinstance(name, str))
    return tuple(layers), inputs, outputs, len(nodes)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else None


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _value_entry(name: str, meta: Any) -> ValueEntry:
    code = meta.get("dtype") if isinstance(meta, dict) else None
    dtype = _DTYPES[code][0] if isinstance(code, int) and code in _DTYPES else None
    sizes = _listed(meta.get("sizes")) if isinstance(meta, dict) else None
    if sizes is None:
        return ValueEntry(name, dtype, None)
    dims: list[int | str] = []
    for size in sizes:
        fixed, expression = _dig(size, "as_int"), _dig(size, "as_expr", "expr_str")
        symbol = _SYMBOL_IN_EXPRESSION.match(expression) if isinstance(expression, str) else None
        dims.append(fixed if isinstance(fixed, int) else symbol.group(1) if symbol else "?")
    return ValueEntry(name, dtype, tuple(dims))


def _refuser(where: str, place: _Place) -> Callable[[str], UnsafeArchive]:
    return lambda reason: UnsafeArchive(where, place.path(), reason)


def _fields(program: dict[str, Any], where: str) -> Iterator[tuple[str, Any, _Place]]:
    """(field name, value, place) of every record field, iteratively; map keys are checked on the way."""
    stack: list[tuple[Any, _Place, bool]] = [(program, _Place(None, None), False)]
    while stack:
        value, place, is_map = stack.pop()
        if isinstance(value, list):
            stack.extend((item, _Place(index, place), False) for index, item in enumerate(value))
        elif isinstance(value, dict):
            for key, item in value.items():
                child = _Place(key, place)
                if is_map:
                    _check_map_entry(place.key, key, item, _refuser(where, child))
                else:
                    yield key, item, child
                stack.append((item, child, not is_map and key in _MAP_FIELDS))


def _check_map_entry(field: Any, key: str, value: Any, refuse: Callable[[str], UnsafeArchive]) -> None:
    if field == "custom_obj_values":
        raise refuse("a custom object: custom objects are stored as pickles")
    if field == "range_constraints":
        _check_name(key, _SYMBOL_NAME, "a shape symbol name (s0, u1, ...)", refuse)
        bounds = value if isinstance(value, dict) else {}
        if not all(bounds.get(end) is None or type(bounds.get(end)) is int for end in ("min_val", "max_val")):
            raise refuse("range bounds must be integers or null")
    elif field in _VALUE_MAPS:
        _check_name(key, _IDENTIFIER, "a Python identifier", refuse)
    elif field == "metadata" and not isinstance(value, str):
        raise refuse("metadata values must be strings")


def _check_name(value: Any, pattern: re.Pattern[str], what: str, refuse: Callable[[str], UnsafeArchive]) -> None:
    # FX splices graph value names and forward_arg_names into the Python source it compiles: a name such as
    # "x=__import__('os').system(...)" becomes a default argument that runs (checked empirically).
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise refuse(f"{_shown(value)} is not {what}")


def _check_value_name(value: Any, refuse: Callable[[str], UnsafeArchive]) -> None:
    if value is not None and value != "":
        _check_name(value, _IDENTIFIER, "a Python identifier", refuse)


def _check_qualified_name(value: Any, refuse: Callable[[str], UnsafeArchive]) -> None:
    if value != "":
        _check_name(value, _QUALIFIED_NAME, "a module attribute name", refuse)


def _check_argument_names(value: Any, refuse: Callable[[str], UnsafeArchive]) -> None:
    if value is not None and not isinstance(value, list):
        raise refuse("forward argument names must be a list")
    for name in value or ():
        _check_name(name, _IDENTIFIER, "a Python identifier", refuse)


def _check_target(target: Any, refuse: Callable[[str], UnsafeArchive]) -> None:
    if isinstance(target, str) and target in _SYMBOLIC_OPS:
        return
    match = _ATEN_TARGET.fullmatch(target) if isinstance(target, str) else None
    if match is None:
        # torch resolves targets with getattr chains from torch, math and _operator (torch.os.system resolves)
        raise refuse(
            f"call target {_shown(target)} is not an aten operator (torch.ops.aten.<op>.<overload>) "
            "or one of the symbolic-shape builtins torch.export writes"
        )
    if match[1] in _FILE_OPS:
        raise refuse(f"call target {_shown(target)} reads or writes files on the machine that runs the model")


def _check_guards_code(value: Any, refuse: Callable[[str], UnsafeArchive]) -> None:
    # Guards are Python source that ExportedProgram.module() exec's. They are not refused (torch writes them,
    # e.g. "(L['x'].size()[0] // 2) != 1") but never reach torch: load_exported_program drops them.
    if not isinstance(value, list) or not all(isinstance(guard, str) for guard in value):
        raise refuse("guards_code must be a list of strings")


def _check_verifiers(value: Any, refuse: Callable[[str], UnsafeArchive]) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v in _VERIFIERS for v in value):
        raise refuse(f"verifiers must be a list drawn from {sorted(_VERIFIERS)}")


def _check_treespec(text: Any, refuse: Callable[[str], UnsafeArchive]) -> None:
    """A pytree spec of tuples, lists and dicts. torch's parser imports any module an "__enum__" object names
    (torch.utils._pytree.enum_object_hook), so contexts may hold no JSON object at all."""
    spec = _parse_embedded_json(text, refuse)
    if not (isinstance(spec, list) and len(spec) == 2 and type(spec[0]) is int and spec[0] == 1):
        raise refuse("not a pytree spec (protocol 1)")
    stack = [spec[1]]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
            raise refuse('every pytree node must hold exactly "type", "context" and "children_spec"')
        kind, context, children = node["type"], node["context"], node["children_spec"]
        if not isinstance(children, list):
            raise refuse("pytree children must be a list")
        if kind is None and (context is not None or children):
            raise refuse("a pytree leaf has no context and no children")
        if kind is not None and (not isinstance(kind, str) or kind not in _TREESPEC_TYPES):
            raise refuse(f"inputs or outputs of type {_shown(kind)}: only tuples, lists and dicts are supported")
        if kind is not None and not _plain_context(_parse_embedded_json(context, refuse)):
            raise refuse(f"the context of a {kind} must be null or a list of keys")
        stack.extend(children)


def _parse_embedded_json(text: Any, refuse: Callable[[str], UnsafeArchive]) -> Any:
    if not isinstance(text, str):
        raise refuse("expected a JSON string")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise refuse("not valid JSON (or nested too deeply)") from None
    if _json_depth(value) > _MAX_JSON_DEPTH:
        raise refuse(f"JSON nested more than {_MAX_JSON_DEPTH} levels deep")
    return value


def _plain_context(context: Any) -> bool:
    return context is None or (
        isinstance(context, list) and all(key is None or isinstance(key, (str, int)) for key in context)
    )


# ---------------------------------------------------------------- shape expressions


def _check_expression(text: Any, refuse: Callable[[str], UnsafeArchive]) -> None:
    """A sympy shape expression that sympify can evaluate without running anything but sympy constructors.

    torch parses these strings with sympy.sympify, i.e. eval: "__import__('os').system(...)" runs (checked
    empirically). Accepted: names of shape symbols and sympy constants, int/float literals, arithmetic,
    comparisons, and/or/not, and calls of the allowlisted sympy/torch functions. Strings only as the name in
    Symbol('s0', ...) and the digits in Float('1.5', precision=53); keywords only there.
    """
    if not isinstance(text, str) or not text.isascii() or len(text) > _MAX_EXPRESSION_CHARS:
        raise refuse(f"a shape expression must be an ASCII string of at most {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise refuse(f"shape expression {_shown(text)} is not a Python expression") from None
    stack: list[tuple[ast.AST, bool]] = [(tree.body, False)]
    while stack:
        node, inside_power = stack.pop()
        reason = _expression_problem(node, inside_power)
        if reason is not None:
            raise refuse(f"shape expression {_shown(text)}: {reason}")
        is_power = _is_power(node)
        stack.extend((child, inside_power or is_power) for child in _expression_children(node))


def _expression_problem(node: ast.AST, inside_power: bool) -> str | None:
    if isinstance(node, ast.Constant):
        return _literal_problem(node.value)
    if isinstance(node, ast.Name):
        if node.id in _SYMPY_CONSTANTS or _SYMBOL_NAME.fullmatch(node.id):
            return None
        return f"{node.id!r} is neither a shape symbol nor a sympy constant"
    if isinstance(node, ast.UnaryOp):
        return None if isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)) else "unsupported unary operator"
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, _POWER_OPERATORS):
            return _power_problem(node.right, inside_power)
        return None if isinstance(node.op, _ARITHMETIC) else "unsupported binary operator"
    if isinstance(node, ast.Compare):
        return None if all(isinstance(op, _COMPARISONS) for op in node.ops) else "unsupported comparison"
    if isinstance(node, ast.BoolOp):
        return None
    if isinstance(node, ast.Call):
        return _call_problem(node, inside_power)
    return f"{type(node).__name__} is not allowed in a shape expression"


def _literal_problem(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if abs(value) <= _MAX_LITERAL else f"integer literal beyond {_MAX_LITERAL}"
    if isinstance(value, float):
        return None if math.isfinite(value) else "a non-finite float literal"
    return f"a {type(value).__name__} literal is only allowed as the name in Symbol(...) or the digits in Float(...)"


def _call_problem(node: ast.Call, inside_power: bool) -> str | None:
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in _SYMPY_CALLABLES:
        return f"{name or 'this call'} is not one of the sympy and torch shape functions torch writes"
    if any(isinstance(arg, ast.Starred) for arg in node.args) or any(kw.arg is None for kw in node.keywords):
        return "*args and **kwargs are not allowed"
    if name == "Symbol":
        first = node.args[0] if len(node.args) == 1 else None
        symbol = first.value if isinstance(first, ast.Constant) else None
        if not (isinstance(symbol, str) and _SYMBOL_NAME.fullmatch(symbol)):
            return "Symbol takes one shape symbol name (s0, u1, ...)"
        if not all(isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, bool) for kw in node.keywords):
            return "Symbol's assumptions must be True or False"
        return None
    if name == "Float":  # its argument is not walked: it must be a literal here
        first = node.args[0] if len(node.args) == 1 else None
        value = first.value if isinstance(first, ast.Constant) else None
        if not ((isinstance(value, str) and _FLOAT_TEXT.fullmatch(value)) or _literal_problem(value) is None):
            return "Float takes one decimal number"
        if any(kw.arg != "precision" or _literal_int(kw.value) not in range(1, 1025) for kw in node.keywords):
            return "Float takes only precision=<1..1024>"
        return None
    if node.keywords:
        return f"{name} takes no keyword arguments"
    if name in _POWER_CALLS:
        return _power_problem(node.args[1] if len(node.args) == 2 else None, inside_power)
    return None


def _is_power(node: ast.AST) -> bool:
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, _POWER_OPERATORS)
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _POWER_CALLS


def _power_problem(exponent: ast.AST | None, inside_power: bool) -> str | None:
    # sympy evaluates a power of literals eagerly: Pow(Integer(10), Integer(10**18)) never returns. A literal
    # exponent of at most 64 in a power that is not itself inside a power bounds every number it can build.
    value = _literal_int(exponent) if exponent is not None else None
    if inside_power or value is None or abs(value) > _MAX_EXPONENT:
        return f"powers and shifts need a literal exponent of at most {_MAX_EXPONENT} and may not nest"
    return None


def _literal_int(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal_int(node.operand)
        return None if value is None else (-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer":
        return _literal_int(node.args[0]) if len(node.args) == 1 and not node.keywords else None
    return None


def _expression_children(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.BinOp):
        return [node.left, node.right]
    if isinstance(node, ast.UnaryOp):
        return [node.operand]
    if isinstance(node, ast.Compare):
        return [node.left, *node.comparators]
    if isinstance(node, ast.BoolOp):
        return list(node.values)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in ("Symbol", "Float"):
        return list(node.args)
    return []


_FIELD_CHECKS: dict[str, Callable[[Any, Callable[[str], UnsafeArchive]], None]] = {
    "target": _check_target,
    "expr_str": _check_expression,
    "name": _check_value_name,
    "as_name": _check_value_name,
    "forward_arg_names": _check_argument_names,
    "in_spec": _check_treespec,
    "out_spec": _check_treespec,
    "guards_code": _check_guards_code,
    "verifiers": _check_verifiers,
    **dict.fromkeys(_FQN_FIELDS, _check_qualified_name),
}


# ---------------------------------------------------------------- loading


def load_exported_program(path: str | os.PathLike[str], *, model: str = "model") -> torch.export.ExportedProgram:
    """Load program ``model`` of a ``.pt2`` archive without unpickling, evaluating or importing anything from it.

    ``check_archive`` runs first on the same open file (``UnsafeArchive`` names what it refuses); weights and
    constants are then built from their raw bytes, sample inputs are never read (the program has no
    ``example_inputs``), and guards code and node metadata are dropped before torch deserialises the graph.
    Weights are loaded on the CPU. Raises ``ArchiveLoadError`` (a ValueError) when torch cannot rebuild the
    checked program.
    """
    with _open_zip(path) as archive:
        checked = _check(archive, MAX_JSON_BYTES, MAX_MEMBERS)
        summary = checked.summary.model(model)
        state_dict = _load_tensors(archive, summary.weights)
        constants = _load_tensors(archive, summary.constants)
    program = _without_code(checked.programs[model])
    return _deserialize(program, state_dict, constants, f"{checked.summary.root}/models/{model}.json")


def _load_tensors(archive: zipfile.ZipFile, entries: tuple[TensorEntry, ...]) -> dict[str, torch.Tensor]:
    """Tensors as views of one flat tensor per (member, dtype), so weights sharing a file stay tied as in torch."""
    import torch

    flat: dict[tuple[str, str], torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        key = (entry.member, entry.dtype)
        if key not in flat:
            flat[key] = _flat_tensor(_read(archive, archive.getinfo(entry.member)), getattr(torch, entry.dtype))
        # check_archive bounded every element these strides reach by the member's size
        view = torch.as_strided(flat[key], entry.shape, entry.strides, entry.storage_offset)
        if entry.is_param:
            tensors[entry.name] = torch.nn.Parameter(view, requires_grad=entry.requires_grad)
        else:
            tensors[entry.name] = view.requires_grad_(entry.requires_grad)
    return tensors


def _flat_tensor(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    import torch

    if not data:
        return torch.empty(0, dtype=dtype)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # owns a copy: nothing aliases the zip's buffer
    if dtype == torch.bool:
        return raw.ne(0)  # bytes other than 0 and 1 in a bool tensor are undefined behaviour in torch kernels
    return raw.view(dtype)


def _without_code(program: dict[str, Any]) -> dict[str, Any]:
    """The checked program minus what torch would execute or resolve but mpq never needs.

    guards_code is Python source that ExportedProgram.module() exec's (torch/export/_unlift.py,
    _convert_guards_code_to_fn). Dropping it is safe: guards only check the shapes of the inputs, mpq checks
    input shapes itself, and without example inputs torch builds no guard function at all but checks the
    inputs against the program's range constraints in a forward pre-hook (_check_input_constraints_pre_hook).
    Node metadata (stack traces, nn_module_stack, source_fn_stack resolved with getattr chains from torch)
    is only provenance.
    """
    program["guards_code"] = []
    graph = program["graph_module"].get("graph")
    nodes = graph.get("nodes") if isinstance(graph, dict) else None
    for node in nodes if isinstance(nodes, list) else ():
        if isinstance(node, dict):
            node["metadata"] = {}
    return program


def _deserialize(
    program: dict[str, Any], state_dict: dict[str, torch.Tensor], constants: dict[str, torch.Tensor], where: str
) -> torch.export.ExportedProgram:
    import torch

    # Private torch API, checked against torch 2.13.0, the version every check in this module was written
    # against: re-read torch/_export/serde/serialize.py, torch/export/pt2_archive/_package.py and
    # torch/export/_unlift.py before moving to another torch (tests/sensitivity/test_pt2_archive.py fails then).
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, program)
        # example_inputs=None: the sample-inputs member (a pickle) is never read
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except Exception as error:  # SerializeError, AssertionError, KeyError, SpecViolationError, ...
        message = str(error).splitlines()[0][:500] if str(error) else type(error).__name__
        raise ArchiveLoadError(
            f"{where}: torch {torch.__version__} cannot rebuild the exported program "
            f"({type(error).__name__}: {message})"
        ) from error
