"""The light client install (service/cli/installs.py): `pip install mpq` without torch and the server
stack runs every --server command, and a command that needs more says which extra, in one line.

The CLI runs in subprocesses in which torch, onnx, onnxruntime, fastapi, sqlalchemy, celery, scipy,
sklearn and onnxscript cannot be imported (tests/service/light_client.py), against a real server on 127.0.0.1; the
slow tests also build a real light install in a fresh virtual environment (pip, PyPI).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import subprocess
import tomllib
from importlib.metadata import distribution

import numpy as np
import pytest

from service.api.auth import create_token
from service.cli import commands
from service.cli.installs import LOCAL, SERVER, SERVER_COMMANDS, Install, missing_install
from tests.models import tiny_onnx_model
from tests.service.helpers import enable_auth, sqlite_only
from tests.service.light_client import (
    BLOCKED,
    REPO,
    copy_sources,
    create_venv,
    findable,
    pip_install,
    run_blocked_mpq,
)

NOTHING_HEAVY: dict[str, list[str]] = {"asked": [], "loaded": []}


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx_model().SerializeToString())
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((32, 8)).astype(np.float32), labels=rng.integers(0, 3, 32))
    return model, data


@pytest.fixture
def token(app):
    enable_auth(app)
    return create_token(app.state.db, "ci")[1]


# ---------------------------------------------------------------- what each install holds


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    """Distribution names of pyproject requirements (extras and versions dropped), this project's own left out."""
    names = {_normalized(re.match(r"[A-Za-z0-9._-]+", text).group()) for text in requirements}  # type: ignore[union-attr]
    return names - {"mpq"}


def _modules_of(distributions: set[str]) -> set[str]:
    """The top-level modules the installed distributions provide."""
    return set().union(*(_top_level_modules(name) for name in distributions))


@functools.cache
def _top_level_modules(name: str) -> frozenset[str]:
    """Read off the distribution's RECORD as text (``packages_distributions()`` reads every installed
    distribution's, and ``Distribution.files`` makes a path object per file: a second over torch's)."""
    modules = set()
    for line in (distribution(name).read_text("RECORD") or "").splitlines():
        top, folder, _ = line.partition(",")[0].partition("/")
        if not top.endswith((".dist-info", ".data")) and top != ".." and (folder or top.endswith(".py")):
            modules.add(top.removesuffix(".py"))
    return frozenset(modules)


def test_the_installs_name_the_modules_of_pyproject_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    local, server = _requirement_names(extras["local"]), _requirement_names(extras["server"])
    assert "mpq[local]" in extras["server"]  # the server install holds the local one
    for install, distributions in ((LOCAL, local), (SERVER, local | server)):
        provided = _modules_of(distributions)
        assert set(install.modules) <= provided, f"{install.extra}: not in pyproject's extra"
        for requirement in distributions:  # every requirement of the extra is checked for
            assert _modules_of({requirement}) & set(install.modules), f"{install.extra}: {requirement} unchecked"
    # the client (plain dependencies) holds none of what a CI job that only talks to a server skips
    assert not _modules_of(_requirement_names(project["dependencies"])) & set(BLOCKED)
    assert set(BLOCKED) <= set(SERVER.modules)


def test_a_missing_install_is_named_in_one_line():
    assert missing_install(Install("local", ("json",)), "mpq plan") is None
    message = missing_install(Install("local", ("json", "mpq_absent_a")), "mpq plan", ", or give --server URL")
    assert message == (
        "mpq plan needs the local install (mpq_absent_a not installed): pip install 'mpq[local]', or give --server URL"
    )
    many = Install("server", tuple(f"mpq_absent_{n}" for n in range(6)))
    assert "(mpq_absent_0, mpq_absent_1, mpq_absent_2, mpq_absent_3 and 2 more not installed)" in str(
        missing_install(many, "mpq serve")
    )


@pytest.mark.parametrize("argv", [["serve"], ["worker"], ["demo"], ["db", "current"], ["token", "list"]])
def test_every_server_command_checks_the_server_install(argv):
    args = commands._parser().parse_args(argv)
    assert argv[0] in SERVER_COMMANDS
    assert args.missing_install.args == (SERVER, f"mpq {argv[0]}")
    assert args.missing_install() is None  # this environment has the full install


# ---------------------------------------------------------------- the CLI with the heavy packages blocked


def test_help_needs_none_of_the_heavy_packages(tmp_path):
    result, imports = run_blocked_mpq("--help", report=tmp_path / "imports.json")
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("serve", "sensitivity", "plan", "token"))
    assert imports == NOTHING_HEAVY


