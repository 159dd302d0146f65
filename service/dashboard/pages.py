"""The web dashboard: server-rendered pages (Jinja2) over the rows the /v1 API serves.

Every figure is in an HTML table that reads without JavaScript; the charts (plotly.js,
served from the installed ``plotly`` package, never a CDN) are progressive enhancement.

With auth on, the dashboard's routes take the ``mpq_token`` cookie set at login; /v1 never does
(it takes the bearer header only). Browser-side actions (upload, cancel, live progress, downloads)
therefore go to the dashboard's own routes below, never to /v1. Every state-changing one carries a
CSRF token (double submit, ``require_csrf``) on top of the origin checks of ``service.api.guard``.

The planner's figures are read in the shapes documented in docs/dashboard.md.
"""

from __future__ import annotations

import hmac
import importlib.util
import math
import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from service.api.auth import token_is_valid
from service.api.errors import Problem
from service.api.jobs import JobOut
from service.api.registry import store_upload
from service.api.transfer import blob_response
from service.dashboard.units import Unit, cost_units
from service.formatting import describe_execution, latency_ratio, shortened, slower_than_float_warning
from service.job_status import FINISHED
from service.settings import AuthMode
from service.store.sql_store import SqlStore
from service.store.tables import (
    Artifact,
    Dataset,
    FrontierPointRow,
    Job,
    LatencyMeasurementRow,
    Model,
    Plan,
    SensitivityResultRow,
)

COOKIE = "mpq_token"
CSRF_COOKIE = "mpq_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
MAX_POINT_INDEX = 2**31 - 1  # frontier_points.index is a 32-bit integer column
LIST_LIMIT = 200  # rows per list page; the /v1 API pages through the rest
HERE = Path(__file__).parent
STATIC_FILES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
NAV = [
    ("/models", "Models"),
    ("/sensitivity", "Sensitivity"),
    ("/plans", "Plans"),
    ("/jobs", "Jobs"),
    ("/latency", "Latency"),
]
# Inline <style> is needed by plotly.js; scripts come only from this origin, requests go only here.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)


# ---------------------------------------------------------------- formatting filters


def format_bytes(value: float | None) -> str:
    if value is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""  # unreachable


def format_number(value: float | None, digits: int = 4) -> str:
    """Significant digits; scientific notation for very small or large magnitudes."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def format_time(value: datetime | None) -> str:
    """A <time> element, which the stylesheet keeps on one line (a table cell 390 px wide broke the
    date at its hyphens)."""
    if not value:
        return "—"
    return Markup('<time datetime="{}">{}</time>').format(
        value.strftime("%Y-%m-%dT%H:%M:%SZ"), value.strftime("%Y-%m-%d %H:%M:%S UTC")
    )


def format_constraints(constraints: dict[str, Any] | None) -> str:
    """plan.request["constraints"] in words, each budget in its unit."""
    units = {
        "max_size_bytes": lambda v: f"{int(v):,} bytes",
        "max_bops": lambda v: f"{format_number(v)} BOPS",
        "max_latency_ms": lambda v: f"{format_number(v)} ms",
        "max_drop": lambda v: f"{format_number(v)} pp",
    }
    parts = [
        f"{key} {units[key](value) if key in units else value}"
        for key, value in (constraints or {}).items()
        if value is not None
    ]
    return ", ".join(parts) or "—"


def in_unit(value: float | None, unit: Unit, named: bool = True) -> str:
    """A figure in the column's unit (``service.dashboard.units``), with the unit's name unless the header has it."""
    if value is None:
        return "—"
    return f"{format_number(unit.of(value))} {unit.name}" if named else format_number(unit.of(value))


def tail(value: str | None, width: int = 40) -> str:
    """A long node name or module path shortened from the left (``service.cli.progress.shortened``);
    pages put the whole in a title attribute."""
    return shortened(value or "", width)


templates.env.filters.update(
    latency_ratio=latency_ratio,
    slower_than_float=slower_than_float_warning,
    bytes=format_bytes,
    num=format_number,
    time=format_time,
    constraints=format_constraints,
    tail=tail,
    in_unit=in_unit,
)


# ---------------------------------------------------------------- auth and rendering


def _auth_on(request: Request) -> bool:
    return request.app.state.settings.auth is AuthMode.token


async def require_login(request: Request) -> None:
    """Dashboard routes need a valid ``mpq_token`` cookie when auth is on. A browser goes to the login form;
    the page's scripts, which ask for JSON, get 401.

    The redirect travels as an HTTPException so that the app's error handler, which keeps
    the Location header, answers it (the router cannot install handlers of its own).
    """
    if not _auth_on(request):
        return
    token = request.cookies.get(COOKIE)
    if token and await token_is_valid(request.app.state, token):
        return
    if wants_json(request):
        raise Problem(401, "not logged in, or the login expired: log in again on /login")
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise HTTPException(303, "log in first", headers={"Location": f"/login?next={quote(target)}"})


def wants_json(request: Request) -> bool:
    """The dashboard's scripts ask for JSON; forms and links ask for pages."""
    return "application/json" in request.headers.get("accept", "")


