"""service/api/guard.py: forged hosts, cross-site requests, the dashboard's CSRF tokens, unauthenticated and
oversized bodies, and 500s that keep the connection, through the real app (and a real server where the
socket matters)."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from service.api.auth import create_token
from service.store.tables import Job
from tests.models import mlp_onnx_model
from tests.payloads import json_body
from tests.service import dashboard_data
from tests.service.helpers import assert_problem, enable_auth, exchange, snapshot, upload

MiB = 1024 * 1024
BODY_LIMIT = 256 * 1024  # MPQ_MAX_REQUEST_BODY_BYTES's default, which the fixtures keep


@pytest.fixture
def dashboard(app) -> Iterator[dashboard_data.DashboardData]:
    data = dashboard_data.insert(app)
    with dashboard_data.StandInWorker(app, data.running_job_id):
        yield data


def logged_in(client, app) -> str:
    """Turn auth on and log the client in through the form; returns the page's CSRF token."""
    enable_auth(app)
    _, token = create_token(app.state.db, "browser")
    page = client.get("/login").text
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None
    csrf = found.group(1)
    response = client.post("/login", data={"token": token, "csrf_token": csrf}, follow_redirects=False)
    assert response.status_code == 303, response.text
    return client.cookies["mpq_csrf"]


def page_csrf(client) -> str:
    """The CSRF token a rendered page gives this client (auth off)."""
    client.get("/models")
    return client.cookies["mpq_csrf"]


# ---------------------------------------------------------------- Host


def test_forged_hosts_are_refused_on_every_route(client, app):
    for path in ("/v1/models", "/models", "/healthz", "/login"):
        response = client.get(path, headers={"Host": "rebound.evil.example"})
        assert_problem(response, 400, "MPQ_ALLOWED_HOSTS", "rebound.evil.example")
    assert_problem(client.get("/v1/models", headers={"Host": "localhost.evil.example:8000"}), 400, "host")
    assert_problem(client.get("/v1/models", headers={"Host": "127.0.0.1@evil.example"}), 400, "host")
    assert_problem(client.get("/v1/models", headers={"Host": ""}), 400, "host")


def test_loopback_and_configured_names_are_served(client, app):
    for host in ("127.0.0.1", "127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]", "[::1]:8000", "testserver"):
        assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
    assert client.get("/v1/models", headers={"Host": "mpq.example.com:8443"}).status_code == 400
    app.state.settings = app.state.settings.model_copy(update={"allowed_hosts": "mpq.example.com, other.example"})
    assert client.get("/v1/models", headers={"Host": "mpq.example.com:8443"}).status_code == 200


def test_allowed_hosts_setting_refuses_ports_and_schemes():
    from service.settings import Settings

    with pytest.raises(ValueError, match="MPQ_ALLOWED_HOSTS"):
        Settings(allowed_hosts="mpq.example.com:8443")
    with pytest.raises(ValueError, match="MPQ_ALLOWED_HOSTS"):
        Settings(allowed_hosts="https://mpq.example.com")
    assert "mpq.example.com" in Settings(allowed_hosts=" MPQ.example.com ,").allowed_host_names


# ---------------------------------------------------------------- Origin


CROSS_SITE = [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://testserver:8080"},
    {"Origin": "https://testserver"},
    {"Referer": "http://evil.example/page.html"},
    {"Sec-Fetch-Site": "cross-site"},
]


@pytest.mark.parametrize("headers", CROSS_SITE, ids=lambda h: "-".join(h.values()))
def test_cross_site_writes_are_refused_with_auth_off(client, app, dashboard, tiny_model_bytes, headers):
    csrf = page_csrf(client)
    before = snapshot(app)
    writes = [
        upload(client, "/v1/models", tiny_model_bytes, **headers),
        client.post(
            "/v1/sensitivity",
            json={"model_id": dashboard.model_id, "dataset_id": dashboard.dataset_id},
            headers=headers,
        ),
        client.post(f"/v1/jobs/{dashboard.running_job_id}/cancel", headers=headers),
        upload(client, "/upload/models", tiny_model_bytes, **headers, **{"X-CSRF-Token": csrf}),
        client.post(f"/jobs/{dashboard.running_job_id}/cancel", data={"csrf_token": csrf}, headers=headers),
        client.post("/login", data={"token": "x", "csrf_token": csrf}, headers=headers),
    ]
    for response in writes:
        assert_problem(response, 403, "cross-site")
    assert snapshot(app) == before
    with app.state.sessions() as session:
        assert not session.get(Job, dashboard.running_job_id).cancel_requested
    assert client.get("/v1/models", headers=headers).status_code == 200  # reads are not state-changing


