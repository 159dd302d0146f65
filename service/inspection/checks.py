"""Validation of uploaded files: what they are, and whether we accept them.

Everything here reads files and never runs them: ONNX is checked (onnx.checker) before it is
described, zip bundles are read from their directory and never unpacked, torch.export archives
are checked statically (``sensitivity.pt2_archive``), npz headers are read without pickle, and
every declared size is bounded before anything is decompressed. The functions run in a one-shot
sandboxed process (``python -m service.inspection.checks``, started by ``service.inspection.inspector``) that gets
the file as a descriptor: a parser crash, a bomb or a hang costs that process, never the API.
"""

from __future__ import annotations

import math
import mmap
import os
import posixpath
import tempfile
import traceback
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # onnx and the libraries load where they are used (a spare inspector imports onnx first)
    import onnx

    from sensitivity.normalize import NormalizedModel
    from sensitivity.pt2_archive import ArchiveSummary, ValueEntry

MAX_COMPRESSION_RATIO = 100  # float weights and calibration data compress ~1.1-20x; zeros ~1000x
RATIO_FLOOR_BYTES = 16 << 20  # small members may compress as well as they like
MAX_PROTO_BYTES = 2 << 30  # protobuf cannot hold more: larger models use external data
# A model's description travels to the API process and into its row. Real models have tens to a few
# thousand weight layers (a 70B decoder: ~560); a legal 800,000-layer upload grew the API by 1.5 GB.
MAX_LAYERS = 16_384
MAX_GRAPH_VALUES = 4_096  # graph inputs, and graph outputs, each
PLACEHOLDER_MIN_BYTES = 1 << 20
# bytes per element of TensorProto.DataType FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, BOOL, FLOAT16,
# DOUBLE, UINT32, UINT64, BFLOAT16 (sub-byte, string and complex types are left to the checker)
_FIXED_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


class InvalidUpload(ValueError):
    """The upload is not acceptable; the message says why and what to do. ``code`` is
    "infeasible" when the request's constraints can never be met."""

    def __init__(self, message: str, code: str = "bad_input") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_decompressed_bytes: int
    max_archive_members: int
    max_dataset_arrays: int
    allow_torch: bool


# ---------------------------------------------------------------- models


def inspect_model(file: IO[bytes], limits: Limits) -> dict[str, Any]:
    if zipfile.is_zipfile(file):
        return _inspect_zip(file, limits)
    file.seek(0)
    return _inspect_onnx_file(file)


def _inspect_onnx_file(file: IO[bytes]) -> dict[str, Any]:
    import onnx

    model = _parse_onnx(file)
    external = [t.name for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise InvalidUpload(
            f"the model stores {len(external)} tensors (e.g. {external[0]!r}) in external data files that are not "
            "part of this upload: upload a zip archive holding the .onnx file and its data files"
        )
    _check_without_weights(model)
    return _describe_onnx(model, "onnx")


def _parse_onnx(source: IO[bytes] | bytes) -> onnx.ModelProto:
    """Parse a file from a read-only mapping (page cache, outside the inspector's data budget), or bytes."""
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        if isinstance(source, bytes):
            model.ParseFromString(source)
        else:
            with mmap.mmap(source.fileno(), 0, prot=mmap.PROT_READ) as mapped, memoryview(mapped) as view:
                model.ParseFromString(view)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError):
        raise InvalidUpload(
            "not a model this service reads: expected an ONNX model (protobuf), a zip archive holding one ONNX "
            "model and its external data, or a torch.export (.pt2) archive"
        ) from None
    if not model.graph.node or not model.opset_import:
        raise InvalidUpload("the file is not an ONNX model: it has no graph nodes or no opset import (truncated?)")
    return model