async def require_csrf(request: Request) -> None:
    """Double submit: state-changing requests send back the ``mpq_csrf`` cookie's value, which only this
    server's pages carry (in a meta tag and hidden form fields), in the X-CSRF-Token header or the
    csrf_token form field. Another site's page can make the browser send the cookie, not read it."""
    expected = request.cookies.get(CSRF_COOKIE, "")
    sent = request.headers.get(CSRF_HEADER) or (await _form(request)).get(CSRF_FIELD, "")
    if not expected or not hmac.compare_digest(expected.encode(), sent.encode()):
        raise Problem(
            403,
            "the request's CSRF token is missing or does not match this browser's: reload the page and try again",
            title="CSRF check failed",
        )


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (the body is bounded by service.api.guard); {} for other bodies."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return {}
    fields = parse_qs((await request.body()).decode("utf-8", errors="replace"))
    return {name: values[0] for name, values in fields.items()}


def _csrf_token(request: Request) -> tuple[str, bool]:
    """The browser's CSRF token, and whether it is new (then the response sets the cookie)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if len(token) == 43 and token.replace("-", "").replace("_", "").isalnum():  # token_urlsafe(32)
        return token, False
    return secrets.token_urlsafe(32), True


def _set_csrf_cookie(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        CSRF_COOKIE, token, httponly=True, secure=request.url.scheme == "https", samesite="strict", path="/"
    )


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
    token, new = _csrf_token(request)
    context.update(nav=NAV, auth_on=_auth_on(request), version=request.app.version, csrf_token=token)
    response = templates.TemplateResponse(request, template, context, status_code=status_code)
    response.headers["Content-Security-Policy"] = CSP
    if new:
        _set_csrf_cookie(request, response, token)
    return response


def not_found(request: Request, what: str) -> Response:
    return render(request, "not_found.html", status_code=404, what=what)


def _safe_next(target: str | None) -> str:
    """Only local paths: never redirect to another site after login."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


pages = APIRouter(dependencies=[Depends(require_login)])


# ---------------------------------------------------------------- login, logout, static files


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    if not _auth_on(request):
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "login.html", hide_nav=True, next=_safe_next(next), error=None)


@router.post("/login", dependencies=[Depends(require_csrf)])
async def login(request: Request) -> Response:
    """The form's body is at most service.api.guard.LOGIN_BODY_BYTES."""
    form = await _form(request)
    token = form.get("token", "").strip()
    target = _safe_next(form.get("next", "/"))
    if not _auth_on(request):
        return RedirectResponse(target, status_code=303)
    if not token or not await token_is_valid(request.app.state, token):
        return render(
            request,
            "login.html",
            status_code=401,
            hide_nav=True,
            next=target,
            error="That token is unknown or revoked. Create one with `mpq token create --name NAME`.",
        )
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, secure=request.url.scheme == "https", samesite="strict", path="/")
    _set_csrf_cookie(request, response, secrets.token_urlsafe(32))  # a new session gets a new CSRF token
    return response


@router.post("/logout", dependencies=[Depends(require_csrf)])
def logout(request: Request) -> Response:
    response = RedirectResponse("/login" if _auth_on(request) else "/", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, secure=request.url.scheme == "https", samesite="strict")
    return response