def test_same_origin_and_originless_writes_pass(client, app, dashboard):
    cancel = f"/v1/jobs/{dashboard.running_job_id}/cancel"
    assert (
        client.post(cancel, headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}).status_code == 202
    )
    assert client.post(cancel, headers={"Referer": "http://testserver/jobs"}).status_code == 202
    assert client.post(cancel).status_code == 202  # CI clients, curl and httpx send neither


# ---------------------------------------------------------------- /v1 takes the bearer header only


def test_the_dashboard_cookie_does_not_open_v1(client, app, dashboard, tiny_model_bytes):
    enable_auth(app)
    _, token = create_token(app.state.db, "browser")
    client.cookies.set("mpq_token", token)  # what a logged-in browser sends with any request to this server
    before = snapshot(app)
    assert client.get("/models").status_code == 200  # the cookie opens the dashboard
    for headers in ({}, {"Origin": "http://evil.example"}):
        status = 401 if not headers else 403
        assert_problem(client.post(f"/v1/jobs/{dashboard.running_job_id}/cancel", headers=headers), status)
        assert_problem(upload(client, "/v1/models", tiny_model_bytes, **headers), status)
        assert_problem(
            client.post(
                "/v1/sensitivity",
                json={"model_id": dashboard.model_id, "dataset_id": dashboard.dataset_id},
                headers=headers,
            ),
            status,
        )
    assert_problem(client.get("/v1/jobs"), 401, "token")
    assert snapshot(app) == before


# ---------------------------------------------------------------- the dashboard's CSRF tokens