def _check_without_weights(model: onnx.ModelProto) -> None:
    """onnx.checker on ``model`` with its large weights moved to a sparse placeholder file (the model is
    only described afterwards: its weights are not needed). Reading the bytes, parsing them and the
    checker's own copy took a raw 512 MiB model to 3.0x its size in the inspector; this takes the parse
    (1x) plus the largest weight once."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="check-") as root:
        moved = 0
        for tensor in model.graph.initializer:
            expected = _expected_bytes(tensor)
            if expected is None or expected < PLACEHOLDER_MIN_BYTES or not tensor.HasField("raw_data"):
                continue  # small, or a type whose size the checker judges
            size = len(tensor.raw_data)  # a copy of this one tensor's bytes, freed at once
            tensor.ClearField("raw_data")
            if size != expected:
                raise InvalidUpload(
                    f"initializer {tensor.name!r} holds {size} bytes of raw data; its shape "
                    f"{list(tensor.dims)} and element type need {expected}"
                )
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", "weights.bin"), ("offset", str(moved)), ("length", str(size))):
                tensor.external_data.add(key=key, value=value)
            moved += size
        with open(os.path.join(root, "weights.bin"), "wb") as placeholder:
            placeholder.truncate(moved)  # sparse: no disk space
        with open(os.path.join(root, "model.onnx"), "wb") as light:
            light.write(model.SerializeToString())
        _check_onnx(os.path.join(root, "model.onnx"))


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    itemsize = _FIXED_ITEMSIZE.get(tensor.data_type)
    return None if itemsize is None else math.prod(tensor.dims) * itemsize


def _check_onnx(model: bytes | str) -> None:
    """onnx.checker, before anything reads the nodes: a node with missing inputs, a string where an int
    attribute belongs, an unknown element type are all refused here."""
    import onnx

    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "invalid model"
        raise InvalidUpload(f"the ONNX model fails onnx.checker: {first_line}") from None


def _check_element_types(model: onnx.ModelProto) -> None:
    """onnx.checker accepts element types it does not know; everything downstream would choke on them."""
    import onnx

    known = set(onnx.TensorProto.DataType.values())
    typed = [(t.name, t.data_type) for t in model.graph.initializer]
    typed += [
        (v.name, v.type.tensor_type.elem_type)
        for v in [*model.graph.input, *model.graph.output]
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
    ]
    for name, element_type in typed:
        if element_type not in known:
            raise InvalidUpload(f"tensor {name!r} has element type {element_type}, which ONNX does not define")


def _describe_onnx(model: onnx.ModelProto, model_format: str) -> dict[str, Any]:
    """The model as every other part sees it: normalised (``sensitivity.normalize``), so its layers
    have the names the sensitivity analysis, the planner and the exporter give them. The opset and
    IR version are the file's; ``details.normalization`` says what normalisation changed."""
    from sensitivity.layers import find_layers

    _check_element_types(model)
    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        if len(values) > MAX_GRAPH_VALUES:
            raise InvalidUpload(f"the graph has {len(values)} {kind}; this service takes at most {MAX_GRAPH_VALUES}")
    ir_version = model.ir_version
    normalized = _normalized(model)
    model = normalized.model
    layers = _bounded_layers(find_layers(model))
    initializer_names = {init.name for init in model.graph.initializer}
    return {
        "format": model_format,
        "opset": normalized.source_opset,
        "details": {
            "ir_version": ir_version,
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "inputs": [_value_info(v) for v in model.graph.input if v.name not in initializer_names],
            "outputs": [_value_info(v) for v in model.graph.output],
            "node_count": len(model.graph.node),
            "normalization": normalized.to_dict(),
        },
        "layers": [
            {
                "name": layer.name,
                "op_type": layer.op_type,
                "node_name": layer.node_name,
                "scope": layer.scope,
                "shape": list(layer.shape),
                "num_params": layer.num_params,
            }
            for layer in layers
        ],
    }


def _normalized(model: onnx.ModelProto) -> NormalizedModel:
    """``normalize_model`` without samples: nothing is run here, an opset upgrade renames no layer,
    and the job checks the upgrade on its calibration data first. Refusals become InvalidUpload."""
    from sensitivity.normalize import normalize_model

    try:
        return normalize_model(model)
    except ValueError as error:  # AlreadyQuantizedError, OpsetUpgradeError
        raise InvalidUpload(str(error)) from None


def _bounded_layers(layers: list[Any]) -> list[Any]:
    if len(layers) > MAX_LAYERS:
        raise InvalidUpload(
            f"the model has {len(layers)} weight layers; this service plans at most {MAX_LAYERS} per model"
        )
    return layers


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    import onnx

    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else None
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t


def _inspect_zip(file: IO[bytes], limits: Limits) -> dict[str, Any]:
    try:
        archive = zipfile.ZipFile(file)
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise InvalidUpload(f"the zip archive is damaged: {error}") from None
    with archive:
        check_members(members, limits)
        if any(posixpath.basename(m.filename) == "archive_format" for m in members):
            return _inspect_pt2(file, limits)
        return _inspect_onnx_bundle(archive)


