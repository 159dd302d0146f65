"""Builders of hostile and odd uploads, shared by the tests and bench/abuse.py."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from tests.models import tiny_onnx_model


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def external_model(location: str, offset: int = 0) -> tuple[onnx.ModelProto, bytes]:
    """The tiny model with its first weight moved to external data at ``location``; returns it and the data."""
    model = tiny_onnx_model()
    weight = model.graph.initializer[0]
    data = numpy_helper.to_array(weight).tobytes()
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    weight.ClearField("float_data")
    weight.ClearField("raw_data")
    return model, data


def npy_with_header(shape: tuple[int, ...], data: bytes = b"") -> bytes:
    """A float32 ``.npy`` header declaring ``shape``, followed by ``data`` (whatever the shape needs)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return header.getvalue() + data


def json_body(size: int) -> tuple[Iterator[bytes], dict[str, str]]:
    """A ``size``-byte JSON document, streamed from one 64 KiB chunk (the client holds no big buffer)."""
    head, tail, chunk = b'{"model_id": "', b'", "dataset_id": "x"}', b"a" * 65536
    filler = size - len(head) - len(tail)

    def chunks() -> Iterator[bytes]:
        yield head
        for offset in range(0, filler, len(chunk)):
            yield chunk[: min(len(chunk), filler - offset)]
        yield tail

    return chunks(), {"content-type": "application/json", "content-length": str(size)}


def inlining_bomb_model(depth: int) -> onnx.ModelProto:
    """One call of local function f{depth}, where f{k} calls f{k-1} twice: inlined, 2**(depth + 1) - 1
    nodes. Input x[n, 8]."""
    from onnx import helper

    domain, opset = "mpq.bench", [helper.make_opsetid("", 17)]
    imports = [*opset, helper.make_opsetid(domain, 1)]
    functions = [helper.make_function(domain, "f0", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])], opset)]
    for k in range(1, depth + 1):
        calls = [
            helper.make_node(f"f{k - 1}", ["x"], ["a"], domain=domain),
            helper.make_node(f"f{k - 1}", ["a"], ["b"], domain=domain),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ]
        functions.append(helper.make_function(domain, f"f{k}", ["x"], ["y"], calls, imports))
    graph = helper.make_graph(
        [helper.make_node(f"f{depth}", ["x"], ["y"], domain=domain)],
        "inlining_bomb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
    )
    model = helper.make_model(graph, opset_imports=imports, functions=functions)
    model.ir_version = 8
    return model
