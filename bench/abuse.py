"""Abuse: bombs, floods and slow clients against a real `mpq serve`, and what each costs the server.

Each attack gets a fresh server (127.0.0.1 only, a free port, a copy of one upgraded temporary data
directory, MPQ_AUTH=token by default, every other setting at its default). After a warm-up (an
honest model and dataset uploaded, one job request checked, so the inspectors and lazy imports
are paid) the attack runs, bounded in count and time, while a sampler reads the RSS of the API
process and of its children (inspectors, job processes) every 20 ms. Once the attack's load is in
place (its hostile body sent, its connections open), a separate client with its own token times
one honest `GET /healthz` and one honest upload of a tiny model; another pings /healthz every
0.2 s throughout, to catch the event loop stalling at other moments.

Printed per attack: the status codes the attack's own requests got, the API's RSS growth (peak -
baseline after the warm-up), the largest single child's peak RSS, and the honest requests' times;
at the end a markdown table. Targets: API RSS growth < 100 MB under every attack; honest requests
(the two timed ones and every ping) answered in < 2 s.

    .venv/bin/python bench/abuse.py [--quick] [--only NAME ...] [--auth token|off] [--list]

--quick runs everything smaller: about 4 minutes instead of 7-10 on 2 cores, most of it each server's
start and warm-up (about 10 s: the job-request inspector imports torch). With --auth off every
client, the honest one included, is the same address, and shares its upload slots (docs/security.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/, comes first

import argparse
import os
import platform
import resource
import select
import selectors
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from bench import abuse_payloads as payloads
from bench.server import HOST, PeakRss, Server, create_token, server_env, start_server, stop_server, upgrade_database
from tests.payloads import json_body

MB = 1e6
MiB, GiB = payloads.MiB, payloads.GiB
TARGET_GROWTH_MB = 100
TARGET_HONEST_S = 2.0
HONEST_TIMEOUT_S = 60.0  # longer than the inspector queue's 30 s, so that its 503 is seen


@dataclass(frozen=True)
class Scale:
    bundle_bomb_bytes: int = 3 * GiB
    json_bomb_bytes: int = 3 * GiB // 2
    npz_bomb_bytes: int = 2 * GiB
    layers: int = 600_000  # its description (~56 MB of JSON) stays under the inspector reply bound, 64 MiB
    big_model_bytes: int = GiB
    body_bytes: int = 200 * 1000**2
    flood_uploads: int = 600
    flood_hold_s: float = 35.0  # past MPQ_UPLOAD_IDLE_TIMEOUT_S (30 s)
    half_headers: int = 1100
    half_hold_s: float = 14.0  # past MPQ_HEADER_TIMEOUT_S (10 s)
    slow_uploads: int = 8
    trickle_interval_s: float = 5.0
    slow_hold_s: float = 40.0  # past the idle timeout: a byte every 5 s is never idle
    option_rounds: int = 5
    inlining_depth: int = 22  # past the inspector's 3 GiB


FULL = Scale()
QUICK = Scale(
    bundle_bomb_bytes=256 * MiB,
    json_bomb_bytes=256 * MiB,
    npz_bomb_bytes=256 * MiB,
    layers=20_000,
    big_model_bytes=128 * MiB,
    body_bytes=20 * 1000**2,
    flood_uploads=100,
    flood_hold_s=5.0,
    half_headers=200,
    half_hold_s=11.0,
    slow_hold_s=6.0,
    trickle_interval_s=2.0,
    option_rounds=1,
    inlining_depth=19,
)  # 19: the op check passes after a few seconds; the job is cancelled


# ---------------------------------------------------------------- what one attack reports


@dataclass
class Timing:
    """One honest request: seconds to its answer and its status (or the error that ended it)."""

    seconds: float | None = None
    status: str = "not sent"
    expected: str = "200"

    @property
    def ok(self) -> bool:
        return self.status == self.expected and self.seconds is not None and self.seconds < TARGET_HONEST_S

    def __str__(self) -> str:
        if self.seconds is None:
            return self.status
        if self.status == self.expected:
            return f"{self.seconds:.2f}"
        return f"{self.status} after {self.seconds:.1f}"


@dataclass
class Outcome:
    answers: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def answered(self, status: object, note: str | None = None) -> None:
        self.answers[str(status)] += 1
        if note:
            self.notes.append(note)


@dataclass
class Row:
    attack: str
    outcome: Outcome
    growth_mb: float
    baseline_mb: float
    child_peak_mb: float
    children_peak_mb: float
    healthz: Timing
    upload: Timing
    worst_ping_s: float  # the pinger's slowest /healthz: honest requests at other moments
    seconds: float

    @property
    def met(self) -> bool:
        return self.verdict() == "yes"

    def verdict(self) -> str:
        misses = []
        if self.growth_mb >= TARGET_GROWTH_MB:
            misses.append(f"API +{self.growth_mb:.0f} MB")
        misses += [
            f"{what} {timing}" for what, timing in (("healthz", self.healthz), ("upload", self.upload)) if not timing.ok
        ]
        if self.worst_ping_s >= TARGET_HONEST_S:
            misses.append(f"a /healthz ping took {self.worst_ping_s:.1f} s")
        return "yes" if not misses else "**no**: " + ", ".join(misses)


def answers_text(answers: Counter[str]) -> str:
    return ", ".join(f"{status} ×{count}" for status, count in answers.most_common()) or "none"


# ---------------------------------------------------------------- the honest client


class HonestProbe:
    """One honest GET /healthz, then one honest upload of a tiny model, from a client of its own,
    in a thread started once (by the attack, when its load is in place)."""

    def __init__(self, url: str, headers: dict[str, str], seed: int) -> None:
        self.url, self.headers, self.seed = url, headers, seed
        self.healthz = Timing(expected="200")
        self.upload = Timing(expected="201")
        self._thread = threading.Thread(target=self._run, daemon=True, name="honest")
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if not self._thread.is_alive() and self._thread.ident is None:
                self._thread.start()

    def wait(self) -> None:
        self.start()
        self._thread.join(timeout=2 * HONEST_TIMEOUT_S + 10)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=HONEST_TIMEOUT_S) as client:
            self.healthz, _ = timed(lambda: client.get("/healthz"), "200")
            model = payloads.honest_model(self.seed)
            self.upload, _ = timed(
                lambda: client.post(
                    "/v1/models?name=honest", content=model, headers={"content-type": "application/octet-stream"}
                ),
                "201",
            )


class Pinger(threading.Thread):
    """GET /healthz every ``interval_s`` on one kept-alive connection for as long as the attack runs: its
    worst time shows the API's event loop stalling between the two honest requests' moments."""

    def __init__(self, url: str, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True, name="pinger")
        self.url, self.interval_s = url, interval_s
        self.times: list[float] = []
        self.failures = 0
        self._done = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._done.is_set():
                timing, _ = timed(lambda: client.get("/healthz"), "200")
                self.times.append(timing.seconds or 0.0)
                self.failures += timing.status != "200"
                self._done.wait(self.interval_s)

    def __enter__(self) -> Pinger:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self.join(timeout=35)

    def summary(self) -> str:
        if not self.times:
            return "no pings"
        return (
            f"/healthz every {self.interval_s:g} s: worst {max(self.times):.2f} s, median "
            f"{statistics.median(self.times) * 1000:.0f} ms over {len(self.times)}, {self.failures} failed"
        )


def timed(request: Callable[[], httpx.Response], expected: str) -> tuple[Timing, httpx.Response | None]:
    started = time.perf_counter()
    try:
        response = request()
    except httpx.HTTPError as error:
        return Timing(time.perf_counter() - started, type(error).__name__, expected), None
    return Timing(time.perf_counter() - started, str(response.status_code), expected), response


# ---------------------------------------------------------------- the server under attack


@dataclass
class Tokens:
    honest: str | None
    attackers: Sequence[str | None]


def bearer(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


@dataclass
class Context:
    server: Server
    work: Path  # where payloads are written
    scale: Scale
    tokens: Tokens
    probe: HonestProbe
    model_id: str = ""  # the honest model and dataset of the warm-up
    dataset_id: str = ""

    @property
    def attacker(self) -> dict[str, str]:
        return bearer(self.tokens.attackers[0])

    def client(self, timeout_s: float = 300.0, token: str | None = None) -> httpx.Client:
        """A client with the first attacker's token, or ``token``."""
        headers = bearer(token) if token else self.attacker
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=timeout_s)