def check_members(members: list[zipfile.ZipInfo], limits: Limits) -> None:
    """An archive's directory, before any member is read: how many, where, how large unpacked, and
    how much smaller packed (a bomb unpacks to far more than it sent)."""
    if len(members) > limits.max_archive_members:
        raise InvalidUpload(f"the archive holds {len(members)} files; at most {limits.max_archive_members} allowed")
    total = sum(m.file_size for m in members)
    if total > limits.max_decompressed_bytes:
        raise InvalidUpload(
            f"the archive unpacks to {total} bytes, over the limit of {limits.max_decompressed_bytes} "
            "(MPQ_MAX_DECOMPRESSED_BYTES)"
        )
    for member in members:
        if not _safe_relative(member.filename):
            raise InvalidUpload(f"archive member {member.filename!r} points outside the archive")
        if member.file_size > RATIO_FLOOR_BYTES and member.file_size > MAX_COMPRESSION_RATIO * member.compress_size:
            raise InvalidUpload(
                f"archive member {member.filename!r} unpacks {member.file_size // member.compress_size}"
                f" times larger than it is packed (at most {MAX_COMPRESSION_RATIO}: a decompression "
                "bomb?); store it uncompressed (zip -0, numpy.savez)"
            )


def _safe_relative(name: str) -> bool:
    normalized = posixpath.normpath(name)
    return not (name.startswith(("/", "\\")) or normalized.startswith("..") or ":" in name or "\\" in name)


def _inspect_pt2(file: IO[bytes], limits: Limits) -> dict[str, Any]:
    if not limits.allow_torch:
        raise InvalidUpload("torch.export (.pt2) uploads are disabled on this server (MPQ_ALLOW_TORCH_UPLOADS=false)")
    summary = _check_pt2(file, limits.max_archive_members)
    model = summary.model("model")
    # the layers its ONNX export will have (sensitivity.torch_onnx), read off the checked program JSON:
    # the parameters used as weights of conv / linear / embedding calls, with the op and the FX call
    shapes = {entry.name: entry.shape for entry in model.parameters}
    layers = _bounded_layers([layer for layer in model.layers if len(shapes.get(layer.name, ())) >= 2])
    return {
        "format": "torch_export",
        "opset": None,
        "details": {
            "programs": list(summary.model_names),
            "inputs": [_pt2_value(value) for value in model.inputs],
            "outputs": [_pt2_value(value) for value in model.outputs],
            "node_count": model.node_count,
        },
        "layers": [
            {
                "name": layer.name,
                "op_type": layer.op_type,
                "node_name": layer.node_name,
                "scope": "",
                "shape": list(shapes[layer.name]),
                "num_params": math.prod(shapes[layer.name]),
            }
            for layer in layers
        ],
    }


def _pt2_value(value: ValueEntry) -> dict[str, Any]:
    return {"name": value.name, "dtype": value.dtype, "shape": None if value.shape is None else list(value.shape)}


def _check_pt2(file: IO[bytes], max_members: int = 4096) -> ArchiveSummary:
    """``sensitivity.pt2_archive.check_archive`` (static: nothing is unpickled or run), refusals as
    InvalidUpload naming the archive entry; the archive must hold the program mpq loads ("model")."""
    from sensitivity.pt2_archive import check_archive

    file.seek(0)
    try:
        summary = check_archive(file, max_members=max_members)
        summary.model("model")
    except ValueError as error:  # UnsafeArchive names the refused entry
        raise InvalidUpload(str(error)) from None
    return summary


def onnx_member(archive: zipfile.ZipFile) -> str:
    """The name of the bundle's one .onnx file (uploads with none or several are refused)."""
    members = [n for n in archive.namelist() if n.endswith(".onnx")]
    if len(members) != 1:
        raise InvalidUpload(
            f"a zip upload must hold exactly one .onnx file (and its external data); found {len(members)}"
        )
    return members[0]