def _plotly_path() -> Path:
    spec = importlib.util.find_spec("plotly")  # located, not imported: the Python package is large
    if spec is None or spec.origin is None:
        raise Problem(404, "the plotly package is not installed; charts are unavailable")
    return Path(spec.origin).parent / "package_data" / "plotly.min.js"


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    if name == "plotly.min.js":
        return FileResponse(
            _plotly_path(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"}
        )
    if name not in STATIC_FILES:
        raise Problem(404, f"no static file {name!r}")
    return FileResponse(HERE / "static" / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- models


@pages.get("/")
def home() -> Response:
    return RedirectResponse("/models", status_code=303)


@pages.get("/models")
def models_page(request: Request) -> Response:
    db = _db(request)
    models, _ = db.list_uploads(Model, limit=LIST_LIMIT, unlisted=("layers",))
    datasets, _ = db.list_uploads(Dataset, limit=LIST_LIMIT)
    return render(request, "models.html", active="Models", models=models, datasets=datasets)


@pages.get("/models/{model_id}")
def model_page(request: Request, model_id: str) -> Response:
    db = _db(request)
    model = db.get(Model, model_id)
    if model is None:
        return not_found(request, f"model {model_id!r}")
    results = db.sensitivity_results(model_sha256=model.sha256)
    plans = db.plans(model_id=model.id)
    tables = db.latency_tables(model.sha256)
    return render(
        request, "model.html", active="Models", model=model, results=results, plans=plans, latency_tables=tables
    )


@pages.post("/upload/{kind}", status_code=201, dependencies=[Depends(require_csrf)])
async def upload(request: Request, kind: str, name: Annotated[str | None, Query(max_length=200)] = None) -> Response:
    """The upload form's target (kind: models or datasets): the API's upload, streamed the same way."""
    registry_kind = request.app.state.registry_kinds.get(kind)
    if registry_kind is None:
        raise Problem(404, f"cannot upload {kind!r}: upload models or datasets")
    row = await store_upload(request, registry_kind, name)
    return JSONResponse(registry_kind.out.model_validate(row).model_dump(mode="json"), status_code=201)


@pages.api_route("/{kind}/{item_id}/file", methods=["GET", "HEAD"])
def registry_file(request: Request, kind: str, item_id: str) -> Response:
    """A model's or dataset's file (the API's GET /v1/{kind}/{id}/file, for the logged-in browser)."""
    registry_kind = request.app.state.registry_kinds.get(kind)
    row = _db(request).get(registry_kind.table, item_id) if registry_kind else None
    if row is None:
        return not_found(request, f"{kind} file {item_id!r}")
    suffix = registry_kind.download_suffix
    filename = row.name if row.name.endswith(suffix) else row.name + suffix
    return blob_response(request, request.app.state.store, row.sha256, filename, "application/octet-stream")


# ---------------------------------------------------------------- sensitivity


@dataclass(frozen=True)
class LayerSensitivity:
    """One table row: a layer's average trace (± its standard error) and top eigenvalue."""

    order: int  # graph order
    name: str
    op_type: str
    num_params: int
    node_name: str  # "" for results stored before node names were recorded
    scope: str
    average_trace: float | None
    average_trace_se: float | None
    relative_se: float | None
    num_probes: int | None
    eigenvalue: float | None
    converged: bool | None


SENSITIVITY_SORTS = {
    "order": "graph order",
    "name": "layer",
    "num_params": "parameters",
    "average_trace": "average trace",
    "relative_se": "relative standard error",
    "eigenvalue": "eigenvalue",
}


def layer_sensitivities(result: dict[str, Any]) -> list[LayerSensitivity]:
    """Rows of a stored result dict (sensitivity.results.SensitivityResult.to_dict())."""
    traces = {t["name"]: t for t in result.get("traces") or []}
    eigen = {e["name"]: e for e in result.get("eigenvalues") or []}
    rows = []
    for order, layer in enumerate(result.get("layers") or []):
        name, n = layer["name"], layer["num_params"]
        trace, top = traces.get(name), eigen.get(name)
        rows.append(
            LayerSensitivity(
                order=order,
                name=name,
                op_type=layer.get("op_type", ""),
                num_params=n,
                node_name=layer.get("node_name") or "",
                scope=layer.get("scope") or "",
                average_trace=trace["trace"] / n if trace else None,
                average_trace_se=trace["standard_error"] / n if trace else None,
                relative_se=trace["standard_error"] / abs(trace["trace"]) if trace and trace["trace"] else None,
                num_probes=trace["num_probes"] if trace else None,
                eigenvalue=top["eigenvalue"] if top else None,
                converged=top["converged"] if top else None,
            )
        )
    return rows


def sort_rows(rows: list[Any], key: str, descending: bool) -> list[Any]:
    """Sort by an attribute; rows without a value go last whichever the direction."""
    present = [r for r in rows if getattr(r, key) is not None]
    missing = [r for r in rows if getattr(r, key) is None]
    return sorted(present, key=lambda r: getattr(r, key), reverse=descending) + missing


def g_heatmap(interlayer: dict[str, Any] | None, bits: int | None) -> dict[str, Any] | None:
    """The block of G where both layers take weight bit width ``bits``: G[(i,b),(j,b)]."""
    if not interlayer:
        return None
    labels = [(name, int(b)) for name, b in interlayer["labels"]]
    widths = sorted({b for _, b in labels}, reverse=True)
    chosen = bits if bits in widths else widths[0]
    picked = [index for index, (_, b) in enumerate(labels) if b == chosen]
    matrix = interlayer["matrix"]
    return {
        "bits": chosen,
        "widths": widths,
        "layers": [labels[i][0] for i in picked],
        "z": [[matrix[i][j] for j in picked] for i in picked],
        "symmetry_error": interlayer.get("symmetry_error"),
    }


@pages.get("/sensitivity")
def sensitivity_list(request: Request) -> Response:
    db = _db(request)
    results = db.sensitivity_results(limit=LIST_LIMIT)
    names = db.model_names_by_sha256(r.model_sha256 for r in results)
    return render(request, "sensitivity_list.html", active="Sensitivity", results=results, model_names=names)


@pages.get("/sensitivity/{result_id}")
def sensitivity_page(
    request: Request, result_id: str, sort: str = "order", desc: bool = False, bits: int | None = None
) -> Response:
    db = _db(request)
    row = db.get(SensitivityResultRow, result_id)
    if row is None:
        return not_found(request, f"sensitivity result {result_id!r}")
    model = db.model_by_sha256(row.model_sha256)
    sort = sort if sort in SENSITIVITY_SORTS else "order"
    layers = layer_sensitivities(row.result)
    heatmap = g_heatmap(row.result.get("interlayer"), bits)
    chart = {
        "layers": [r.name for r in layers],
        "nodes": [r.node_name or "—" for r in layers],
        "average_trace": [r.average_trace for r in layers],
        "average_trace_se": [r.average_trace_se for r in layers],
        "eigenvalue": [r.eigenvalue for r in layers],
        "heatmap": heatmap,
    }
    return render(
        request,
        "sensitivity.html",
        active="Sensitivity",
        row=row,
        result=row.result,
        model=model,
        layers=sort_rows(layers, sort, desc),
        sort=sort,
        desc=desc,
        sorts=SENSITIVITY_SORTS,
        has_traces=any(r.average_trace is not None for r in layers),
        has_eigen=any(r.eigenvalue is not None for r in layers),
        heatmap=heatmap,
        chart=chart,
        charts=True,
        execution=_execution(row.result),
    )


def _execution(result: dict[str, Any]) -> str:
    """How the run spent memory and time, in one line ("" for results stored before it was recorded)."""
    execution = result.get("execution") or {}
    try:
        return describe_execution(execution) if execution else ""
    except (KeyError, TypeError, ValueError):  # a stored report missing a field: show nothing rather than fail
        return ""


# ---------------------------------------------------------------- plans and frontier points


# The predictor each method optimises (what the plan job stores as predicted_loss_change).
PREDICTOR = {"hawq_v2": "omega", "interlayer": "loss_change", "fisher": "omega", "measured": "omega"}
PREDICTOR_LABELS = {"omega": "Predicted Ω (HAWQ-V2 proxy)", "loss_change": "Predicted loss change ΔL"}


def figures(predicted: dict[str, Any], measured: dict[str, Any] | None, loss_change: float | None) -> dict[str, Any]:
    """Cost, predicted and measured figures of one configuration, in the planner's shapes
    (planner.plan.PlanPoint.predicted() and Measurement.to_dict(); measured may be absent)."""
    measured = measured or {}
    return {
        "size_bytes": predicted.get("size_bytes"),
        "bops": predicted.get("bops"),
        "latency_ms": (measured.get("latency_ms") or {}).get("mean"),
        "latency_p50_ms": (measured.get("latency_ms") or {}).get("p50"),
        "predicted_loss_change": loss_change,
        "metric": measured.get("metric"),
        "drop": measured.get("drop"),
    }


def uniform_candidate(assignment: dict[str, Any], excluded: set[str] | frozenset[str] = frozenset()) -> str | None:
    """The candidate of a configuration that puts every layer not ``excluded`` at the same one (the
    planner's uniform points keep excluded layers fp32)."""
    values = {candidate for layer, candidate in assignment.items() if layer not in excluded}
    return values.pop() if len(values) == 1 else None


def exclusions(plan: Plan) -> dict[str, dict[str, Any]]:
    """plan.result["excluded"] (planner.exclude.Exclusion.to_dict()) by layer; {} for older plans."""
    return {entry["layer"]: entry for entry in (plan.result or {}).get("excluded") or [] if "layer" in entry}


def point_view(point: FrontierPointRow, plan: Plan) -> dict[str, Any]:
    """A frontier point (a bisection's measured step) as the chart and the table show it."""
    return {
        "index": point.index,
        **figures({"size_bytes": point.size_bytes, "bops": point.bops}, point.measured, point.predicted_loss_change),
        "uniform": uniform_candidate(point.assignment, set(exclusions(plan))),
        "chosen": point.assignment == plan.assignment,
        "mix": dict(Counter(point.assignment.values()).most_common()),
        "demoted": demoted(plan, point.assignment),
    }


@dataclass(frozen=True)
class SearchWords:
    """What a plan page calls its points: a pareto search lists its frontier, a bisection the steps
    it measured (configurations demoting the k least sensitive layers, which need not be a frontier)."""

    section: str  # the section heading
    point: str  # one point: "Frontier point 3"
    points: str  # the table's caption
    trace: str  # the chart's legend entry


SEARCH_WORDS = {
    "pareto": SearchWords("Pareto frontier", "Frontier point", "Frontier points", "frontier"),
    "bisection": SearchWords("Bisection steps", "Bisection step", "Measured bisection steps", "bisection steps"),
}


def search_words(plan: Plan) -> SearchWords:
    return SEARCH_WORDS.get(plan.search, SEARCH_WORDS["pareto"])


def bisection_low(plan: Plan) -> str | None:
    """The candidate a bisection demotes layers to (planner.choose.bisection's run.search["low"]); None otherwise."""
    search = ((plan.result or {}).get("run") or {}).get("search") or {}
    return search.get("low") if plan.search == "bisection" else None


def demoted(plan: Plan, assignment: dict[str, Any]) -> int | None:
    """How many layers a bisection step demoted (None for other searches)."""
    low = bisection_low(plan)
    return None if low is None else sum(1 for candidate in assignment.values() if candidate == low)


def predictor(plan: Plan) -> str:
    return PREDICTOR.get(str((plan.request or {}).get("method")), "loss_change")


def uniform_baselines(plan: Plan, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """plan.result["uniform"]: candidate -> {layers, predicted, measured}, every layer at that candidate.

    ``index`` names the frontier point with the same configuration, so clicking either shows it.
    """
    on_frontier = {p["uniform"]: p["index"] for p in points if p["uniform"]}
    rows = []
    for candidate, point in ((plan.result or {}).get("uniform") or {}).items():
        predicted = point.get("predicted") or {}
        rows.append(
            {
                "candidate": candidate,
                "index": on_frontier.get(candidate),
                **figures(predicted, point.get("measured"), predicted.get(predictor(plan))),
            }
        )
    return rows


def plan_units(plan: Plan, rows: list[dict[str, Any]]) -> dict[str, Unit]:
    """One unit per cost figure for the whole plan page: its points, baselines and the chosen plan."""
    chosen = figures(plan.predicted or {}, plan.measured, None)
    exported = {"size_bytes": (plan.measured or {}).get("size_bytes")}
    return cost_units([*rows, chosen, exported])


# The models a plan is compared with (planner.result.PlanResult.baselines), as the latency chart names them.
REFERENCE_NAMES = {"fp32": "float model (fp32)", "fp16": "fp16 baseline"}


def latency_view(measured: dict[str, Any] | None) -> dict[str, Any] | None:
    """A measurement as the accuracy-latency chart plots it: p50 and metric, both measured (a
    configuration's predicted latency is never shown here), with its ratio to the float model timed
    interleaved in the same run; None when it has no latency or no metric."""
    measured = measured or {}
    p50 = (measured.get("latency_ms") or {}).get("p50")
    if p50 is None or measured.get("metric") is None:
        return None
    return {
        "p50_ms": p50,
        "metric": measured["metric"],
        "drop": measured.get("drop"),
        "ratio": measured.get("latency_ratio_to_float"),
        "spread": measured.get("latency_ratio_spread"),
        "ratio_text": latency_ratio(measured),
        # the plan page's warning and this mark follow one rule (the ratio's interval wholly above 1)
        "slower": bool(slower_than_float_warning(measured)),
    }


def latency_references(plan: Plan) -> list[dict[str, Any]]:
    """The float and fp16 models as measured beside the plan (plan.result["baselines"]); for plans
    stored before those, the float model's p50 from the chosen configuration's interleaved run."""
    stored = (plan.result or {}).get("baselines") or {}
    references = []
    for name in REFERENCE_NAMES:
        view = latency_view(stored.get(name))
        if view is None and name == "fp32":
            measured = plan.measured or {}
            view = latency_view(
                {
                    "latency_ms": {"p50": measured.get("float_latency_p50_ms")},
                    "metric": measured.get("baseline"),
                    "drop": 0.0,
                }
            )
        if view is not None:
            references.append({"name": name, "label": REFERENCE_NAMES[name], **view})
    return references


def accuracy_latency(plan: Plan, rows: list[FrontierPointRow]) -> dict[str, Any] | None:
    """The accuracy-latency chart's data: every frontier point with a measured latency and metric, the
    chosen configuration's measurement and the reference models; None when no point has a latency
    measurement (plans stored before latency was measured): the page says so instead."""
    points = [
        {"index": row.index, "chosen": row.assignment == plan.assignment, **view}
        for row in rows
        if (view := latency_view(row.measured)) is not None
    ]
    if not points:
        return None
    return {"points": points, "chosen": latency_view(plan.measured), "references": latency_references(plan)}


def float_metric(plan: Plan, points: list[FrontierPointRow]) -> float | None:
    """The float model's metric, against which drops (and the max_drop line) are measured."""
    baselines = [(plan.measured or {}).get("baseline"), *((p.measured or {}).get("baseline") for p in points)]
    return next((float(baseline) for baseline in baselines if baseline is not None), None)


def plan_latency_table(db: SqlStore, plan: Plan, model: Model | None) -> dict[str, Any] | None:
    """The latency table the plan's search predicted latency with (``LatencyTable.to_dict()``): the one in
    run.search["latency_table"], or, where the result names it by key alone, the model's stored table
    with that key; None when the plan used none (its cost was size or BOPS)."""
    table = (((plan.result or {}).get("run") or {}).get("search") or {}).get("latency_table")
    if not isinstance(table, dict):
        return None
    if isinstance(table.get("layers"), dict):
        return table
    texts = [table.get(name) for name in ("device_description", "provider", "onnxruntime_version")]
    batch_size, candidates = table.get("batch_size"), table.get("candidates")
    if model is None or not all(isinstance(t, str) for t in texts) or not isinstance(batch_size, int):
        return None
    if not isinstance(candidates, list):
        return None
    device, provider, version = (str(t) for t in texts)
    row = db.find_latency_table(
        model.sha256,
        device_description=device,
        provider=provider,
        onnxruntime_version=version,
        batch_size=batch_size,
        candidates=",".join(map(str, candidates)),
    )
    return row.table if row is not None and isinstance(row.table.get("layers"), dict) else None


def layer_latency(table: dict[str, Any] | None, layer: str, candidate: str) -> dict[str, Any] | None:
    """A layer's predicted latency contribution at ``candidate`` (``LayerLatency.to_dict()``: ms, and
    ratio and spread as fractions of the float model's time); fp32 contributes nothing."""
    if table is None:
        return None
    if candidate == "fp32":
        return {"ms": 0.0, "ratio": 0.0, "spread": 0.0}
    entries = table["layers"].get(layer)
    return _latency_entry(entries.get(candidate) if isinstance(entries, dict) else None)


def _latency_entry(entry: Any) -> dict[str, Any] | None:
    """``LayerLatency.to_dict()``, or None for anything else (a missing or malformed entry: shown as "—")."""
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), int | float) for k in ("ms", "ratio", "spread")):
        return None
    return entry