def make_template(root: Path, auth: str, attackers: int) -> Tokens:
    """An upgraded data directory under ``root`` (copied for each attack's server) and its tokens."""
    env = server_env(root)
    upgrade_database(env)
    if auth == "off":
        return Tokens(None, [None] * attackers)
    names = ["honest", *(f"attacker-{index}" for index in range(attackers))]
    with ThreadPoolExecutor(len(names)) as pool:
        honest, *hostile = pool.map(lambda name: create_token(env, name), names)
    return Tokens(honest, hostile)


def warm_up(context: Context) -> None:
    """Pay the first requests' costs: an upload (inspector, onnx), a dataset, a job request's check
    (the inspector that loads torch; options refused, so no job runs)."""
    with context.client(token=context.tokens.honest) as client:
        model = client.post("/v1/models?name=warm-up", content=payloads.honest_model(0))
        dataset = client.post("/v1/datasets?name=warm-up", content=payloads.honest_dataset())
        if model.status_code != 201 or dataset.status_code != 201:
            raise RuntimeError(f"warm-up uploads failed: {model.text[:200]} {dataset.text[:200]}")
        context.model_id, context.dataset_id = model.json()["id"], dataset.json()["id"]
        check = client.post(
            "/v1/sensitivity",
            json={"model_id": context.model_id, "dataset_id": context.dataset_id, "options": {"max_probes": 1}},
        )
        if check.status_code != 422:
            raise RuntimeError(f"warm-up job request: expected 422, got {check.status_code} {check.text[:200]}")
        client.get("/healthz")
    time.sleep(2.0)  # the inspectors' spares are started again


