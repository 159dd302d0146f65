"""Streaming uploads into the blob store and blob downloads (with ETag and Range)."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import ClientDisconnect

from service.api.errors import Problem
from service.store.blobs import BlobStore, BlobTooLarge, BlobWriter

_RANGE_SPEC = re.compile(r"^(\d*)-(\d*)$")
MAX_RANGES = 16  # more (after coalescing) and the whole file is cheaper to send than the parts


@dataclass(frozen=True)
class UploadPace:
    """How slowly an upload may arrive: nothing at all for ``idle_timeout_s``, or less than
    ``min_bytes_per_s`` on average over any window of that length, and it is cut (408). The idle
    timeout alone let a client sending a byte every 29 s hold an upload slot for ever."""

    idle_timeout_s: float
    min_bytes_per_s: float = 0.0


async def receive_upload(
    request: Request, store: BlobStore, max_bytes: int, pace: UploadPace, slot: UploadSlot | None = None
) -> BlobWriter:
    """Stream the request body into a temporary blob, never holding it in memory.

    Over the limit the stream is cut at once (413) and the partial file removed; a client that
    disconnects, sends too slowly (``pace``: 408), or is shed to make room (``UploadSlots``: 503)
    leaves nothing behind either.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    writer = store.writer(max_bytes)
    try:
        async for chunk in _paced(request.stream(), pace):
            writer.write(chunk)
            if slot is not None:
                slot.received += len(chunk)
        writer.finish()
    except BlobTooLarge:
        writer.abort()
        raise _too_large(max_bytes) from None
    except _TooSlow as error:
        writer.abort()
        raise Problem(408, f"{error}; nothing was stored", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        writer.abort()
        raise Problem(400, "the upload was interrupted before it finished; nothing was stored") from None
    except asyncio.CancelledError:
        writer.abort()
        if slot is not None and slot.shed and _uncancel() == 0:
            raise Problem(
                503,
                f"every upload slot was taken and this upload was the slowest ({slot.rate():.0f} "
                "bytes/s): it was cut to make room; nothing was stored",
                headers={"Connection": "close", "Retry-After": "5"},
            ) from None
        raise
    except BaseException:
        writer.abort()
        raise
    if writer.size == 0:
        writer.abort()
        raise Problem(
            422, "the request body is empty: send the file's bytes as the body (Content-Type: application/octet-stream)"
        )
    return writer


class _TooSlow(Exception):
    pass


async def _paced(chunks: AsyncIterator[bytes], pace: UploadPace) -> AsyncIterator[bytes]:
    """The chunks, as long as they keep ``pace``."""
    iterator = chunks.__aiter__()
    window_start, window_bytes = time.monotonic(), 0
    while True:
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), pace.idle_timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _TooSlow(
                f"the upload sent nothing for {pace.idle_timeout_s:g} s (MPQ_UPLOAD_IDLE_TIMEOUT_S)"
            ) from None
        yield chunk
        window_bytes += len(chunk)
        elapsed = time.monotonic() - window_start
        if elapsed >= pace.idle_timeout_s:
            if window_bytes < pace.min_bytes_per_s * elapsed:
                raise _TooSlow(
                    f"the upload sent {window_bytes} bytes in {elapsed:.0f} s, less than "
                    f"{pace.min_bytes_per_s:g} bytes/s (MPQ_UPLOAD_MIN_BYTES_PER_S)"
                )
            window_start, window_bytes = time.monotonic(), 0


@dataclass
class UploadSlot:
    """One upload in progress: who sends it, the task receiving it, and how fast it comes."""

    client: str
    task: asyncio.Task[Any]
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    shed: bool = False

    def rate(self) -> float:
        return self.received / max(time.monotonic() - self.started, 1e-3)


class UploadSlots:
    """Uploads streaming at once, per client and in total: a client that opens hundreds of
    never-ending uploads gets 429 past its share instead of holding the server's connections,
    temporary files and inspectors. When every slot is taken, the slowest upload that has run
    ``shed_after_s`` below ``shed_below_bytes_per_s`` is cut (503) to make room: four tokens
    trickling a byte every 5 s held all 16 slots for a whole pace window (31 s) before.
    Counts live in one API process (each process has its own)."""

    def __init__(
        self, per_client: int, total: int, shed_below_bytes_per_s: float = 100 * 1024, shed_after_s: float = 0.5
    ) -> None:
        self.per_client = per_client
        self.total = total
        self.shed_below_bytes_per_s = shed_below_bytes_per_s
        self.shed_after_s = shed_after_s
        self._uploads: list[UploadSlot] = []

    @asynccontextmanager
    async def slot(self, client: str) -> AsyncIterator[UploadSlot]:
        if sum(upload.client == client for upload in self._uploads) >= self.per_client:
            raise Problem(
                429,
                f"this client already has {self.per_client} uploads in progress "
                "(MPQ_MAX_UPLOADS_PER_CLIENT); wait for one to finish",
                headers={"Retry-After": "5"},
            )
        if len(self._uploads) >= self.total and not self._shed_slowest():
            raise Problem(
                503,
                f"{self.total} uploads are already in progress (MPQ_MAX_CONCURRENT_UPLOADS); retry shortly",
                headers={"Retry-After": "5"},
            )
        task = asyncio.current_task()
        assert task is not None  # always, inside a coroutine
        upload = UploadSlot(client, task)
        self._uploads.append(upload)
        try:
            yield upload
        finally:
            if upload in self._uploads:
                self._uploads.remove(upload)

    def _shed_slowest(self) -> bool:
        now = time.monotonic()
        slow = [
            upload
            for upload in self._uploads
            if now - upload.started >= self.shed_after_s and upload.rate() < self.shed_below_bytes_per_s
        ]
        if not slow:
            return False
        slowest = min(slow, key=UploadSlot.rate)
        slowest.shed = True
        self._uploads.remove(slowest)  # its slot is free from now on
        slowest.task.cancel()
        return True


