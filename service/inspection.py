"""Validation of uploaded files: what they are, and whether we accept them.

Everything here reads files and never runs them: ONNX is parsed and checked, torch.export
archives are only listed (their pickles are never opened in the API), npz headers are read
without pickle. The functions run in a spawned child process (see ``Inspector``) so that
parsing a multi-GB protobuf, or a parser crash on hostile bytes, never touches the API
process's memory.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import posixpath
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class InvalidUpload(ValueError):
    """The upload is not acceptable; the message says why and what to do. ``code`` is
    "infeasible" when the request's constraints can never be met."""

    def __init__(self, message: str, code: str = "bad_input") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_archive_members: int
    max_dataset_arrays: int
    allow_torch: bool


# ---------------------------------------------------------------- models


def inspect_model(path: str, limits: Limits) -> dict[str, Any]:
    if zipfile.is_zipfile(path):
        return _inspect_zip(path, limits)
    return _inspect_onnx_file(path)


def _inspect_onnx_file(path: str) -> dict[str, Any]:
    import onnx

    model = _parse_onnx(path)
    external = [t.name for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise InvalidUpload(
            f"the model stores {len(external)} tensors (e.g. {external[0]!r}) in external data files that are not "
            "part of this upload: upload a zip archive holding the .onnx file and its data files"
        )
    description = _describe_onnx(model, "onnx")
    del model  # the checker reads the file itself: never two copies of a multi-GB proto at once
    _check_onnx(path)
    return description


def _parse_onnx(path: str):
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError, onnx.onnx_cpp2py_export.checker.ValidationError):
        raise InvalidUpload(
            "not a model this service reads: expected an ONNX model (protobuf), a zip archive holding one ONNX "
            "model and its external data, or a torch.export (.pt2) archive"
        ) from None
    if not model.graph.node or not model.opset_import:
        raise InvalidUpload("the file is not an ONNX model: it has no graph nodes or no opset import (truncated?)")
    return model


def _check_onnx(model_or_path) -> None:
    import onnx

    try:
        onnx.checker.check_model(model_or_path)
    except onnx.checker.ValidationError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "invalid model"
        raise InvalidUpload(f"the ONNX model fails onnx.checker: {first_line}") from None


def _all_tensors(model):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t


def _describe_onnx(model, model_format: str) -> dict[str, Any]:
    from sensitivity.layers import find_layers

    initializer_names = {init.name for init in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "format": model_format,
        "opset": opset,
        "details": {
            "ir_version": model.ir_version,
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "inputs": [_value_info(v) for v in model.graph.input if v.name not in initializer_names],
            "outputs": [_value_info(v) for v in model.graph.output],
            "node_count": len(model.graph.node),
        },
        "layers": [
            {
                "name": layer.name,
                "op_type": layer.op_type,
                "node_name": layer.node_name,
                "shape": list(layer.shape),
                "num_params": layer.num_params,
            }
            for layer in find_layers(model)
        ],
    }


def _value_info(value) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    import onnx

    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else None
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _inspect_zip(path: str, limits: Limits) -> dict[str, Any]:
    try:
        archive = zipfile.ZipFile(path)
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise InvalidUpload(f"the zip archive is damaged: {error}") from None
    with archive:
        _check_members(members, limits)
        names = [m.filename for m in members]
        if any(posixpath.basename(n) == "archive_format" for n in names):
            return _inspect_pt2(archive, limits)
        return _inspect_onnx_bundle(archive, limits)


def _check_members(members: list[zipfile.ZipInfo], limits: Limits) -> None:
    if len(members) > limits.max_archive_members:
        raise InvalidUpload(f"the archive holds {len(members)} files; at most {limits.max_archive_members} allowed")
    total = sum(m.file_size for m in members)
    if total > limits.max_bytes:
        raise InvalidUpload(f"the archive unpacks to {total} bytes, over the limit of {limits.max_bytes}")
    for member in members:
        if not _safe_relative(member.filename):
            raise InvalidUpload(f"archive member {member.filename!r} points outside the archive")