# ---------------------------------------------------------------- attacks


@dataclass(frozen=True)
class Attack:
    name: str
    what: str
    prepare: Callable[[Path, Scale], Any]  # -> the payload, before the server starts
    run: Callable[[Context, Any], Outcome]
    budget_s: float = 180.0  # wall clock, after which the server is stopped under it


def upload_file(
    context: Context, route: str, path: Path, outcome: Outcome, start_probe: bool = True
) -> httpx.Response | None:
    """POST the file as a raw body; the honest probe starts once its last byte is sent (the server
    is then inspecting it)."""

    def body() -> Iterator[bytes]:
        with path.open("rb") as file:
            while chunk := file.read(MiB):
                yield chunk
        if start_probe:
            context.probe.start()

    try:
        with context.client() as client:
            response = client.post(route, content=body(), headers={"content-type": "application/octet-stream"})
    except httpx.HTTPError as error:
        outcome.answered(type(error).__name__)
        return None
    detail = response.json().get("detail", "") if response.status_code >= 400 else ""
    outcome.answered(
        response.status_code, f"{path.name} ({path.stat().st_size / MB:.1f} MB): {response.status_code} {detail[:160]}"
    )
    return response


def upload_attack(route: str, build: Callable[[Path, Scale], Path]) -> tuple[Callable, Callable]:
    """(prepare, run) of an attack that uploads the one file ``build`` writes."""

    def run(context: Context, path: Path) -> Outcome:
        outcome = Outcome()
        upload_file(context, route, path, outcome)
        return outcome

    return build, run


def prepare_pickled(work: Path, _scale: Scale) -> tuple[Path, Path]:
    return payloads.pt2_pickled_weight(work)