def _uncancel() -> int:
    """Take back the cancellation of the current task (shedding one upload must not cancel the rest
    of its request); the number of cancellations still pending."""
    task = asyncio.current_task()
    return task.uncancel() if task is not None else 0


def _too_large(max_bytes: int) -> Problem:
    return Problem(
        413,
        f"the upload exceeds the limit of {max_bytes} bytes (MPQ_MAX_UPLOAD_BYTES)",
        headers={"Connection": "close"},
    )


# blob_response's answers besides the whole file, for the routes' schemas (problem+json added by service/api/openapi.py)
DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}},
    206: {"description": "The byte ranges asked for (Range)", "content": {"application/octet-stream": {}}},
    304: {"description": "Not modified: If-None-Match names the file's ETag (its sha256)"},
    404: {"description": "No such file"},
    416: {"description": "The Range cannot be served"},
}


def blob_response(request: Request, store: BlobStore, sha256: str, filename: str, media_type: str) -> Response:
    """Serve a blob with its sha256 as ETag, honouring If-None-Match and Range (RFC 9110 §14).

    HEAD gets the headers GET would (Content-Length included) and no body. A single range is a plain
    206; several (after coalescing) are a ``multipart/byteranges`` 206, up to ``MAX_RANGES`` of them,
    beyond which the whole file is sent (200).
    """
    size = store.size(sha256)
    headers = {
        "ETag": f'"{sha256}"',
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{_safe_filename(filename)}"',
    }
    if request.headers.get("if-none-match", "").strip('"') == sha256:
        return Response(status_code=304, headers=headers)
    range_header = request.headers.get("range")
    ranges = _parse_range(range_header, size) if range_header else [(0, size)]
    status = 206 if range_header else 200
    if len(ranges) > MAX_RANGES:
        ranges, status = [(0, size)], 200
    if len(ranges) == 1:
        start, end = ranges[0]
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        body, length = store.read(sha256, start, end), end - start
    else:
        boundary = secrets.token_hex(16)
        body, length = _multipart(store, sha256, ranges, size, boundary, media_type)
        media_type = f"multipart/byteranges; boundary={boundary}"
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        return Response(status_code=status, media_type=media_type, headers=headers)
    return StreamingResponse(iterate_in_threadpool(body), status_code=status, media_type=media_type, headers=headers)


def _parse_range(header: str, size: int) -> list[tuple[int, int]]:
    """``bytes=a-b, c-, -n, ...`` -> sorted [start, end) ranges, overlapping and adjacent ones coalesced.

    Ranges that start past the end are dropped (RFC 9110 §14.1.1); none left, or a malformed header, is 416.
    """
    unit, _, specs = header.partition("=")
    unsatisfiable = Problem(
        416, f"cannot serve range {header[:200]!r} of a {size}-byte file", headers={"Content-Range": f"bytes */{size}"}
    )
    if unit.strip().lower() != "bytes" or not specs.strip():
        raise unsatisfiable
    ranges = []
    for spec in filter(None, (spec.strip() for spec in specs.split(","))):
        match = _RANGE_SPEC.match(spec)
        first, last = match.groups() if match else ("", "")
        if (first, last) == ("", "") or (first and last and int(last) < int(first)):
            raise unsatisfiable
        ranges.append(_satisfiable(first, last, size))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r is not None):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    if not merged:
        raise unsatisfiable
    return merged


def _satisfiable(first: str, last: str, size: int) -> tuple[int, int] | None:
    """One range-spec as [start, end) clipped to the file, or None if it selects nothing."""
    if first == "":  # suffix range: the last N bytes
        length = int(last)
        return (max(size - length, 0), size) if length > 0 and size > 0 else None
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    return (start, end) if start < size else None


def _multipart(
    store: BlobStore, sha256: str, ranges: list[tuple[int, int]], size: int, boundary: str, media_type: str
) -> tuple[Iterator[bytes], int]:
    """The body of a ``multipart/byteranges`` answer (RFC 9110 §14.6), streamed, and its length."""
    heads = [
        (
            f"--{boundary}\r\nContent-Type: {media_type}\r\nContent-Range: bytes {start}-{end - 1}/{size}\r\n\r\n"
        ).encode()
        for start, end in ranges
    ]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(head) + (end - start) + 2 for head, (start, end) in zip(heads, ranges)) + len(tail)

    def parts() -> Iterator[bytes]:
        for head, (start, end) in zip(heads, ranges):
            yield head
            yield from store.read(sha256, start, end)
            yield b"\r\n"
        yield tail

    return parts(), length


def _safe_filename(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "download"
    return cleaned[:120]
