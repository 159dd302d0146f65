"""A small client for the mpq API, used by the remote CLI (``--server URL``) and the demo.

Uploads stream from disk and are skipped when the server already holds a file with the
same sha256; downloads are checked against the server's ETag (the artifact's sha256).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
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


class MpqClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MpqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ transport

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ApiError(0, f"cannot reach the server at {self._http.base_url}: {error}") from None
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text[:500]}
            raise ApiError(response.status_code, problem.get("detail") or response.text[:500], problem.get("code"))
        return response

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
        with path.open("rb") as body:
            response = self._request(
                "POST",
                route,
                params={"name": name or path.name},
                content=body,
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
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ApiError(0, f"job {job_id} did not finish within {timeout_s:.0f} s (still {job['status']})")
            time.sleep(poll_s)

    def get(self, path: str) -> Any:
        return self._request("GET", path).json()

    def download_artifact(self, plan_id: str, out: Path) -> str:
        """Stream the plan's artifact to ``out`` (atomically) and check it against the ETag."""
        digest = hashlib.sha256()
        partial = out.with_name(out.name + ".part")
        try:
            with self._http.stream("GET", f"/v1/plans/{plan_id}/artifact") as response:
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