def run_pickled(context: Context, payload: tuple[Path, Path]) -> Outcome:
    archive, marker = payload
    outcome = Outcome()
    upload_file(context, "/v1/models", archive, outcome)
    outcome.notes.append(f"payload marker {'WRITTEN' if marker.exists() else 'never written'}")
    return outcome


# ------------------------------------------------ raw sockets: bodies, floods, slow clients


def request_head(context: Context, method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {HOST}:{context.server.port}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(data: bytes) -> str:
    parts = data.split(b" ", 2)
    return parts[1].decode() if data.startswith(b"HTTP/") and len(parts) > 1 else "garbled"


def send_body(context: Context, head: bytes, chunks: Iterable[bytes]) -> tuple[str, int, int | None, float]:
    """Send the request head and the whole body before reading anything; (status or what ended it, body
    bytes sent, body bytes sent when the answer became readable, seconds)."""
    started, sent, answered_at = time.perf_counter(), 0, None
    with socket.create_connection((HOST, context.server.port), timeout=60) as connection:
        try:
            connection.sendall(head)
            for chunk in chunks:
                if answered_at is None and select.select([connection], [], [], 0)[0]:
                    answered_at = sent
                connection.sendall(chunk)
                sent += len(chunk)
            answer = connection.recv(65536)
            status = status_of(answer) if answer else "closed"
        except OSError as error:  # the server closed the connection while the body streamed
            status = f"cut ({type(error).__name__})"
    return status, sent, answered_at, time.perf_counter() - started


def chunked(chunks: Iterable[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        yield f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    yield b"0\r\n\r\n"


def run_bodies(context: Context, _payload: None) -> Outcome:
    """4 unauthenticated JSON bodies of body_bytes at once (each sent whole before its answer is read),
    one to /login, and one authenticated chunked one (no Content-Length: counted as it streams)."""
    size = context.scale.body_bytes
    jobs: list[tuple[str, bytes, Iterable[bytes]]] = []
    for index in range(4):
        chunks, headers = json_body(size)
        head = request_head(context, "POST", "/v1/sensitivity", headers)
        jobs.append((f"unauthenticated #{index + 1}", head, chunks))
    chunks, headers = json_body(size)
    jobs.append(
        (
            "/login",
            request_head(context, "POST", "/login", {**headers, "content-type": "application/x-www-form-urlencoded"}),
            chunks,
        )
    )
    chunks, headers = json_body(size)
    del headers["content-length"]
    jobs.append(
        (
            "authenticated, chunked",
            request_head(
                context, "POST", "/v1/sensitivity", {**headers, "transfer-encoding": "chunked", **context.attacker}
            ),
            chunked(chunks),
        )
    )
    outcome = Outcome()
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(send_body, context, head, chunks) for _name, head, chunks in jobs]
        time.sleep(0.3)
        context.probe.start()
        for (name, _head, _chunks), future in zip(jobs, futures):
            status, sent, answered_at, seconds = future.result(timeout=300)
            when = "never" if answered_at is None else f"after {answered_at / MB:.1f} MB"
            outcome.answered(
                status,
                f"{name}: {status}, readable {when}; {sent / MB:.0f} of {size / MB:.0f} MB "
                f"sent (the server read them) in {seconds:.1f} s",
            )
    return outcome


@dataclass
class Connection:
    socket: socket.socket
    opened: float
    status: str | None = None  # the first answer's status, or "closed" (EOF without an answer)
    answered_after: float | None = None


def open_connections(context: Context, count: int, head: bytes, body_start: bytes = b"") -> list[Connection]:
    connections = []
    for _ in range(count):
        sock = socket.create_connection((HOST, context.server.port), timeout=10)
        sock.sendall(head + body_start)
        sock.setblocking(False)
        connections.append(Connection(sock, time.monotonic()))
    return connections


def watch(connections: list[Connection], hold_s: float, trickle_s: float | None = None) -> None:
    """Read the connections' first answers (or EOF) for ``hold_s``; with ``trickle_s``, send one body
    byte on each unanswered connection that often."""
    selector = selectors.DefaultSelector()
    for connection in connections:
        selector.register(connection.socket, selectors.EVENT_READ, connection)
    deadline, next_trickle = time.monotonic() + hold_s, time.monotonic() + (trickle_s or hold_s)
    while selector.get_map() and time.monotonic() < deadline:
        for key, _events in selector.select(timeout=0.2):
            _read_answer(key.data)
            selector.unregister(key.fileobj)
        if trickle_s and time.monotonic() >= next_trickle:
            next_trickle += trickle_s
            for key in list(selector.get_map().values()):
                _trickle(key.data, selector)
    selector.close()


def _read_answer(connection: Connection) -> None:
    try:
        data = connection.socket.recv(4096)
    except OSError:
        data = b""
    connection.status = status_of(data) if data else "closed"
    connection.answered_after = time.monotonic() - connection.opened


def _trickle(connection: Connection, selector: selectors.BaseSelector) -> None:
    try:
        connection.socket.send(b"x")
    except OSError:
        connection.status, connection.answered_after = "closed", time.monotonic() - connection.opened
        selector.unregister(connection.socket)


def summarize(connections: list[Connection], hold_s: float, outcome: Outcome) -> None:
    """Count the answers, note when each kind came, and close every connection."""
    waits: dict[str, list[float]] = {}
    for connection in connections:
        status = connection.status or f"no answer in {hold_s:.0f} s"
        outcome.answered(status)
        if connection.answered_after is not None:
            waits.setdefault(status, []).append(connection.answered_after)
        connection.socket.close()
    for status, seconds in sorted(waits.items()):
        outcome.notes.append(
            f"{status}: after {min(seconds):.1f}-{max(seconds):.1f} s (median {statistics.median(seconds):.1f} s)"
        )


def flood(
    context: Context, count: int, head: bytes, hold_s: float, body_start: bytes = b"", trickle_s: float | None = None
) -> Outcome:
    outcome = Outcome()
    started = time.monotonic()
    connections = open_connections(context, count, head, body_start)
    outcome.notes.append(f"{count} connections opened in {time.monotonic() - started:.1f} s")
    context.probe.start()
    watch(connections, hold_s, trickle_s)
    summarize(connections, hold_s, outcome)
    return outcome


def upload_head(context: Context, token: str | None, length: int) -> bytes:
    return request_head(
        context,
        "POST",
        "/v1/models?name=flood",
        {"content-type": "application/octet-stream", "content-length": str(length), **bearer(token)},
    )


def run_upload_flood(context: Context, _payload: None) -> Outcome:
    """Never-ending uploads: headers declaring 1 GiB, 16 bytes of body, then nothing."""
    scale = context.scale
    head = upload_head(context, context.tokens.attackers[0], GiB)
    return flood(context, scale.flood_uploads, head, scale.flood_hold_s, body_start=bytes(16))


def run_half_headers(context: Context, _payload: None) -> Outcome:
    head = f"GET /healthz HTTP/1.1\r\nHost: {HOST}:{context.server.port}\r\nX-Slow: ".encode()
    return flood(context, context.scale.half_headers, head, context.scale.half_hold_s)


def slow_uploads(count: Callable[[Scale], int], tokens: int) -> Callable[[Context, None], Outcome]:
    """Uploads that trickle one byte every trickle_interval_s, spread over ``tokens`` attacker tokens."""

    def run(context: Context, _payload: None) -> Outcome:
        scale = context.scale
        outcome = Outcome()
        connections: list[Connection] = []
        for index in range(count(scale)):
            token = context.tokens.attackers[index % tokens]
            connections += open_connections(context, 1, upload_head(context, token, MiB), b"x")
        outcome.notes.append(
            f"{count(scale)} uploads from {tokens} token(s), 1 byte every {scale.trickle_interval_s:g} s"
        )
        time.sleep(1.0)
        context.probe.start()
        watch(connections, scale.slow_hold_s, scale.trickle_interval_s)
        summarize(connections, scale.slow_hold_s, outcome)
        return outcome

    return run


# ------------------------------------------------ job requests


EXTREME_OPTIONS = [
    {"max_probes": 10**9},
    {"max_probes": 1e9},
    {"batch_size": 10**12},
    {"batch_size": 1e12},
    {"seed": 2**80},
    {"tolerance": 0.0},
]
EXTREME_PLAN_OPTIONS = [
    {"trace_max_probes": 10**9, "batch_size": 10**12},
    {"trace_max_probes": 1e9},
    {"batch_size": 1e12},
]


def run_extreme_options(context: Context, _payload: None) -> Outcome:
    ids = {"model_id": context.model_id}
    bodies = [
        ("/v1/sensitivity", {**ids, "dataset_id": context.dataset_id, "options": options})
        for options in EXTREME_OPTIONS
    ]
    bodies += [
        (
            "/v1/plans",
            {
                **ids,
                "calibration_dataset_id": context.dataset_id,
                "method": "hawq_v2",
                "search": "pareto",
                "candidates": ["fp32", "w8a8"],
                "constraints": {"max_size_bytes": 10**6},
                "options": options,
            },
        )
        for options in EXTREME_PLAN_OPTIONS
    ]
    outcome = Outcome()
    with context.client(60) as client:
        for round_ in range(context.scale.option_rounds):
            for route, body in bodies:
                response = client.post(route, json=body)
                if round_ == 0:
                    context.probe.start()
                    detail = response.json().get("detail", "")[:120] if response.status_code >= 400 else ""
                    outcome.notes.append(f"{route} {body['options']}: {response.status_code} {detail}")
                outcome.answered(response.status_code)
                if response.status_code == 202:  # accepted: do not let it run
                    client.post(f"/v1/jobs/{response.json()['id']}/cancel")
    return outcome


def prepare_inlining_bomb(work: Path, scale: Scale) -> Path:
    return payloads.inlining_bomb(work, scale.inlining_depth)


def slow_model(requests: int) -> Callable[[Context, Path], Outcome]:
    """Upload the inlining bomb (its upload inspection is cheap), then ask for ``requests`` sensitivity
    analyses of it at once: each request's check inlines it in a job-request inspector."""

    def run(context: Context, path: Path) -> Outcome:
        outcome = Outcome()
        uploaded = upload_file(context, "/v1/models", path, Outcome(), start_probe=False)
        if uploaded is None or uploaded.status_code != 201:
            outcome.answered(uploaded.status_code if uploaded else "error", "the bomb's upload was refused")
            return outcome
        body = {"model_id": uploaded.json()["id"], "dataset_id": context.dataset_id}
        with ThreadPoolExecutor(requests) as pool, context.client(180) as client:
            futures = [
                pool.submit(timed, lambda: client.post("/v1/sensitivity", json=body), "422") for _ in range(requests)
            ]
            time.sleep(1.0)  # the inspections are under way
            context.probe.start()
            for future in futures:
                timing, response = future.result(timeout=240)
                detail = response.json().get("detail", "")[:160] if response is not None else ""
                outcome.answered(timing.status, f"job request: {timing.status} after {timing.seconds:.1f} s {detail}")
                if timing.status == "202" and response is not None:  # the check passed: cancel the job (the bomb)
                    cancelled = client.post(f"/v1/jobs/{response.json()['id']}/cancel")
                    outcome.notes.append(f"  accepted as a job: cancel answered {cancelled.status_code}")
        return outcome

    return run


def nothing(_work: Path, _scale: Scale) -> None:
    return None


ATTACKS = [
    Attack(
        "bundle-bomb",
        "zip bundle: model.onnx + weights.bin of zeros deflated ~1,000x",
        *upload_attack("/v1/models", lambda work, scale: payloads.bundle_bomb(work, scale.bundle_bomb_bytes)),
    ),
    Attack(
        "pt2-json-bomb",
        ".pt2 whose model_weights_config.json is spaces deflated ~1,000x",
        *upload_attack("/v1/models", lambda work, scale: payloads.pt2_json_bomb(work, scale.json_bomb_bytes)),
    ),
    Attack(
        "pt2-pickled-weight",
        ".pt2 with a pickled weight (use_pickle) that would touch a marker",
        prepare_pickled,
        run_pickled,
    ),
    Attack(
        "npz-bomb",
        "npz whose float32 array of zeros is deflated ~1,000x",
        *upload_attack("/v1/datasets", lambda work, scale: payloads.npz_bomb(work, scale.npz_bomb_bytes)),
    ),
    Attack(
        "npz-shape-overflow",
        "npz header with shape (2**62, 4)",
        *upload_attack("/v1/datasets", lambda work, _scale: payloads.npz_shape_overflow(work)),
    ),
    Attack(
        "many-layers",
        "legal ONNX: a chain of N MatMul layers with 2x2 weights",
        *upload_attack("/v1/models", lambda work, scale: payloads.many_layers_model(work, scale.layers)),
        budget_s=300,
    ),
    Attack(
        "big-onnx",
        "legal raw ONNX: one MatMul weight of zeros, about 1 GiB",
        *upload_attack("/v1/models", lambda work, scale: payloads.big_model(work, scale.big_model_bytes)),
        budget_s=300,
    ),
    Attack(
        "json-bodies",
        "4 unauthenticated JSON bodies + one to /login + one authenticated chunked, each sent whole before reading",
        nothing,
        run_bodies,
    ),
    Attack(
        "upload-flood", "never-ending uploads: Content-Length 1 GiB, 16 bytes, then silence", nothing, run_upload_flood
    ),
    Attack("half-headers", "connections that send half a request header and stall", nothing, run_half_headers),
    Attack(
        "slow-uploads",
        "uploads trickling 1 byte every few seconds, one attacker token",
        nothing,
        slow_uploads(lambda scale: scale.slow_uploads, tokens=1),
    ),
    Attack(
        "slow-uploads-4-tokens",
        "16 such uploads from 4 attacker tokens: each token within its 4, together MPQ_MAX_CONCURRENT_UPLOADS",
        nothing,
        slow_uploads(lambda _scale: 16, tokens=4),
    ),
    Attack(
        "extreme-options",
        "job requests with options at extremes (probes 1e9, batch size 1e12, ...)",
        nothing,
        run_extreme_options,
    ),
    Attack(
        "slow-model",
        "a ~2.5 KB model whose op check inlines 2**(depth+1) nodes, one job request",
        prepare_inlining_bomb,
        slow_model(1),
    ),
    Attack("slow-model-x2", "the same, two job requests at once", prepare_inlining_bomb, slow_model(2)),
]


# ---------------------------------------------------------------- running them


def run_attack(attack: Attack, scale: Scale, template: Path, tokens: Tokens, auth: str, seed: int) -> Row:
    with tempfile.TemporaryDirectory(prefix=f"mpq-abuse-{attack.name}-") as directory:
        work, root = Path(directory) / "payloads", Path(directory) / "server"
        work.mkdir()
        payload = attack.prepare(work, scale)
        shutil.copytree(template, root, symlinks=True)
        server = start_server(root, {"MPQ_AUTH": auth}, upgrade=False)
        try:
            return measure(
                attack,
                Context(server, work, scale, tokens, HonestProbe(server.url, bearer(tokens.honest), seed)),
                payload,
            )
        finally:
            stop_server(server)


def measure(attack: Attack, context: Context, payload: Any) -> Row:
    warm_up(context)
    started = time.perf_counter()
    with PeakRss(context.server.process.pid) as rss, Pinger(context.server.url) as pinger:
        baseline = rss.peak_server
        outcome = run_bounded(attack, context, payload)
        context.probe.wait()
    outcome.notes.append(pinger.summary())
    return Row(
        attack.name,
        outcome,
        (rss.peak_server - baseline) / MB,
        baseline / MB,
        rss.peak_child / MB,
        rss.peak_children / MB,
        context.probe.healthz,
        context.probe.upload,
        max(pinger.times, default=0.0),
        time.perf_counter() - started,
    )


def run_bounded(attack: Attack, context: Context, payload: Any) -> Outcome:
    """The attack in a thread, given up after its budget (the server is then stopped under it)."""
    result: list[Outcome] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(attack.run(context, payload))
        except Exception as error:
            failure.append(error)

    thread = threading.Thread(target=target, daemon=True, name=attack.name)
    thread.start()
    thread.join(attack.budget_s)
    if result:
        return result[0]
    outcome = Outcome()
    if failure:
        outcome.answered(f"bench error {type(failure[0]).__name__}", f"the attack failed: {failure[0]!r}")
    else:
        outcome.answered("unfinished", f"the attack was still running after {attack.budget_s:.0f} s")
    return outcome


def print_row(row: Row) -> None:
    print(f"\n## {row.attack} ({row.seconds:.0f} s)", flush=True)
    print(f"  attack's requests: {answers_text(row.outcome.answers)}")
    for note in row.outcome.notes:
        print(f"    {note}")
    print(f"  API RSS: baseline {row.baseline_mb:.0f} MB, peak growth {row.growth_mb:.1f} MB")
    print(f"  children: largest {row.child_peak_mb:.0f} MB, all together {row.children_peak_mb:.0f} MB (peaks)")
    print(
        f"  honest /healthz: {row.healthz} s, honest upload: {row.upload} s -> target met: {row.verdict()}", flush=True
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| attack | attack's requests answered | API RSS growth (MB) | largest child peak RSS (MB) | "
        "honest /healthz (s) | honest upload (s) | target met (API < 100 MB, honest < 2 s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += [
        f"| {row.attack} | {answers_text(row.outcome.answers)} | {row.growth_mb:.1f} | {row.child_peak_mb:.0f} "
        f"| {row.healthz} | {row.upload} | {row.verdict()} |"
        for row in rows
    ]
    return "\n".join(lines)


def raise_open_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller payloads, fewer connections, shorter holds")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        choices=[a.name for a in ATTACKS],
        help="run this attack (repeatable)",
    )
    parser.add_argument(
        "--auth",
        choices=["token", "off"],
        default="token",
        help="MPQ_AUTH of the server (default token: attacker and honest client use separate tokens)",
    )
    parser.add_argument("--list", action="store_true", help="list the attacks and exit")
    args = parser.parse_args()
    if args.list:
        for attack in ATTACKS:
            print(f"{attack.name:24} {attack.what}")
        return
    scale = QUICK if args.quick else FULL
    attacks = [a for a in ATTACKS if not args.only or a.name in args.only]
    files = raise_open_file_limit()
    if files < scale.half_headers + 100:
        scale = replace(scale, half_headers=files - 100, flood_uploads=min(scale.flood_uploads, files - 100))
    print(
        f"bench/abuse.py {'--quick ' if args.quick else ''}on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, MPQ_AUTH={args.auth}, open-file limit {files}; {scale}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpq-abuse-template-") as template:
        tokens = make_template(Path(template), args.auth, attackers=4)
        for seed, attack in enumerate(attacks, start=1):
            print(f"\n# {attack.name}: {attack.what}", flush=True)
            try:
                rows.append(run_attack(attack, scale, Path(template), tokens, args.auth, seed))
            except Exception as error:
                print(f"  bench error, attack skipped: {error!r}", flush=True)
                continue
            print_row(rows[-1])
    print("\n" + table(rows))
    missed = [row.attack for row in rows if not row.met]
    print(
        f"\ntargets met by {len(rows) - len(missed)} of {len(rows)} attacks"
        + (f"; missed: {', '.join(missed)}" if missed else "")
    )


if __name__ == "__main__":
    main()
