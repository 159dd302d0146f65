"""The API client outlives a restarting server, honours its deadline, and keys a request the same
way on every run (service/cli/client.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from service.cli.client import BACKOFF_S, ApiError, GaveUp, MpqClient, idempotency_key


class FakeTime:
    """A clock that moves only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def client_answering(answers: Iterator[Callable[[httpx.Request], httpx.Response]], time_: FakeTime, **options):
    retries: list[str] = []
    client = MpqClient(
        "http://127.0.0.1:1",
        transport=httpx.MockTransport(lambda request: next(answers)(request)),
        sleep=time_.sleep,
        clock=time_.clock,
        on_retry=lambda reason, wait: retries.append(reason),
        **options,
    )
    return client, retries


def unavailable(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503, json={"detail": "restarting"})


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def job(status: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, json={"id": "j1", "status": status})


def test_5xx_and_connection_errors_are_retried_with_a_growing_capped_wait() -> None:
    time_ = FakeTime()
    answers = iter([unavailable, refused, unavailable, refused, refused, refused, refused, job("running")])
    client, retries = client_answering(answers, time_)
    assert client.job("j1")["status"] == "running"
    assert time_.sleeps == [*BACKOFF_S, BACKOFF_S[-1], BACKOFF_S[-1]][:7]
    assert retries[0] == "the server answered HTTP 503" and "cannot reach the server" in retries[1]


def test_an_outage_longer_than_the_limit_ends_in_the_servers_words_or_the_connection_error() -> None:
    time_ = FakeTime()
    client, _ = client_answering(iter([unavailable] * 100), time_, outage_s=10.0)
    with pytest.raises(ApiError, match=r"restarting \(HTTP 503\)"):
        client.job("j1")
    assert sum(time_.sleeps) <= 10.0
    client, _ = client_answering(iter([refused] * 100), FakeTime(), outage_s=10.0)
    with pytest.raises(ApiError, match="cannot reach the server"):
        client.job("j1")


def test_4xx_is_never_retried() -> None:
    time_ = FakeTime()
    answers = iter([lambda request: httpx.Response(404, json={"detail": "no job", "code": "not_found"})])
    client, retries = client_answering(answers, time_)
    with pytest.raises(ApiError, match="no job") as raised:
        client.job("j1")
    assert raised.value.code == "not_found" and retries == [] and time_.sleeps == []


def test_waiting_stops_at_the_deadline_and_names_the_job_left_running() -> None:
    time_ = FakeTime()
    client, _ = client_answering(iter([job("running")] * 100), time_, deadline=time_.now + 5.0)
    with pytest.raises(GaveUp, match="gave up waiting for job j1") as raised:
        client.wait("j1", poll_s=1.0)
    assert raised.value.job_id == "j1" and sum(time_.sleeps) <= 5.0


def test_the_idempotency_key_is_the_requests_own() -> None:
    body = {"model_id": "m", "dataset_id": "d", "options": {"seed": 0, "max_probes": 8}}
    key = idempotency_key("/v1/sensitivity", body, "token-a")
    assert key == idempotency_key("/v1/sensitivity", json.loads(json.dumps(body)), "token-a")
    assert key == idempotency_key("/v1/sensitivity", dict(reversed(list(body.items()))), "token-a")
    assert key != idempotency_key("/v1/sensitivity", {**body, "options": {"seed": 1}}, "token-a")
    assert key != idempotency_key("/v1/plans", body, "token-a")
    assert key != idempotency_key("/v1/sensitivity", body, "token-b")  # two users never share a job
    assert len(key) <= 200  # the API's limit on the header


@pytest.mark.slow
def test_timeout_bounds_the_whole_command_against_a_server_that_never_answers(tmp_path) -> None:
    """A server that accepts connections and stays silent (--timeout 10 took 66 s before): the
    command gives up at --timeout, with exit status 1 and one JSON document."""
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    model.write_bytes(b"not read: the server never answers the first request")
    data.write_bytes(b"")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nothing is ever read or answered
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [
                *(sys.executable, "-m", "service.cli", "sensitivity", str(model), "--data", str(data), "--json"),
                *("--server", f"http://127.0.0.1:{port}", "--timeout", "3"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert document["exit_code"] == 1 and "timeout" in document["error"]
    # the process's own start (imports) aside, the 3 s are honoured: nothing waits 60 s for a read
    assert elapsed < 3 + 30, elapsed


def test_a_rerun_attaches_to_a_running_job_but_not_to_a_failed_one() -> None:
    from service.cli.remote import _submit

    keys: list[str] = []
    statuses = iter(["failed", "cancelled", "queued"])

    def answer(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["idempotency-key"])
        return httpx.Response(200, json={"id": f"j{len(keys)}", "status": next(statuses)})

    client = MpqClient("http://127.0.0.1:1", "token", transport=httpx.MockTransport(answer))
    body = {"model_id": "m", "dataset_id": "d"}
    assert _submit(client, "/v1/sensitivity", body) == {"id": "j3", "status": "queued"}
    assert keys[0] == idempotency_key("/v1/sensitivity", body, "token") and len(set(keys)) == 3
    first_run, keys[:] = list(keys), []
    statuses = iter(["failed", "cancelled", "running"])
    assert _submit(client, "/v1/sensitivity", body)["status"] == "running"
    assert keys == first_run  # the same chain of keys on every run: a re-run finds the job the last one started
