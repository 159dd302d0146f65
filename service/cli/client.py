"""A small client for the mpq API, used by the remote CLI (``--server URL``) and the demo.

Uploads stream from disk and are skipped when the server already holds a file with the
same sha256; downloads are checked against the server's ETag (the artifact's sha256).

A CI client outlives a server restart: connection errors and 5xx answers are retried with a capped
backoff (every request it sends is safe to repeat: reads, uploads found by sha256 first, and job
submissions under an Idempotency-Key), until ``outage_s`` of failures in a row or the overall
``deadline``, which also bounds each request's connect and read timeouts.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from service.job_status import FINISHED


class ApiError(Exception):
    """The server answered with a problem document (or could not be reached)."""

    def __init__(self, status: int, detail: str, code: str | None = None) -> None:
        super().__init__(f"{detail} (HTTP {status})" if status else detail)
        self.status = status
        self.detail = detail
        self.code = code  # the problem document's machine-readable code, when it has one


class GaveUp(ApiError):
    """The overall deadline passed (``--timeout``); ``job_id`` names the job left running, if any."""

    def __init__(self, detail: str, job_id: str | None = None) -> None:
        super().__init__(0, detail, "timeout")
        self.job_id = job_id


# Waits between retries of a failed request, then the last one over and over: a restarting server
# (about 3 s for mpq serve here) is found again within a second or two of coming back.
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# Without --timeout: how long the server may stay unreachable (or answer 5xx) before the client gives up.
DEFAULT_OUTAGE_S = 300.0
REQUEST_TIMEOUT_S = 60.0


def idempotency_key(route: str, body: Mapping[str, Any], token: str | None) -> str:
    """The same request gets the same key on every run (the model and data are content-addressed on
    the server, so the body is too): a re-run attaches to the job its first run started instead of
    starting another. The token is part of it, so two users' identical requests never share a key."""
    who = hashlib.sha256((token or "").encode()).hexdigest()
    text = json.dumps([route, body, who], sort_keys=True, separators=(",", ":"))
    return "mpq-cli-" + hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _object(response: httpx.Response) -> dict[str, Any]:
    """The response's JSON object (a job); anything else is the server's mistake, said as such."""
    body = response.json()
    if not isinstance(body, dict):
        raise ApiError(response.status_code, f"the server answered a JSON {type(body).__name__}, not an object")
    return body


def _checked(response: httpx.Response) -> httpx.Response:
    """The response, or ApiError with the problem document's detail and code for a 4xx or 5xx."""
    if response.status_code >= 400:
        try:
            problem = response.json()
        except ValueError:
            problem = {"detail": response.text[:500]}
        raise ApiError(response.status_code, problem.get("detail") or response.text[:500], problem.get("code"))
    return response


class MpqClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout_s: float = REQUEST_TIMEOUT_S,
        deadline: float | None = None,
        outage_s: float = DEFAULT_OUTAGE_S,
        on_retry: Callable[[str, float], None] | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``deadline``: a ``time.monotonic()`` instant after which nothing is sent or waited for;
        ``on_retry(reason, wait_s)`` hears of each retry (the CLI prints it)."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )
        self._timeout_s = timeout_s
        self._deadline = deadline
        self._outage_s = outage_s
        self._on_retry = on_retry
        self._sleep = sleep
        self._clock = clock  # with sleep: a test's fake time
        self.token = token

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MpqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ transport

    def _remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - self._clock()

    def _request(self, method: str, path: str, upload: Path | None = None, **kwargs: Any) -> httpx.Response:
        """One request, retried on connection errors and 5xx (``upload``: a file sent as the body,
        reopened for each try)."""
        failing_since: float | None = None
        attempt = 0
        while True:
            remaining = self._remaining()
            if remaining is not None and remaining <= 0:
                raise GaveUp(f"gave up: --timeout passed before {method} {path} could finish")
            timeout = self._timeout_s if remaining is None else min(self._timeout_s, remaining)
            failed: httpx.Response | None = None
            try:
                response = self._send(method, path, upload, timeout, **kwargs)
            except httpx.TransportError as error:
                reason = f"cannot reach the server at {self._http.base_url}: {error or type(error).__name__}"
            else:
                if response.status_code < 500:
                    return _checked(response)
                reason, failed = f"the server answered HTTP {response.status_code}", response
            failing_since = failing_since or self._clock()
            wait = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            attempt += 1
            remaining = self._remaining()
            out_of_time = remaining is not None and remaining <= wait
            if out_of_time or self._clock() - failing_since + wait > self._outage_s:
                if failed is not None:
                    return _checked(failed)  # raises, with what the server's problem document says
                raise GaveUp(f"gave up: --timeout passed ({reason})") if out_of_time else ApiError(0, reason)
            if self._on_retry is not None:
                self._on_retry(reason, wait)
            self._sleep(wait)

    def _send(self, method: str, path: str, upload: Path | None, timeout: float, **kwargs: Any) -> httpx.Response:
        if upload is None:
            return self._http.request(method, path, timeout=timeout, **kwargs)
        with upload.open("rb") as body:
            return self._http.request(method, path, content=body, timeout=timeout, **kwargs)

    # ------------------------------------------------------------ registry

    def upload_model(self, path: Path, name: str | None = None) -> dict[str, Any]:
        return self._upload("/v1/models", path, name)

    def upload_dataset(self, path: Path, name: str | None = None) -> dict[str, Any]:
        return self._upload("/v1/datasets", path, name)

    def _upload(self, route: str, path: Path, name: str | None) -> dict[str, Any]:
        sha256 = file_sha256(path)
        existing = self._request("GET", route, params={"sha256": sha256, "limit": 1}).json()["items"]
        if existing:
            return {**existing[0], "reused": True}
        response = self._request(
            "POST",
            route,
            upload=path,
            params={"name": name or path.name},
            headers={"content-type": "application/octet-stream"},
        )
        return {**response.json(), "reused": False}

    # ------------------------------------------------------------ jobs

    def submit(self, route: str, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        key = idempotency_key or uuid.uuid4().hex  # a retried POST of this call never starts twice
        return _object(self._request("POST", route, json=body, headers={"Idempotency-Key": key}))

    def job(self, job_id: str) -> dict[str, Any]:
        return _object(self._request("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return _object(self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait(
        self,
        job_id: str,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 1.0,
    ) -> dict[str, Any]:
        """Poll the job until it finishes; GaveUp (naming the job) when the client's deadline passes first."""
        while True:
            try:
                job = self.job(job_id)
            except GaveUp:
                raise GaveUp(f"gave up waiting for job {job_id}: --timeout passed", job_id) from None
            if on_progress is not None:
                on_progress(job)
            if job["status"] in FINISHED:
                return job
            remaining = self._remaining()
            if remaining is not None and remaining <= poll_s:
                raise GaveUp(f"gave up waiting for job {job_id} (still {job['status']}): --timeout passed", job_id)
            self._sleep(poll_s)

    def get(self, path: str) -> Any:
        return self._request("GET", path).json()

    def download_artifact(self, plan_id: str, out: Path) -> str:
        """Stream the plan's artifact to ``out`` (atomically) and check it against the ETag."""
        digest = hashlib.sha256()
        partial = out.with_name(out.name + ".part")
        try:
            remaining = self._remaining()
            timeout = self._timeout_s if remaining is None else max(0.001, min(self._timeout_s, remaining))
            with self._http.stream("GET", f"/v1/plans/{plan_id}/artifact", timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(response.status_code, response.json().get("detail", response.text))
                expected = response.headers.get("etag", "").strip('"')
                with partial.open("wb") as file:
                    for chunk in response.iter_bytes():
                        digest.update(chunk)
                        file.write(chunk)
        except httpx.TransportError as error:
            partial.unlink(missing_ok=True)
            raise ApiError(0, f"download interrupted: {error}") from None
        if expected and digest.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            raise ApiError(0, f"downloaded artifact has sha256 {digest.hexdigest()}, the server said {expected}")
        partial.replace(out)
        return digest.hexdigest()
