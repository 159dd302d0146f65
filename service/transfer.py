"""Streaming uploads into the blob store and blob downloads (with ETag and Range)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import ClientDisconnect

from service.errors import Problem
from service.store import BlobStore, BlobTooLarge, BlobWriter

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


async def receive_upload(request: Request, store: BlobStore, max_bytes: int) -> BlobWriter:
    """Stream the request body into a temporary blob, never holding it in memory.

    Over the limit the stream is cut at once (413) and the partial file removed; a client
    that disconnects mid-upload leaves nothing behind either.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    writer = store.writer(max_bytes)
    try:
        async for chunk in request.stream():
            writer.write(chunk)
        writer.finish()
    except BlobTooLarge:
        writer.abort()
        raise _too_large(max_bytes) from None
    except ClientDisconnect:
        writer.abort()
        raise Problem(400, "the upload was interrupted before it finished; nothing was stored") from None
    except BaseException:
        writer.abort()
        raise
    if writer.size == 0:
        writer.abort()
        raise Problem(422, "the request body is empty: send the file's bytes as the body "
                           "(Content-Type: application/octet-stream)")
    return writer


def _too_large(max_bytes: int) -> Problem:
    return Problem(413, f"the upload exceeds the limit of {max_bytes} bytes (MPQ_MAX_UPLOAD_BYTES)",
                   headers={"Connection": "close"})


def blob_response(request: Request, store: BlobStore, sha256: str, filename: str, media_type: str) -> Response:
    """Serve a blob with its sha256 as ETag, honouring If-None-Match and a single Range."""
    size = store.size(sha256)
    headers = {
        "ETag": f'"{sha256}"',
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{_safe_filename(filename)}"',
    }
    if request.headers.get("if-none-match", "").strip('"') == sha256:
        return Response(status_code=304, headers=headers)
    start, end, status = 0, size, 200
    range_header = request.headers.get("range")
    if range_header:
        start, end = _parse_range(range_header, size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    body: Iterator[bytes] = store.read(sha256, start, end)
    return StreamingResponse(iterate_in_threadpool(body), status_code=status, media_type=media_type, headers=headers)


def _parse_range(header: str, size: int) -> tuple[int, int]:
    match = _RANGE.match(header.strip())
    unsatisfiable = Problem(416, f"cannot serve range {header!r} of a {size}-byte file",
                            headers={"Content-Range": f"bytes */{size}"})
    if not match or match.groups() == ("", ""):
        raise unsatisfiable
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        length = int(last)
        if length == 0:
            raise unsatisfiable
        return max(size - length, 0), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        raise unsatisfiable
    return start, end


def _safe_filename(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "download"
    return cleaned[:120]
