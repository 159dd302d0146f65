"""Blob downloads (service/api/transfer.blob_response): HEAD, single and multiple byte ranges (RFC 9110 §14),
on the API's and the dashboard's download routes."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib

import pytest

from service.api.transfer import MAX_RANGES
from tests.service import dashboard_data
from tests.service.helpers import assert_problem


@pytest.fixture
def rows(app) -> dashboard_data.DashboardData:
    return dashboard_data.insert(app)


def downloads(data: dashboard_data.DashboardData) -> dict[str, bytes]:
    """Every download route -> the bytes it serves."""
    chosen = dashboard_data.artifact_bytes(dashboard_data.CHOSEN_POINT)
    model = b"resnet-mini onnx bytes (the dashboard never opens them)\n" * 32  # dashboard_data._inputs
    dataset = b"calibration npz bytes\n" * 32
    return {
        f"/v1/models/{data.model_id}/file": model,
        f"/v1/datasets/{data.dataset_id}/file": dataset,
        f"/v1/plans/{data.plan_id}/artifact": chosen,
        f"/plans/{data.plan_id}/artifact": chosen,
        f"/plans/{data.plan_id}/points/2/artifact": dashboard_data.artifact_bytes(2),
        f"/models/{data.model_id}/file": model,
        f"/datasets/{data.dataset_id}/file": dataset,
    }


def test_head_has_the_headers_of_get_and_no_body(client, rows):
    for path, content in downloads(rows).items():
        assert hashlib.sha256(content).hexdigest() == client.get(path).headers["etag"].strip('"'), path
        get, head = client.get(path), client.head(path)
        assert head.status_code == 200, (path, head.status_code, head.text[:200])
        assert head.content == b""
        assert head.headers["content-length"] == str(len(content)) == get.headers["content-length"], path
        for name in ("etag", "content-type", "content-disposition", "accept-ranges"):
            assert head.headers[name] == get.headers[name], (path, name)
        ranged = client.head(path, headers={"Range": "bytes=0-9"})
        assert ranged.status_code == 206 and ranged.headers["content-length"] == "10" and ranged.content == b""
    assert client.head("/v1/models/" + "f" * 32 + "/file").status_code == 404


def test_head_stays_out_of_the_api_document(app):
    assert not [path for path, operations in app.openapi()["paths"].items() if "head" in operations]


def test_a_single_range_is_a_plain_206(client, rows):
    path, content = next(iter(downloads(rows).items()))
    for header, (start, end) in {
        "bytes=10-19": (10, 20),
        "bytes=-5": (len(content) - 5, len(content)),
        f"bytes={len(content) - 3}-": (len(content) - 3, len(content)),
        "bytes=0-9, 5-14, 15-29": (0, 30),  # overlapping and adjacent: coalesced
        f"bytes=0-10, {len(content) + 5}-": (0, 11),
    }.items():  # past the end: dropped
        response = client.get(path, headers={"Range": header})
        assert response.status_code == 206, (header, response.text[:200])
        assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{len(content)}"
        assert response.content == content[start:end], header


def parts_of(response) -> list[tuple[str, str, bytes]]:
    """(Content-Type, Content-Range, bytes) of each part of a multipart/byteranges body."""
    document = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode() + response.content
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(document)
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        parts.append((part["Content-Type"], part["Content-Range"], payload))
    return parts


def test_several_ranges_are_a_multipart_byteranges_206(client, rows):
    path = f"/v1/plans/{rows.plan_id}/artifact"
    content = downloads(rows)[path]
    size = len(content)
    response = client.get(path, headers={"Range": "bytes=100-199, -10, 0-9, 5-19"})
    assert response.status_code == 206, response.text[:300]
    assert response.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert int(response.headers["content-length"]) == len(response.content)
    expected = [(0, 20), (100, 200), (size - 10, size)]  # sorted, 0-9 and 5-19 coalesced
    assert parts_of(response) == [
        ("application/octet-stream", f"bytes {a}-{b - 1}/{size}", content[a:b]) for a, b in expected
    ]
    head = client.head(path, headers={"Range": "bytes=100-199, -10, 0-9, 5-19"})
    assert head.status_code == 206 and head.headers["content-length"] == response.headers["content-length"]


def test_too_many_ranges_get_the_whole_file(client, rows):
    path = f"/v1/plans/{rows.plan_id}/artifact"
    content = downloads(rows)[path]
    many = ", ".join(f"{10 * i}-{10 * i + 4}" for i in range(MAX_RANGES + 1))
    response = client.get(path, headers={"Range": f"bytes={many}"})
    assert response.status_code == 200 and response.content == content and "content-range" not in response.headers
    fewer = ", ".join(f"{10 * i}-{10 * i + 4}" for i in range(MAX_RANGES))
    assert len(parts_of(client.get(path, headers={"Range": f"bytes={fewer}"}))) == MAX_RANGES


def test_unsatisfiable_and_malformed_ranges_are_416(client, rows):
    path = f"/v1/models/{rows.model_id}/file"
    size = len(downloads(rows)[path])
    for header in (
        f"bytes={size}-",
        f"bytes={size + 10}-, {size + 20}-{size + 30}",
        "bytes=-0",
        "bytes=9-3",
        "bytes=a-b",
        "items=0-3",
        "bytes=",
        "bytes=0-1, x",
    ):
        response = client.get(path, headers={"Range": header})
        assert_problem(response, 416, "range")
        assert response.headers["content-range"] == f"bytes */{size}", header