def _safe_relative(name: str) -> bool:
    normalized = posixpath.normpath(name)
    return not (name.startswith(("/", "\\")) or normalized.startswith("..") or ":" in name or "\\" in name)


def _inspect_pt2(archive: zipfile.ZipFile, limits: Limits) -> dict[str, Any]:
    if not limits.allow_torch:
        raise InvalidUpload("torch.export (.pt2) uploads are disabled on this server (MPQ_ALLOW_TORCH_UPLOADS=false)")
    format_member = next(n for n in archive.namelist() if posixpath.basename(n) == "archive_format")
    if archive.read(format_member).strip() != b"pt2":
        raise InvalidUpload("the zip archive is neither a torch.export .pt2 archive nor an ONNX bundle")
    return {"format": "torch_export", "opset": None, "details": {"archive_files": len(archive.namelist())},
            "layers": _pt2_weight_layers(archive)}


def _pt2_weight_layers(archive: zipfile.ZipFile) -> list[dict[str, Any]]:
    """Candidate layers from the archive's JSON weight table (rank >= 2 parameters).

    The JSON is read, never the pickles; a worker confirms the layers when it loads the program.
    """
    config_names = [n for n in archive.namelist() if n.endswith("model_weights_config.json")]
    layers: list[dict[str, Any]] = []
    for name in config_names:
        try:
            config = json.loads(archive.read(name))["config"]
        except (KeyError, ValueError):
            raise InvalidUpload(f"the .pt2 archive's weight table {name!r} is not valid JSON") from None
        for weight_name, entry in config.items():
            sizes = [d.get("as_int") for d in entry.get("tensor_meta", {}).get("sizes", [])]
            if entry.get("is_param") and len(sizes) >= 2 and all(isinstance(s, int) for s in sizes):
                layers.append({"name": weight_name, "op_type": None, "node_name": None, "shape": sizes,
                               "num_params": int(np.prod(sizes))})
    return layers


def onnx_member(archive: zipfile.ZipFile) -> str:
    """The name of the bundle's one .onnx file (uploads with none or several are refused)."""
    members = [n for n in archive.namelist() if n.endswith(".onnx")]
    if len(members) != 1:
        raise InvalidUpload(
            f"a zip upload must hold exactly one .onnx file (and its external data); found {len(members)}"
        )
    return members[0]


def _inspect_onnx_bundle(archive: zipfile.ZipFile, limits: Limits) -> dict[str, Any]:
    import onnx

    member = onnx_member(archive)
    with tempfile.TemporaryDirectory(prefix="mpq-inspect-") as root:
        archive.extractall(root)  # member names were checked by _check_members
        model_path = os.path.join(root, member)
        model = _parse_onnx(model_path)
        base = os.path.dirname(model_path)
        for tensor in _all_tensors(model):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                _check_external_location(tensor, base, root)
        description = _describe_onnx(model, "onnx_archive")
        del model
        _check_onnx(model_path)
        return description


def _check_external_location(tensor, base: str, root: str) -> None:
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    resolved = os.path.realpath(os.path.join(base, location))
    inside = resolved.startswith(os.path.realpath(root) + os.sep)
    if not location or os.path.isabs(location) or not inside:
        raise InvalidUpload(f"tensor {tensor.name!r} points at external data {location!r} outside the upload")
    if not os.path.isfile(resolved):
        raise InvalidUpload(f"tensor {tensor.name!r} needs external data file {location!r}, missing from the upload")


# ---------------------------------------------------------------- datasets


def inspect_dataset(path: str, limits: Limits) -> dict[str, Any]:
    """Read the npz's array headers (never pickle, never the data) and check they form a dataset."""
    if not zipfile.is_zipfile(path):
        raise InvalidUpload("a dataset must be a complete .npz file (numpy.savez) with one array per model input; "
                            "this upload is not one, or it is truncated")
    try:
        archive = zipfile.ZipFile(path)
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise InvalidUpload(f"the .npz file is damaged: {error}") from None
    with archive:
        _check_members(members, limits)
        if len(members) > limits.max_dataset_arrays:
            raise InvalidUpload(f"the dataset holds {len(members)} arrays; at most {limits.max_dataset_arrays}")
        arrays = {_array_name(m.filename): _array_header(archive, m) for m in members}
    return _describe_dataset(arrays)