def test_pages_set_the_csrf_cookie_and_embed_its_token(client):
    response = client.get("/models")
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("mpq_csrf=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    token = client.cookies["mpq_csrf"]
    assert f'<meta name="csrf-token" content="{token}">' in response.text
    again = client.get("/jobs")
    assert "set-cookie" not in again.headers and token in again.text  # kept while the browser has it


def test_dashboard_actions_need_the_pages_csrf_token(client, app, dashboard, tiny_model_bytes):
    csrf = logged_in(client, app)
    job = dashboard.running_job_id
    before = snapshot(app)
    for headers in ({}, {"X-CSRF-Token": "not-the-token"}):
        assert_problem(upload(client, "/upload/models", tiny_model_bytes, **headers), 403, "CSRF")
        assert_problem(client.post(f"/jobs/{job}/cancel", headers=headers), 403, "CSRF")
    assert_problem(client.post(f"/jobs/{job}/cancel", data={"csrf_token": "not-the-token"}), 403, "CSRF")
    assert_problem(client.post("/logout", data={}), 403, "CSRF")
    assert snapshot(app) == before

    uploaded = upload(
        client,
        "/upload/models",
        tiny_model_bytes,
        name="from-the-page",
        **{"X-CSRF-Token": csrf, "Accept": "application/json"},
    )
    assert uploaded.status_code == 201, uploaded.text
    assert client.get(f"/models/{uploaded.json()['id']}").status_code == 200
    assert uploaded.json()["name"] == "from-the-page" and uploaded.json()["layers"]

    status = client.get(f"/jobs/{job}/status", headers={"Accept": "application/json"})
    assert status.status_code == 200 and status.json()["status"] == "running"
    cancelled = client.post(f"/jobs/{job}/cancel", headers={"X-CSRF-Token": csrf, "Accept": "application/json"})
    assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"] is True
    form = client.post(f"/jobs/{job}/cancel", data={"csrf_token": csrf}, follow_redirects=False)  # without scripts
    assert form.status_code == 303 and form.headers["location"] == f"/jobs/{job}"


def test_dashboard_scripts_without_a_login_get_401(client, app, dashboard):
    enable_auth(app)
    response = client.get(f"/jobs/{dashboard.running_job_id}/status", headers={"Accept": "application/json"})
    assert_problem(response, 401, "log in")
    assert client.get(f"/jobs/{dashboard.running_job_id}", follow_redirects=False).status_code == 303


# ---------------------------------------------------------------- request bodies


def test_oversized_bodies_are_refused(client, app):
    limit = BODY_LIMIT
    assert_problem(
        client.post("/v1/sensitivity", content=b" " * (limit + 1), headers={"content-type": "application/json"}),
        413,
        "MPQ_MAX_REQUEST_BODY_BYTES",
    )
    streamed = client.post(
        "/v1/sensitivity", content=iter([b" " * limit, b"{}"]), headers={"content-type": "application/json"}
    )  # chunked: no Content-Length
    assert_problem(streamed, 413, "MPQ_MAX_REQUEST_BODY_BYTES")
    assert_problem(client.post("/login", data={"token": "x" * 5000}), 413, "login")


@pytest.mark.slow
def test_upload_routes_keep_their_own_limit(client, app):
    model = mlp_onnx_model(inputs=64, width=256).SerializeToString()
    assert len(model) > BODY_LIMIT
    assert upload(client, "/v1/models", model).status_code == 201
    assert upload(client, "/upload/models", model, **{"X-CSRF-Token": page_csrf(client)}).status_code == 201


def peak_rss_growth(action: Callable[[], httpx.Response]) -> tuple[httpx.Response, int]:
    """Run ``action`` while sampling this process's RSS (the live server runs in it); returns the response
    and the peak growth in bytes. Freed buffers go back to the system, so only sampling sees the peak."""
    process = psutil.Process()
    baseline = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        response = action()
    finally:
        done.set()
        sampler.join()
    return response, peak - baseline


def test_unauthenticated_bodies_are_refused_before_they_are_read(app, live_server):
    enable_auth(app)
    body, headers = json_body(50 * MiB)
    with httpx.Client(base_url=live_server, timeout=60) as http:
        http.get("/healthz")  # warm up the connection and the server's first-request allocations
        response, growth = peak_rss_growth(lambda: http.post("/v1/sensitivity", content=body, headers=headers))
    assert_problem(response, 401, "token")
    assert growth < 20 * MiB, f"the server's RSS grew {growth / MiB:.0f} MiB for a refused body"


def test_bodies_over_the_bound_are_cut_without_buffering(app, live_server):
    enable_auth(app)
    _, token = create_token(app.state.db, "ci")
    bearer = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=live_server, timeout=60, headers=bearer) as http:
        body, headers = json_body(MiB)
        assert_problem(http.post("/v1/sensitivity", content=body, headers=headers), 413, "MPQ_MAX_REQUEST_BODY")
        body, headers = json_body(50 * MiB)
        del headers["content-length"]  # chunked: counted as it streams
        response, growth = peak_rss_growth(lambda: http.post("/v1/sensitivity", content=body, headers=headers))
    assert_problem(response, 413, "MPQ_MAX_REQUEST_BODY")
    assert growth < 20 * MiB, f"the server's RSS grew {growth / MiB:.0f} MiB for a refused body"


# ---------------------------------------------------------------- 500s


def test_a_500_is_problem_json_and_keeps_the_connection(client, app, live_server, tiny_model_bytes, caplog):
    model = upload(client, "/v1/models", tiny_model_bytes).json()
    app.state.store.local_path(model["sha256"]).unlink()  # the row outlives its blob: the download fails
    address = urlsplit(live_server)
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        status, headers, body = exchange(
            connection, f"GET /v1/models/{model['id']}/file HTTP/1.1\r\nHost: {address.netloc}\r\n\r\n".encode()
        )
        assert status == 500 and headers["content-type"] == "application/problem+json", body
        assert b"server log" in body and b"Traceback" not in body
        status, _, body = exchange(connection, f"GET /healthz HTTP/1.1\r\nHost: {address.netloc}\r\n\r\n".encode())
        assert status == 200 and b'"ok"' in body  # the same connection still serves
    logged = [r for r in caplog.records if r.name == "mpq.service" and r.levelname == "ERROR"]
    assert logged and logged[0].exc_info and "FileNotFoundError" in logged[0].exc_info[0].__name__


def test_huge_point_indices_are_not_server_errors(client, dashboard):
    plan = dashboard.plan_id
    for path in (
        f"/plans/{plan}/points/{2**63}",
        f"/plans/{plan}/points/{2**63}/artifact",
        f"/plans/{plan}/points/{2**31}",
        f"/plans/{plan}/points/-1/artifact",
    ):
        response = client.get(path)
        assert response.status_code in (404, 422), (path, response.status_code, response.text[:200])
