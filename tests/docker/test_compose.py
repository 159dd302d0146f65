"""No Docker engine runs here: check the deployment files are coherent instead."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.cli.commands import _parser

DOCKER = Path(__file__).resolve().parents[2] / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _mpq_commands(compose: dict) -> list[list[str]]:
    commands = [
        service["command"]
        for service in compose["services"].values()
        if isinstance(service.get("command"), list) and service["command"][0] == "mpq"
    ]
    for dockerfile in DOCKER.glob("Dockerfile*"):
        for match in re.finditer(r"^CMD (\[.*\])$", dockerfile.read_text(), re.MULTILINE):
            command = yaml.safe_load(match.group(1))
            if command[0] == "mpq":
                commands.append(command)
    return commands


def test_every_mpq_command_exists_in_the_cli(compose):
    commands = _mpq_commands(compose)
    assert len(commands) >= 4
    for command in commands:
        args = _parser().parse_args(command[1:])  # argparse exits on an unknown command or flag
        assert hasattr(args, "handler"), command


def test_topology(compose):
    services = compose["services"]
    assert {"postgres", "redis", "api", "worker"} <= set(services)
    for name in ("postgres", "redis", "api"):
        assert "healthcheck" in services[name], name
    assert "--upgrade-db" in services["api"]["command"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["MPQ_EXECUTOR"] == "celery" and env["MPQ_DATABASE_URL"].startswith("postgresql")
        assert "artifacts:/artifacts" in services[name]["volumes"]
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (DOCKER.parent / build["dockerfile"]).is_file(), name


def test_images_never_run_as_root():
    for dockerfile in DOCKER.glob("Dockerfile*"):
        users = re.findall(r"^USER (\S+)$", dockerfile.read_text(), re.MULTILINE)
        assert users and users[-1] not in ("root", "0"), dockerfile.name