def _inspect_onnx_bundle(archive: zipfile.ZipFile) -> dict[str, Any]:
    """An ONNX model and its external data, never unpacked: each external tensor must name a member
    of the archive and lie inside it; onnx.checker sees the data files as sparse placeholders of their
    declared sizes (it checks that they exist, not what they hold)."""
    import onnx

    name = onnx_member(archive)
    member = archive.getinfo(name)
    if member.file_size > MAX_PROTO_BYTES:
        raise InvalidUpload(f"{name!r} is {member.file_size} bytes; an ONNX protobuf holds at most {MAX_PROTO_BYTES}")
    data = archive.read(member)
    model = _parse_onnx(data)
    sizes = {m.filename: m.file_size for m in archive.infolist()}
    with tempfile.TemporaryDirectory(prefix="check-") as root:
        model_path = os.path.join(root, name)
        os.makedirs(os.path.dirname(model_path), exist_ok=True)
        with open(model_path, "wb") as copy:
            copy.write(data)
        for tensor in _all_tensors(model):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                _placeholder_for(tensor, name, sizes, root)
        _check_onnx(model_path)
    return _describe_onnx(model, "onnx_archive")


def _placeholder_for(tensor: onnx.TensorProto, model_member: str, sizes: dict[str, int], root: str) -> None:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    member = posixpath.normpath(posixpath.join(posixpath.dirname(model_member), location))
    if not location or location.startswith("/") or "\\" in location or not _safe_relative(member):
        raise InvalidUpload(f"tensor {tensor.name!r} points at external data {location!r} outside the upload")
    if member not in sizes:
        raise InvalidUpload(f"tensor {tensor.name!r} needs external data file {location!r}, missing from the upload")
    offset, length = _int_entry(tensor, entries, "offset"), _int_entry(tensor, entries, "length")
    end = offset + length
    if end > sizes[member]:
        raise InvalidUpload(
            f"tensor {tensor.name!r} reads bytes {offset}..{end} of {location!r}, which holds {sizes[member]}"
        )
    path = os.path.join(root, member)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab") as placeholder:
        placeholder.truncate(sizes[member])  # sparse: no disk space, whatever the declared size


def _int_entry(tensor: onnx.TensorProto, entries: dict[str, str], key: str) -> int:
    """An external-data offset or length (0 when absent: the length then is the whole file, checked
    by onnx.checker against the placeholder's size)."""
    if key not in entries:
        return 0
    value = entries[key]
    if not value.isdigit():
        raise InvalidUpload(f"tensor {tensor.name!r} has a non-numeric external-data {key} {value!r}")
    return int(value)


# ---------------------------------------------------------------- datasets


def inspect_dataset(file: IO[bytes], limits: Limits) -> dict[str, Any]:
    """Read the npz's array headers (never a pickle) and check they form a dataset; float arrays
    are also read, in chunks, for NaN and infinite values (``_non_finite``)."""
    if not zipfile.is_zipfile(file):
        raise InvalidUpload(
            "a dataset must be a complete .npz file (numpy.savez) with one array per model input; "
            "this upload is not one, or it is truncated"
        )
    try:
        archive = zipfile.ZipFile(file)
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise InvalidUpload(f"the .npz file is damaged: {error}") from None
    with archive:
        check_members(members, limits)
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
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(file)
        except (ValueError, OSError, SyntaxError, EOFError, zipfile.BadZipFile) as error:
            raise InvalidUpload(f"array {name!r} has no valid .npy header: {error}") from None
        header_size = file.tell()
        _check_kind(name, dtype)
        expected = header_size + math.prod(shape) * dtype.itemsize  # Python ints: a hostile shape cannot overflow
        if member.file_size != expected:
            raise InvalidUpload(
                f"array {name!r} has {member.file_size} bytes, but its header's shape {list(shape)} needs {expected}"
            )
        non_finite = _non_finite(file, tuple(shape), dtype, fortran_order)
    description: dict[str, Any] = {"shape": list(shape), "dtype": dtype.name}
    return description if non_finite is None else {**description, "non_finite": non_finite}


