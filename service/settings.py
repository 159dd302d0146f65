"""Service settings, read from the environment with the ``MPQ_`` prefix (pydantic-settings)."""

from __future__ import annotations

import ipaddress
import re
from enum import Enum, StrEnum
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KiB = 1024
GiB = 1024**3
LOOPBACK_HOST_NAMES = ("127.0.0.1", "localhost", "[::1]")
_HOST_NAME = re.compile(r"[a-z0-9.-]+|\[[0-9a-f:.]+\]")  # a DNS name, an IPv4 address or a bracketed IPv6 one


class AuthMode(StrEnum):
    off = "off"  # local default: no tokens, and the server only binds to loopback
    token = "token"  # every /v1 route needs a bearer API token


class ExecutorKind(StrEnum):
    embedded = "embedded"
    celery = "celery"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MPQ_", extra="ignore")

    data_dir: Path = Field(Path("mpq-data"), description="Directory for the embedded SQLite database and artifacts.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db. Default: SQLite file in data_dir."
    )
    artifact_dir: Path | None = Field(None, description="Content-addressed blob store. Default: data_dir/artifacts.")
    max_upload_bytes: int = Field(2 * GiB, gt=0, description="Largest accepted upload (model or dataset), in bytes.")
    auth: AuthMode = Field(AuthMode.off, description="'off' (loopback only) or 'token' (bearer API tokens).")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    allow_torch_uploads: bool = Field(
        True,
        description="Accept torch.export (.pt2) archives (checked: no pickles, aten ops only; see docs/security.md).",
    )
    max_decompressed_bytes: int = Field(
        4 * GiB,
        gt=0,
        description="Largest unpacked size of one upload (zip "
        "bundle, .npz, .pt2), checked from its headers before anything is read.",
    )
    sandbox_user: str = Field(
        "nobody",
        description="When the server runs as root, job and inspector processes "
        "run as this unprivileged user ('' keeps root, without capabilities).",
    )
    job_memory_bytes: int = Field(8 * GiB, gt=0, description="Memory budget of one job process (RLIMIT_DATA).")
    inspector_processes: int = Field(
        2, ge=1, le=64, description="Upload inspections that may run at once, each in its own sandboxed process."
    )
    inspect_time_limit_s: float = Field(60.0, gt=0, le=3600, description="Longest one upload inspection may take.")
    inspect_memory_bytes: int = Field(3 * GiB, gt=0, description="Memory budget of one inspector process.")
    max_concurrent_uploads: int = Field(16, ge=1, description="Uploads streaming at once, all clients together.")
    max_uploads_per_client: int = Field(
        4, ge=1, description="Uploads streaming at once from one client (token, or address when auth is off)."
    )
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, description="An upload that sends nothing for this long is cut (408)."
    )
    upload_min_bytes_per_s: float = Field(
        10 * KiB,
        ge=0,
        description="An upload averaging less over any "
        "MPQ_UPLOAD_IDLE_TIMEOUT_S is cut (408): a trickle holds no slot.",
    )
    quota_bytes_per_owner: int | None = Field(
        50 * GiB,
        gt=0,
        description="Stored bytes (models, datasets, "
        "artifacts) one token may own; uploads beyond get 413. Unset: none.",
    )
    quota_bytes_total: int | None = Field(
        None, gt=0, description="Stored bytes of all owners together; uploads beyond get 507. Unset: none."
    )
    allowed_hosts: str = Field(
        "",
        description="Comma-separated host names (without port) the server answers to "
        "besides 127.0.0.1, localhost and [::1]; other Host headers get 400.",
    )
    max_request_body_bytes: int = Field(
        256 * KiB,
        gt=0,
        description="Largest request body of any route but the uploads (those have MPQ_MAX_UPLOAD_BYTES).",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection that has not sent a request's headers within this time is closed."
    )
    min_free_bytes: int = Field(GiB, ge=0, description="/readyz fails when the artifact store has less free space.")
    max_dataset_arrays: int = Field(64, gt=0, description="Most arrays one dataset .npz may hold.")
    max_archive_members: int = Field(4096, gt=0, description="Most files one uploaded zip archive may hold.")
    executor: ExecutorKind = Field(
        ExecutorKind.embedded,
        description="'embedded' (child processes of the server) "
        "or 'celery' (jobs go to MPQ_BROKER_URL, run by `mpq worker`).",
    )
    worker_slots: int = Field(1, ge=0, le=64, description="Embedded executor: jobs run at once (one GPU each).")
    gpus: str | None = Field(
        None,
        description="Comma-separated GPU ids for the slots (CUDA_VISIBLE_DEVICES); "
        "default: none, jobs use what they find.",
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis or RabbitMQ).")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="How often a running job reports it is alive.")
    heartbeat_timeout_s: float = Field(60.0, gt=0, description="A running job silent this long is presumed dead.")
    cancel_grace_s: float = Field(
        10.0, ge=0, description="After a cancel, wait this long before SIGTERM, and as long again before SIGKILL."
    )
    max_attempts: int = Field(2, ge=1, description="A job whose worker died is requeued until it ran this often.")
    job_time_limit_s: float = Field(
        6 * 3600,
        gt=0,
        description="Longest a job may run: its supervisor stops it "
        "(failed, 'time limit'); also sets the broker's visibility timeout.",
    )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'mpq.db').resolve()}"

    @property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or self.data_dir / "artifacts"

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        for name in filter(None, (name.strip().lower() for name in value.split(","))):
            if not _HOST_NAME.fullmatch(name):
                raise ValueError(
                    f"MPQ_ALLOWED_HOSTS: {name!r} is not a host name; list names without scheme or "
                    "port (any port is allowed), e.g. mpq.example.com,[2001:db8::1]"
                )
        return value

    @property
    def allowed_host_names(self) -> frozenset[str]:
        """Host names (lower case, ports stripped by the caller) a request's Host header may carry."""
        extra = (name.strip().lower() for name in self.allowed_hosts.split(","))
        return frozenset(LOOPBACK_HOST_NAMES) | {name for name in extra if name}

    def check_bind(self) -> None:
        """With auth off, refuse to listen anywhere but loopback."""
        if self.auth is AuthMode.off and not _is_loopback(self.host):
            raise ValueError(
                f"refusing to bind {self.host!r} with auth off: set MPQ_AUTH=token (and create a token with "
                "`mpq token create --name NAME`) or bind 127.0.0.1"
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_help() -> str:
    """One line per setting, for ``mpq serve --help``."""
    lines = ["settings (environment variables):"]
    for name, field in Settings.model_fields.items():
        default = field.default.value if isinstance(field.default, Enum) else field.default
        lines.append(f"  MPQ_{name.upper():<22} {field.description} [default: {default}]")
    return "\n".join(lines)