def _array_name(filename: str) -> str:
    if not filename.endswith(".npy"):
        raise InvalidUpload(f"npz member {filename!r} is not a .npy array")
    return filename[: -len(".npy")]


def _array_header(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> dict[str, Any]:
    name = _array_name(member.filename)
    with archive.open(member) as file:
        try:
            version = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran_order, dtype = read_header(file)
        except (ValueError, OSError, SyntaxError, EOFError) as error:
            raise InvalidUpload(f"array {name!r} has no valid .npy header: {error}") from None
        header_size = file.tell()
    if dtype.hasobject:
        raise InvalidUpload(
            f"array {name!r} holds Python objects (a pickle); only numeric arrays are accepted"
        )
    if dtype.kind not in "biuf":
        raise InvalidUpload(f"array {name!r} has dtype {dtype}; only bool, integer and float arrays are accepted")
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if member.file_size != expected:
        raise InvalidUpload(f"array {name!r} is truncated: {member.file_size} bytes, header says {expected}")
    return {"shape": list(shape), "dtype": dtype.name}


def _describe_dataset(arrays: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if not arrays:
        raise InvalidUpload("the dataset holds no arrays")
    lengths = {name: info["shape"][0] if info["shape"] else None for name, info in arrays.items()}
    if any(n is None for n in lengths.values()) or len(set(lengths.values())) != 1:
        raise InvalidUpload(f"every array needs the same first (sample) dimension; got {lengths}")
    labels = arrays.get("labels")
    if labels is not None and (len(labels["shape"]) != 1 or not labels["dtype"].startswith(("int", "uint"))):
        raise InvalidUpload("'labels' must be a 1-D integer array of class indices")
    return {"num_samples": next(iter(lengths.values())), "has_labels": labels is not None, "arrays": arrays}


# ---------------------------------------------------------------- the child process


class Inspector:
    """Runs inspections in one spawned child process, replaced if it dies or hangs."""

    def __init__(self, limits: Limits, timeout_s: float = 300.0) -> None:
        self.limits = limits
        self.timeout_s = timeout_s
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1000
            )
        return self._pool

    def model(self, path: Path) -> dict[str, Any]:
        return self._run(inspect_model, path)

    def dataset(self, path: Path) -> dict[str, Any]:
        return self._run(inspect_dataset, path)

    def job_request(self, path: Path, model_format: str, method: str, options: dict[str, Any],
                    plan: dict[str, Any] | None = None, batch_shapes: dict[str, list[int]] | None = None) -> None:
        self._call(check_job_request, str(path), model_format, method, options, plan, batch_shapes or {})

    def _run(self, function, path: Path) -> dict[str, Any]:
        return self._call(function, str(path), self.limits)

    def _call(self, function, *args: Any) -> Any:
        future = self._executor().submit(function, *args)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            self._kill()
            raise InvalidUpload(f"inspecting the upload took longer than {self.timeout_s:.0f} s") from None
        except concurrent.futures.process.BrokenProcessPool:
            self._kill()
            raise InvalidUpload("the upload crashed the parser; it is not a valid model or dataset") from None

    def _kill(self) -> None:
        if self._pool is not None:
            for process in list(getattr(self._pool, "_processes", {}).values()):
                process.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ---------------------------------------------------------------- job requests (run in the child)

# Per-model facts, keyed by the blob's path: blobs are content-addressed, so a path always
# names the same bytes and the facts never go stale. Bounded; the child is long-lived.
_FACTS: dict[tuple[Any, ...], Any] = {}
_MAX_FACTS = 256


def _cached(key: tuple[Any, ...], compute):
    if key not in _FACTS:
        if len(_FACTS) >= _MAX_FACTS:
            _FACTS.pop(next(iter(_FACTS)))
        _FACTS[key] = compute()
    return _FACTS[key]


def check_job_request(blob_path: str, model_format: str, method: str, options: dict[str, Any],
                      plan: dict[str, Any] | None, batch_shapes: dict[str, list[int]]) -> None:
    """Up-front checks of a sensitivity or plan request that need the libraries. Raises InvalidUpload.

    - the options build a valid analysis configuration; for plans, the whole request builds the
      worker's own PlanRequest (``plan_request``: what passes here is what the worker runs);
    - (ONNX) every op is supported by the interpreter;
    - (plans) the model is ONNX, the candidates exist, and a size or BOPS budget is not below
      what the smallest configuration of those candidates achieves.
    """
    from service.model_files import plan_request, sensitivity_config

    try:
        if plan is None:
            sensitivity_config(method, options)
        else:
            plan_request(plan)
    except ValueError as error:
        raise InvalidUpload(str(error)) from None
    if model_format == "torch_export":
        if plan is not None:
            raise InvalidUpload("plans export quantized ONNX and need an ONNX model; torch.export archives "
                                "support sensitivity analyses only")
        return  # executable content: only a worker opens it
    unsupported = _cached(("ops", blob_path), lambda: _unsupported_ops(blob_path, model_format))
    if unsupported:
        raise InvalidUpload(unsupported)
    if plan is not None:
        _check_plan(blob_path, model_format, plan, batch_shapes)


def _load_model(blob_path: str, model_format: str):
    import onnx

    if model_format == "onnx_archive":
        with zipfile.ZipFile(blob_path) as archive:
            return onnx.load_from_string(archive.read(onnx_member(archive)))
    return onnx.load(blob_path, load_external_data=False)


def _unsupported_ops(blob_path: str, model_format: str) -> str | None:
    from sensitivity.onnx_program import UnsupportedOpsError, check_supported

    try:
        check_supported(_load_model(blob_path, model_format))
    except UnsupportedOpsError as error:
        return str(error)
    return None


def _check_plan(blob_path: str, model_format: str, plan: dict[str, Any], batch_shapes: dict[str, list[int]]) -> None:
    from planner.candidates import parse_candidates

    try:
        names = tuple(c.name for c in parse_candidates(plan["candidates"]))
    except ValueError as error:
        raise InvalidUpload(str(error)) from None
    constraints = plan.get("constraints", {})
    if constraints.get("max_size_bytes") is None and constraints.get("max_bops") is None:
        return
    shapes = tuple(sorted((name, tuple(shape[1:])) for name, shape in batch_shapes.items()))
    smallest, fewest = _cached(("min-cost", blob_path, shapes, names),
                               lambda: _minimum_costs(blob_path, model_format, shapes, names))
    if constraints.get("max_size_bytes") is not None and constraints["max_size_bytes"] < smallest:
        raise InvalidUpload(f"max_size_bytes {constraints['max_size_bytes']} is below the smallest "
                            f"configuration of these candidates ({smallest} bytes)", code="infeasible")
    if constraints.get("max_bops") is not None and constraints["max_bops"] < fewest:
        raise InvalidUpload(f"max_bops {constraints['max_bops']:g} is below the fewest BOPS of any "
                            f"configuration of these candidates ({fewest:g} at batch size 1)", code="infeasible")


def _minimum_costs(blob_path: str, model_format: str, shapes: tuple, names: tuple[str, ...]) -> tuple[int, int]:
    from planner.cost import layer_bops, layer_cost_table, layer_size_bytes

    table = layer_cost_table(_load_model(blob_path, model_format), {name: [1, *rest] for name, rest in shapes})
    smallest = table.other_initializer_bytes + sum(min(layer_size_bytes(table[l], c) for c in names) for l in table)
    fewest = sum(min(layer_bops(table[l], c) for c in names) for l in table)
    return smallest, fewest