@sqlite_only
def test_a_remote_command_reaches_the_server_without_the_heavy_packages(app, live_server, files, tmp_path):
    """A real exchange with the server (refused: auth is on and the token is wrong), fast enough for the
    fast tier; the slow test below runs whole jobs."""
    enable_auth(app)
    model, data = files
    result, imports = run_blocked_mpq(
        *("plan", str(model), "--data", str(data), "--max-size-mb", "1", "--server", live_server, "--json"),
        report=tmp_path / "imports.json",
        env={"MPQ_TOKEN": "mpq_wrong"},
    )
    assert result.returncode == 2, result.stderr
    document = json.loads(result.stdout)
    assert document["exit_code"] == 2 and "HTTP 401" in document["error"]
    assert imports == NOTHING_HEAVY


def test_a_local_command_says_which_install_it_needs(files, tmp_path):
    model, data = files
    result, imports = run_blocked_mpq(
        "plan", str(model), "--data", str(data), "--max-size-mb", "1", "--json", report=tmp_path / "imports.json"
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "mpq: mpq plan without --server needs the local install (torch, onnx, onnxruntime, scipy and 1 more not "
        "installed): pip install 'mpq[local]', or run it on a server with --server URL"
    ]
    assert json.loads(result.stdout)["problem"] == "missing_install"
    assert imports["loaded"] == []  # looked for (find_spec), never imported
    assert set(imports["asked"]) == set(LOCAL.modules)


def test_a_server_command_says_which_install_it_needs(tmp_path):
    result, imports = run_blocked_mpq(
        "serve", report=tmp_path / "imports.json", env={"MPQ_DATA_DIR": str(tmp_path / "data")}
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("mpq: mpq serve needs the server install (torch, onnx, onnxruntime, scipy and ")
    assert line.endswith("not installed): pip install 'mpq[server]'")
    assert imports["loaded"] == [] and not (tmp_path / "data").exists()  # nothing done


@pytest.mark.slow
@sqlite_only
def test_the_remote_commands_run_jobs_without_the_heavy_packages(app, live_server, files, token, tmp_path):
    model, data = files
    out = tmp_path / "q.onnx"
    env = {"MPQ_TOKEN": token}
    plan, imports = run_blocked_mpq(
        *("plan", str(model), "--data", str(data), "--server", live_server, "--candidates", "fp32,w8a8,w4"),
        *("--max-bops", "30000", "--method", "hawq_v2", "--max-probes", "16", "--out", str(out), "--json"),
        report=tmp_path / "plan-imports.json",
        env=env,
        timeout=300,
    )
    assert plan.returncode == 0, plan.stderr
    document = json.loads(plan.stdout)
    assert document["meets_constraints"] is True and set(document["plan"]["layers"]) == {"fc1.weight", "fc2.weight"}
    assert hashlib.sha256(out.read_bytes()).hexdigest() == document["artifact_sha256"]
    assert imports == NOTHING_HEAVY

    sensitivity, imports = run_blocked_mpq(
        *(
            "sensitivity",
            str(model),
            "--data",
            str(data),
            "--server",
            live_server,
            "--method",
            "hawq_v2",
            "--max-probes",
            "16",
        ),
        *("--method", "interlayer", "--json"),
        report=tmp_path / "sensitivity-imports.json",
        env=env,
        timeout=300,
    )
    assert sensitivity.returncode == 0, sensitivity.stderr
    document = json.loads(sensitivity.stdout)
    assert [row["name"] for row in document["layers"]] == ["fc1.weight", "fc2.weight"]
    assert all(row["probes"] == 16 for row in document["layers"])
    assert document["interlayer"]["bits"] == [8, 4] and len(document["interlayer"]["G"]) == 4
    assert imports == NOTHING_HEAVY


# ---------------------------------------------------------------- a real light install

# pip builds the project and installs numpy, httpx and pydantic: 13 s here with pip's cache warm
# (docs/benchmarks.md, "Client install"); the bound leaves room for a cold cache.
INSTALL_TIMEOUT_S = 300


@pytest.mark.slow
@sqlite_only
def test_a_real_light_install_runs_the_remote_commands(app, live_server, files, tmp_path):
    python = create_venv(tmp_path / "venv")
    pip_install(python, str(copy_sources(tmp_path / "src")), timeout=INSTALL_TIMEOUT_S)
    assert findable(python, BLOCKED) == []
    mpq = str(tmp_path / "venv" / "bin" / "mpq")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([mpq, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)

    assert run("--help").returncode == 0
    model, data = files
    remote = run(
        "sensitivity",
        str(model),
        "--data",
        str(data),
        "--server",
        live_server,
        "--method",
        "hawq_v2",
        "--max-probes",
        "8",
        "--json",
    )
    assert remote.returncode == 0, remote.stderr
    assert [row["name"] for row in json.loads(remote.stdout)["layers"]] == ["fc1.weight", "fc2.weight"]
    local = run("plan", str(model), "--data", str(data), "--max-size-mb", "1")
    assert local.returncode == 2 and "pip install 'mpq[local]'" in local.stderr
    assert "Traceback" not in local.stderr
