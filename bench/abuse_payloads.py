"""Hostile payloads for bench/abuse.py, built in code and deterministic (zeros, spaces, fixed seeds).

Each builder writes one file under a directory of the caller's and returns its path. Large
members never sit in memory: a zip member of zeros is deflated as it is written (about 1,030 to 1),
and the near-1 GiB ONNX model is written as protobuf field by field, its weight streamed as zeros.
The tests' own builders are reused where they exist (tests/payloads.py, tests/pt2_archives.py).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.models import npz_bytes, tiny_onnx_model
from tests.payloads import external_model, inlining_bomb_model, npy_with_header, zip_bytes

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 16 * MiB
OPSET = [helper.make_opsetid("", 17)]


@dataclass(frozen=True)
class Filled:
    """A zip member of ``size`` bytes: ``prefix``, then ``fill`` repeated, deflated as it is written."""

    size: int
    fill: bytes = b"\0"
    prefix: bytes = b""


def write_zip(path: Path, members: Mapping[str, bytes | Filled]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            if isinstance(content, Filled):
                _write_filled(archive, name, content)
            else:
                archive.writestr(name, content)
    return path


def _write_filled(archive: zipfile.ZipFile, name: str, member: Filled) -> None:
    chunk = member.fill * (CHUNK // len(member.fill))
    with archive.open(name, "w", force_zip64=True) as out:
        out.write(member.prefix)
        left = member.size - len(member.prefix)
        while left > 0:
            out.write(chunk if left >= len(chunk) else chunk[:left])
            left -= len(chunk)


# ---------------------------------------------------------------- bombs


def bundle_bomb(directory: Path, unpacked: int) -> Path:
    """The tiny model with one weight in external data, beside a ``weights.bin`` of ``unpacked`` zeros."""
    model, _data = external_model("weights.bin")
    return write_zip(
        directory / "bundle-bomb.zip", {"model.onnx": model.SerializeToString(), "weights.bin": Filled(unpacked)}
    )


def pt2_json_bomb(directory: Path, unpacked: int) -> Path:
    """A .pt2 layout whose weight table (JSON) is ``unpacked`` spaces."""
    return write_zip(
        directory / "json-bomb.pt2",
        {"m/archive_format": b"pt2", "m/data/weights/model_weights_config.json": Filled(unpacked, b" ")},
    )


def pt2_pickled_weight(directory: Path) -> tuple[Path, Path]:
    """A real torch.export archive whose ``fc.weight`` is a pickle (``use_pickle: true``) that, once
    unpickled, touches the returned marker path. Imports torch (seconds)."""
    from tests.pt2_archives import pickled_weight, save_small_model

    markers = directory / "markers"
    markers.mkdir(exist_ok=True)
    markers.chmod(0o777)  # a sandboxed process running as another user could write it too
    archive, marker = directory / "pickled-weight.pt2", markers / "pickled-weight-MARKER"
    pickled_weight(save_small_model(directory / "small.pt2"), archive, marker)
    return archive, marker


def npz_bomb(directory: Path, unpacked: int) -> Path:
    """A valid npz whose one float32 array of zeros unpacks to ``unpacked`` bytes."""
    header = npy_with_header(((unpacked - 128) // 4,))
    return write_zip(directory / "bomb.npz", {"x.npy": Filled(len(header) + (unpacked - 128) // 4 * 4, prefix=header)})


def npz_shape_overflow(directory: Path) -> Path:
    """An npz whose array header declares shape (2**62, 4): its product overflows int64."""
    path = directory / "overflow.npz"
    path.write_bytes(zip_bytes({"x.npy": npy_with_header((2**62, 4))}))
    return path


# ---------------------------------------------------------------- legal but huge models


def many_layers_model(directory: Path, layers: int) -> Path:
    """x[1,2] through ``layers`` MatMul nodes, each with its own 2x2 identity weight: a legal model with
    as many layers as nodes (16 MB for 200,000)."""
    graph = onnx.GraphProto(name="many_layers")
    weight = np.eye(2, dtype=np.float32).tobytes()
    current = "x"
    for index in range(layers):
        initializer = graph.initializer.add()
        initializer.name, initializer.data_type, initializer.raw_data = f"w{index}", TensorProto.FLOAT, weight
        initializer.dims.extend([2, 2])
        node = graph.node.add()
        node.op_type, node.name = "MatMul", f"matmul{index}"
        node.input.extend([current, f"w{index}"])
        node.output.append(f"h{index}")
        current = f"h{index}"
    graph.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]))
    graph.output.append(helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, 2]))
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    path = directory / f"many-layers-{layers}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def write_big_model(path: Path, weight_bytes: int) -> Path:
    """x[1,side] @ W[side,side] with W float32 zeros of about ``weight_bytes``, written without holding W:
    the model's, the graph's and the tensor's other fields are serialised by onnx, and the
    length-delimited fields that enclose W (ModelProto.graph, GraphProto.initializer,
    TensorProto.raw_data) are written by hand around a stream of zeros."""
    side = int((weight_bytes / 4) ** 0.5)
    data_length = 4 * side * side
    tensor = TensorProto(name="big.weight", data_type=TensorProto.FLOAT, dims=[side, side])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big.weight"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, side])],
    )
    model = helper.make_model(onnx.GraphProto(), opset_imports=OPSET)
    model.ClearField("graph")
    tensor_head = tensor.SerializeToString() + _field_head(TensorProto, "raw_data", data_length)
    graph_head = (
        graph.SerializeToString()
        + _field_head(onnx.GraphProto, "initializer", len(tensor_head) + data_length)
        + tensor_head
    )
    with path.open("wb") as out:
        out.write(model.SerializeToString())
        out.write(_field_head(onnx.ModelProto, "graph", len(graph_head) + data_length) + graph_head)
        zeros = bytes(CHUNK)
        for start in range(0, data_length, CHUNK):
            out.write(zeros[: min(CHUNK, data_length - start)])
    return path


def _field_head(message: Any, field: str, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field of ``message``."""
    number = message.DESCRIPTOR.fields_by_name[field].number
    return _varint(number << 3 | 2) + _varint(length)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def big_model(directory: Path, size: int) -> Path:
    return write_big_model(directory / f"big-{size // MiB}MiB.onnx", size)


# ---------------------------------------------------------------- slow to inspect


def inlining_bomb(directory: Path, depth: int) -> Path:
    """``tests.payloads.inlining_bomb_model`` (~2.5 KB; depth 20 took 10 s and 1.1 GB to inline before
    the interpreter counted first, 22 ran past 3 GiB), written to a file."""
    path = directory / f"inlining-bomb-{depth}.onnx"
    path.write_bytes(inlining_bomb_model(depth).SerializeToString())
    return path


# ---------------------------------------------------------------- honest


def honest_model(seed: int) -> bytes:
    return tiny_onnx_model(seed).SerializeToString()


def honest_dataset() -> bytes:
    """x[16, 8] and labels: fits the tiny model and the inlining bomb."""
    rng = np.random.default_rng(0)
    return npz_bytes(x=rng.standard_normal((16, 8)).astype(np.float32), labels=rng.integers(0, 3, 16))