def _check_kind(name: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise InvalidUpload(f"array {name!r} holds Python objects (a pickle); only numeric arrays are accepted")
    if dtype.kind not in "biuf":
        raise InvalidUpload(f"array {name!r} has dtype {dtype}; only bool, integer and float arrays are accepted")


# Bytes of a float array read at a time for the finiteness check (the inspector's memory stays bounded).
FINITE_CHUNK_BYTES = 16 << 20


def _non_finite(
    file: IO[bytes], shape: tuple[int, ...], dtype: np.dtype[Any], fortran_order: bool
) -> dict[str, list[list[int]]] | None:
    """None when a float array holds only finite values (or is not float); else, for each axis,
    [how many indices along it hold a NaN or infinity somewhere, the first]: a job knows which axis
    holds an input's samples and words the error as the local run does (``non_finite_message``)."""
    if dtype.kind != "f" or math.prod(shape) == 0:
        return None
    if not shape or fortran_order:  # a scalar, or a rare Fortran-ordered array: read whole (bounded upload)
        data = np.frombuffer(file.read(), dtype).reshape(shape, order="F" if fortran_order else "C")
        masks = _bad_indices(~np.isfinite(data), shape, 0)
    else:
        row = math.prod(shape[1:]) * dtype.itemsize
        step = max(1, FINITE_CHUNK_BYTES // max(row, 1))
        masks = [np.zeros(size, bool) for size in shape]
        for start in range(0, shape[0], step):
            count = min(step, shape[0] - start)
            chunk = np.frombuffer(file.read(count * row), dtype).reshape((count, *shape[1:]))
            for axis, mask in enumerate(_bad_indices(~np.isfinite(chunk), shape, start)):
                masks[axis] |= mask
    if not shape:
        return {"axes": []} if masks else None
    if not masks[0].any():
        return None
    return {"axes": [[int(mask.sum()), int(np.flatnonzero(mask)[0])] for mask in masks]}


def _bad_indices(bad: npt.NDArray[np.bool_], shape: tuple[int, ...], start: int) -> list[npt.NDArray[np.bool_]]:
    """Per axis of the whole array, which indices hold a True of ``bad`` (rows ``start``... of it)."""
    if not shape:
        return [np.array([True])] if bool(bad) else []
    masks = []
    for axis, size in enumerate(shape):
        mask: npt.NDArray[np.bool_] = np.zeros(size, bool)
        hit: npt.NDArray[np.bool_] = np.asarray(np.moveaxis(bad, axis, 0).reshape(bad.shape[axis], -1).any(axis=1))
        if axis == 0:
            mask[start : start + len(hit)] = hit
        else:
            mask = hit
        masks.append(mask)
    return masks


def _describe_dataset(arrays: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The arrays' names, shapes and dtypes, and ``num_samples``: the first dim that every array of
    rank >= 1 shares (a rank-0 array is one value shared by every sample), or None when they differ.
    Which axis holds an input's samples is the model's to say (``sensitivity.samples``: silero-vad's
    state [2, N, 128] holds them on axis 1), so arrays are counted against the model when a job is
    submitted (``check_job_request``), not here."""
    if not arrays:
        raise InvalidUpload("the dataset holds no arrays")
    labels = arrays.get("labels")
    if labels is not None and (len(labels["shape"]) != 1 or not labels["dtype"].startswith(("int", "uint"))):
        raise InvalidUpload("'labels' must be a 1-D integer array of class indices")
    first_dims = {info["shape"][0] for info in arrays.values() if info["shape"]}
    num_samples = next(iter(first_dims)) if len(first_dims) == 1 else None
    return {"num_samples": num_samples, "has_labels": labels is not None, "arrays": arrays}


# ---------------------------------------------------------------- job requests


def check_job_request(
    file: IO[bytes],
    model_format: str,
    method: str,
    options: dict[str, Any],
    plan: dict[str, Any] | None,
    datasets: dict[str, dict[str, Any]],
    sample_axes: dict[str, int | None] | None = None,
) -> None:
    """Up-front checks of a sensitivity or plan request that need the libraries. Raises InvalidUpload.

    - the options build a valid analysis configuration; for plans, the whole request builds the
      worker's own PlanRequest (``plan_request``: what passes here is what the worker runs);
    - the datasets (role -> their stored array descriptions: "calibration", "evaluation") feed the
      model: the libraries' own checks (``planner.export.check_inputs``, ``sensitivity.samples``) on
      arrays of the stored shapes and dtypes, each input's samples on its sample axis (the model's
      declared shapes, ``sample_axes`` merged over them; a plan's are its own), so a mismatch reads
      as it does locally; a torch.export archive takes every array's samples on axis 0;
    - (ONNX) the model normalises (``sensitivity.normalize``: a quantized model is refused) and
      every op of the normalised model is supported by the interpreter;
    - (plans of an ONNX model) the candidates exist, and a size or BOPS budget is not below
      what the smallest configuration of those candidates achieves (BOPS only where static shape
      inference gives the layers' shapes: the model is never run here). A torch.export archive is
      exported to ONNX only in its job (exporting traces the program), which checks those there.
    """
    from service.inspection.model_files import PT2_SAMPLE_AXES, plan_request, sensitivity_config

    try:
        if plan is None:
            sensitivity_config(method, options)
        else:
            sample_axes = dict(plan_request(plan).sample_axes)
    except ValueError as error:
        raise InvalidUpload(str(error)) from None
    if model_format == "torch_export":
        # the archive is exported to ONNX in the job (sensitivity.torch_onnx): ops and budgets are checked there
        if sample_axes:
            raise InvalidUpload(PT2_SAMPLE_AXES)
        _check_pt2(file)  # again: an archive stored before today's checks existed must not reach a worker
        _check_datasets(None, datasets, None)
        return
    source = _load_model(file, model_format)
    _check_datasets(source, datasets, sample_axes)
    model = _normalized(source).model
    _check_supported_ops(model)
    if plan is not None:
        _check_plan(model, plan, datasets["calibration"])


def described_arrays(arrays: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """A stored dataset description ({name: {shape, dtype}}) as arrays of those shapes and dtypes that
    hold no data (one zero, broadcast: no memory whatever the shape). The libraries' input checks and
    sample counts read shapes and dtypes only, so they judge the upload as they judge the file locally."""
    return {
        name: np.broadcast_to(np.zeros((), np.dtype(info["dtype"])), tuple(info["shape"]))
        for name, info in arrays.items()
    }


def _check_datasets(
    model: onnx.ModelProto | None, datasets: dict[str, dict[str, Any]], sample_axes: dict[str, int | None] | None
) -> None:
    """Each dataset against the model (``model`` None: a torch.export archive, samples on axis 0), in the
    words of the local run: ``check_inputs`` as ``planner.plan`` calls it ("calibration set does not
    match the model inputs: ..."), and labels counted with the inputs' samples."""
    from planner.export import check_inputs
    from sensitivity.samples import input_sample_axes, sample_count

    try:
        for role, arrays in datasets.items():
            feeds = described_arrays(arrays)
            if model is not None:
                check_inputs(model, feeds, what=f"{role} set", sample_axes=sample_axes)
            axes = {} if model is None else input_sample_axes(model, sample_axes)
            if model is None or "labels" in feeds:
                sample_count(feeds, axes, what=f"{role} set")
            if role == "calibration":
                _refuse_non_finite(arrays, axes)
    except ValueError as error:
        raise InvalidUpload(str(error)) from None


def _refuse_non_finite(arrays: dict[str, dict[str, Any]], axes: dict[str, int | None]) -> None:
    """A calibration array with NaN or infinite values, refused at submission in the local run's
    words (it would make every sensitivity NaN; the upload recorded where, ``_non_finite``)."""
    from sensitivity.run import non_finite_message

    for name, info in arrays.items():
        found = info.get("non_finite")
        if found is None:
            continue
        axis = axes.get(name, 0)
        if axis is None or not found["axes"]:
            raise ValueError(non_finite_message(name, None, 0, 0, 0))
        bad, first = found["axes"][axis]
        raise ValueError(non_finite_message(name, axis, bad, info["shape"][axis], first))


def _load_model(file: IO[bytes], model_format: str) -> onnx.ModelProto:
    import onnx

    if model_format == "onnx_archive":
        with zipfile.ZipFile(file) as archive:
            return onnx.load_from_string(archive.read(onnx_member(archive)))
    return onnx.load_from_string(file.read())


def _check_supported_ops(model: onnx.ModelProto) -> None:
    from sensitivity.onnx_program import UnsupportedOpsError, check_supported

    try:
        check_supported(model)
    except UnsupportedOpsError as error:
        raise InvalidUpload(str(error)) from None


def _check_plan(model: onnx.ModelProto, plan: dict[str, Any], calibration: dict[str, Any]) -> None:
    """``model``: normalised; ``calibration``: the calibration dataset's stored array descriptions."""
    from planner.candidates import parse_candidates
    from planner.exclude import match_patterns
    from sensitivity.layers import find_layers

    try:  # a pattern matching no layer: refused now rather than by the job
        match_patterns(find_layers(model), plan.get("exclude") or ())
    except ValueError as error:
        raise InvalidUpload(str(error)) from None
    names = tuple(c.name for c in parse_candidates(plan["candidates"]))
    constraints = plan.get("constraints", {})
    if constraints.get("max_size_bytes") is not None:
        smallest = _smallest_size(model, names)
        if constraints["max_size_bytes"] < smallest:
            raise InvalidUpload(
                f"max_size_bytes {constraints['max_size_bytes']} is below the smallest "
                f"configuration of these candidates ({smallest} bytes)",
                code="infeasible",
            )
    if constraints.get("max_bops") is not None:
        fewest = _fewest_bops(model, _one_sample_shapes(model, calibration, plan.get("sample_axes")), names)
        if fewest is not None and constraints["max_bops"] < fewest:
            raise InvalidUpload(
                f"max_bops {constraints['max_bops']:g} is below the fewest BOPS of any "
                f"configuration of these candidates ({fewest:g} at batch size 1)",
                code="infeasible",
            )


def _one_sample_shapes(
    model: onnx.ModelProto,
    calibration: dict[str, Any],
    sample_axes: dict[str, int | None] | None,
) -> dict[str, tuple[int, ...]]:
    """The calibration arrays' shapes with one sample on each input's sample axis (shared inputs whole),
    as ``planner.plan`` counts BOPS (per sample)."""
    from planner.export import check_inputs
    from sensitivity.samples import input_sample_axes, one_sample_shapes

    try:
        axes = input_sample_axes(model, sample_axes)
        feeds = check_inputs(model, described_arrays(calibration), what="calibration set", sample_axes=axes)
    except ValueError as error:
        raise InvalidUpload(str(error)) from None
    return one_sample_shapes(feeds, axes)


def _smallest_size(model: onnx.ModelProto, names: tuple[str, ...]) -> int:
    from planner.cost import LayerCost, layer_size_bytes, unchanged_bytes
    from sensitivity.layers import find_layers

    layers = find_layers(model)
    costs = [
        LayerCost(layer.name, layer.op_type, 0, layer.num_params, layer.shape[layer.channel_axis]) for layer in layers
    ]
    other, graph = unchanged_bytes(model, {layer.name for layer in layers})  # as the planner counts them
    return other + graph + sum(min(layer_size_bytes(cost, name) for name in names) for cost in costs)


def _fewest_bops(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], names: tuple[str, ...]) -> int | None:
    from planner.cost import ShapesUnknown, layer_bops, layer_cost_table

    try:
        table = layer_cost_table(model, shapes, run_model=False)
    except ShapesUnknown:
        return None  # the job computes it, running the model inside its sandbox
    return sum(min(layer_bops(table[layer], name) for name in names) for layer in table)


# ---------------------------------------------------------------- the sandboxed process

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "model": inspect_model,
    "dataset": inspect_dataset,
    "job_request": check_job_request,
}


def answer(request: dict[str, Any], file: IO[bytes], limits: Limits) -> dict[str, Any]:
    """The reply to one request: the function's value, or the reason the upload is refused."""
    function = FUNCTIONS[request["function"]]
    try:
        job_request = request["function"] == "job_request"
        value = function(file, *request["args"]) if job_request else function(file, limits)
        return {"value": value}
    except InvalidUpload as error:
        return {"invalid": str(error), "code": error.code}
    except MemoryError:
        return {
            "invalid": "inspecting the upload needs more memory than the inspector's budget (MPQ_INSPECT_MEMORY_BYTES)",
            "code": "bad_input",
        }
    except Exception as error:  # a parser choking on hostile bytes: refused, and the traceback logged
        traceback.print_exc()
        return {
            "invalid": f"the upload could not be read ({type(error).__name__}: {str(error)[:200]})",
            "code": "bad_input",
        }


def main() -> None:
    from service.sandbox.child import enter_sandbox

    channel, _report = enter_sandbox()
    import onnx  # noqa: F401  (before the request arrives: a spare process is a warm one)

    if os.environ.get("MPQ_INSPECTOR_KIND") == "job":  # job requests build the libraries' configurations
        import planner.plan  # noqa: F401
        import sensitivity.onnx_program  # noqa: F401

    for _ in range(int(os.environ.get("MPQ_INSPECTOR_REQUESTS", "1"))):
        received = channel.receive()
        if received is None:
            return
        request, fds = received
        with os.fdopen(fds[0], "rb") as file:
            reply = answer(request, file, Limits(**request["limits"]))
        try:
            channel.send(reply)
        except ValueError:  # longer than the channel takes (service.inspection.inspector.MAX_REPLY_BYTES)
            channel.send(
                {
                    "invalid": f"the upload's description (names and shapes of its layers, inputs and "
                    f"outputs) exceeds {channel.max_frame_bytes} bytes of JSON",
                    "code": "bad_input",
                }
            )


if __name__ == "__main__":
    main()