def pair_terms(table: dict[str, Any] | None, assignment: dict[str, Any]) -> list[dict[str, Any]]:
    """The latency table's adjacent-pair terms (``LatencyTable.pairs``), one row per pair and candidate:
    the pair's measured time quantized together minus its two single-layer contributions (ms, and
    ratio and spread as fractions of the float model's time), and whether the configuration puts both
    layers at that candidate (then the prediction counts the term). Malformed entries are left out."""
    rows = []
    for pair in (table or {}).get("pairs") or []:
        layers = pair.get("layers") if isinstance(pair, dict) else None
        entries = pair.get("candidates") if isinstance(pair, dict) else None
        if not (isinstance(layers, list) and len(layers) == 2 and isinstance(entries, dict)):
            continue
        first, second = (str(layer) for layer in layers)
        for candidate, entry in entries.items():
            if (term := _latency_entry(entry)) is not None:
                both = assignment.get(first) == candidate == assignment.get(second)
                rows.append({"first": first, "second": second, "candidate": candidate, **term, "in_plan": both})
    return rows


def layer_precisions(
    model: Model | None,
    assignment: dict[str, Any],
    plan: Plan | None = None,
    latency_table: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Layers in graph order with their candidate, node name and scope (the plan's own record of them,
    else the model's), why the plan excluded them, if it did, and their predicted latency contribution
    when the plan used a latency table; layers the model no longer lists go last."""
    layers = list(model.layers) if model else []
    known = {layer["name"] for layer in layers}
    layers += [
        {"name": name, "op_type": None, "shape": [], "num_params": None} for name in assignment if name not in known
    ]
    nodes = ((plan.result or {}).get("layer_nodes") or {}) if plan else {}
    excluded = exclusions(plan) if plan else {}
    rows = []
    for layer in layers:
        node = nodes.get(layer["name"]) or {}
        rows.append(
            {
                **layer,
                "candidate": assignment.get(layer["name"], "unassigned"),
                "node_name": node.get("node_name") or layer.get("node_name") or "",
                "scope": node.get("scope") or layer.get("scope") or "",
                "excluded": (excluded.get(layer["name"]) or {}).get("reason"),
                "latency": layer_latency(latency_table, layer["name"], assignment.get(layer["name"], "")),
                "weight": round(math.log10(max(layer.get("num_params") or 1, 1)) + 1, 2),
            }
        )
    return rows


@pages.get("/plans")
def plans_page(request: Request) -> Response:
    db = _db(request)
    plans = db.plans(limit=LIST_LIMIT)
    names = db.model_names_by_id(p.model_id for p in plans)
    return render(request, "plans.html", active="Plans", plans=plans, model_names=names)


@pages.get("/plans/{plan_id}")
def plan_page(request: Request, plan_id: str, point: int | None = None) -> Response:
    db = _db(request)
    plan, artifact = db.plan_with_artifact(plan_id)
    if plan is None:
        return not_found(request, f"plan {plan_id!r}")
    model = db.get(Model, plan.model_id)
    rows = db.frontier(plan.id)
    latency_count = db.latency_counts([plan.id]).get(plan.id, 0)
    points = [point_view(p, plan) for p in rows]
    selected = next((p for p in rows if p.index == point), None)
    baselines = uniform_baselines(plan, points)
    units = plan_units(plan, points + baselines)
    words = search_words(plan)
    table = plan_latency_table(db, plan, model)
    chart = {
        "plan_id": plan.id,
        "points": points,
        "baselines": baselines,
        "constraints": (plan.request or {}).get("constraints", {}),
        "float_metric": float_metric(plan, rows),
        "metric_name": _metric_name(plan, rows),
        "predictor_label": PREDICTOR_LABELS[predictor(plan)],
        "selected": point,
        "units": {key: unit.to_dict() for key, unit in units.items()},
        "trace_name": words.trace,
        "point_word": words.point.lower(),
        "search": plan.search,
        "accuracy_latency": accuracy_latency(plan, rows),
    }
    return render(
        request,
        "plan.html",
        active="Plans",
        plan=plan,
        model=model,
        points=points,
        chart=chart,
        units=units,
        words=words,
        bisection_low=bisection_low(plan),
        artifact=artifact,
        latency_count=latency_count,
        charts=True,
        plan_layers=layer_precisions(model, plan.assignment, plan, table),
        latency_table=table,
        pair_terms=pair_terms(table, plan.assignment),
        excluded=list(exclusions(plan).values()),
        detail=_point_detail(plan, model, selected, units, table) if selected else None,
    )


PointIndex = Annotated[int, PathParam(ge=0, le=MAX_POINT_INDEX)]


@pages.get("/plans/{plan_id}/points/{index}")
def point_fragment(request: Request, plan_id: str, index: PointIndex) -> Response:
    """The per-layer detail of one frontier point, as an HTML fragment the plan page swaps in."""
    db = _db(request)
    plan = db.get(Plan, plan_id)
    rows = db.frontier(plan_id) if plan else []  # all of them: the page's units are chosen over every point
    point = next((row for row in rows if row.index == index), None)
    if plan is None or point is None:
        return not_found(request, f"frontier point {index} of plan {plan_id!r}")
    model = db.get(Model, plan.model_id)
    points = [point_view(row, plan) for row in rows]
    units = plan_units(plan, points + uniform_baselines(plan, points))
    table = plan_latency_table(db, plan, model)
    return render(request, "_point_detail.html", detail=_point_detail(plan, model, point, units, table))


@pages.api_route("/plans/{plan_id}/points/{index}/artifact", methods=["GET", "HEAD"])
def point_artifact(request: Request, plan_id: str, index: PointIndex) -> Response:
    db = _db(request)
    point = db.frontier_point(plan_id, index)
    artifact = db.get(Artifact, point.artifact_id) if point and point.artifact_id else None
    if artifact is None:
        raise Problem(404, f"frontier point {index} of plan {plan_id!r} has no artifact")
    return blob_response(request, request.app.state.store, artifact.sha256, artifact.filename, artifact.media_type)


@pages.api_route("/plans/{plan_id}/artifact", methods=["GET", "HEAD"])
def plan_artifact(request: Request, plan_id: str) -> Response:
    """The plan's quantized ONNX (the API's GET /v1/plans/{id}/artifact, for the logged-in browser)."""
    _plan, artifact = _db(request).plan_with_artifact(plan_id)
    if artifact is None:
        raise Problem(404, f"plan {plan_id!r} has no artifact")
    return blob_response(request, request.app.state.store, artifact.sha256, artifact.filename, artifact.media_type)


def _point_detail(
    plan: Plan,
    model: Model | None,
    point: FrontierPointRow,
    units: dict[str, Unit],
    latency_table: dict[str, Any] | None,
) -> dict[str, Any]:
    """One point's figures in the plan page's units (the fragment replaces part of that page)."""
    return {
        "units": units,
        "plan_id": plan.id,
        "words": search_words(plan),
        "point": point_view(point, plan),
        "measured": point.measured or {},
        "predicted": point.predicted or {},
        "artifact_url": _artifact_url(plan, point),
        "layers": layer_precisions(model, point.assignment, plan, latency_table),
        "latency_table": latency_table,
    }


def _artifact_url(plan: Plan, point: FrontierPointRow) -> str | None:
    """The point's own export, or the plan's when the point is the chosen configuration."""
    if point.artifact_id:
        return f"/plans/{plan.id}/points/{point.index}/artifact"
    if point.assignment == plan.assignment and plan.artifact_id:
        return f"/plans/{plan.id}/artifact"
    return None


def _metric_name(plan: Plan, points: list[FrontierPointRow]) -> str:
    names = [(plan.measured or {}).get("metric_name")] + [(p.measured or {}).get("metric_name") for p in points]
    return next((n for n in names if n), "metric")


# ---------------------------------------------------------------- latency


@pages.get("/latency")
def latency_index(request: Request) -> Response:
    db = _db(request)
    counts = db.latency_counts()
    plans = db.plans(ids=counts)
    names = db.model_names_by_id(p.model_id for p in plans)
    return render(request, "latency_index.html", active="Latency", plans=plans, counts=counts, model_names=names)


@pages.get("/plans/{plan_id}/latency")
def latency_page(request: Request, plan_id: str) -> Response:
    db = _db(request)
    plan = db.get(Plan, plan_id)
    if plan is None:
        return not_found(request, f"plan {plan_id!r}")
    model = db.get(Model, plan.model_id)
    rows = db.latency_measurements(plan.id, by_device=True)
    devices: dict[str, list[LatencyMeasurementRow]] = {}
    for row in rows:
        devices.setdefault(row.device_description, []).append(row)
    chart = {
        "devices": [
            {
                "device": device,
                "labels": [f"batch {r.batch_size}, {r.created_at:%m-%d %H:%M}" for r in group],
                "mean_ms": [r.mean_ms for r in group],
                "p50_ms": [r.p50_ms for r in group],
                "p90_ms": [r.p90_ms for r in group],
            }
            for device, group in devices.items()
        ]
    }
    return render(
        request,
        "latency.html",
        active="Latency",
        plan=plan,
        model=model,
        devices=devices,
        chart=chart,
        charts=bool(rows),
    )


# ---------------------------------------------------------------- jobs


@pages.get("/jobs")
def jobs_page(request: Request) -> Response:
    rows, _ = _db(request).list_jobs(limit=LIST_LIMIT)
    return render(request, "jobs.html", active="Jobs", jobs=rows, finished=FINISHED)


@pages.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> Response:
    job = _db(request).get(Job, job_id)
    if job is None:
        return not_found(request, f"job {job_id!r}")
    return render(request, "job.html", active="Jobs", job=job, finished=FINISHED)


@pages.get("/jobs/{job_id}/status")
def job_status(request: Request, job_id: str) -> Response:
    """The job as GET /v1/jobs/{id} shows it, for the job page's live progress."""
    job = _db(request).get(Job, job_id)
    if job is None:
        raise Problem(404, f"no job with id {job_id!r}")
    return JSONResponse(JobOut.of(job).model_dump(mode="json"))


@pages.post("/jobs/{job_id}/cancel", dependencies=[Depends(require_csrf)])
def cancel_job(request: Request, job_id: str) -> Response:
    """The cancel button: the form post redirects back to the job page; the script (which asks for JSON)
    gets the job as POST /v1/jobs/{id}/cancel answers it."""
    job = _db(request).request_cancel(job_id)
    if job is None:
        return not_found(request, f"job {job_id!r}")
    if wants_json(request):
        return JSONResponse(JobOut.of(job).model_dump(mode="json"), status_code=202)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


# ---------------------------------------------------------------- helpers


def _db(request: Request) -> SqlStore:
    db: SqlStore = request.app.state.db
    return db


router.include_router(pages)
