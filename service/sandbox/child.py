"""Least privilege for every process that opens a user's file: job children and upload inspectors.

The supervisor starts the child with ``start_child``: a fresh interpreter (``python -m MODULE``)
with an environment that holds no database URL, credential or ``MPQ_`` setting, a private working
directory, its output in a log file, and one socket (``service.sandbox.channel``) as its only link back:
results go through the supervisor, which alone talks to the database and the blob store.

The child calls ``enter_sandbox`` before it reads any user byte. It then
- dies with the supervisor (``PR_SET_PDEATHSIG``);
- runs under resource limits: data segment, CPU time, file size, open files, no core dumps;
- where it started as root: loses the network (a new, empty network namespace) and becomes an
  unprivileged user (``nobody`` by default) that cannot read the database file, the blob store or
  another job's directory; without root it tries the same network isolation through a user
  namespace and otherwise keeps the network (``SandboxReport`` says what applied);
- can never regain privileges (``PR_SET_NO_NEW_PRIVS``).
Input files arrive as open descriptors over the socket, so no path into the store is needed.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.sandbox.channel import Channel

# Variables a child may see; everything else (MPQ_* settings, database URLs, tokens, cloud
# credentials) stays with the supervisor.
ENV_PASSTHROUGH = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "PYTHONPATH",
    "PYTHONHASHSEED",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)
_SANDBOX_ENV = "MPQ_SANDBOX"
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 0x20, 0x1000, 0x2000, 0x4000, 0x40000
_CAPABILITY_VERSION_3 = 0x20080522


@dataclass(frozen=True)
class SandboxLimits:
    """What a child may use. ``memory_bytes`` bounds the data segment (RLIMIT_DATA: heap and
    private writable mappings) rather than the address space, because CUDA and the allocators
    reserve large address ranges they never touch; ``user`` is who the child becomes when the
    supervisor runs as root ("" keeps the supervisor's user)."""

    memory_bytes: int
    cpu_time_s: int
    file_size_bytes: int
    open_files: int = 1024
    user: str = "nobody"
    max_frame_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class SandboxReport:
    """What ``enter_sandbox`` applied, for the job log and the tests."""

    user: str  # the user it runs as, or why it is unchanged
    network: str  # "isolated" or why not
    files: str  # whether the store and database are hidden
    limits: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        limits = ", ".join(f"{name} {value}" for name, value in self.limits.items())
        return f"sandbox: user {self.user}, network {self.network}, {self.files}, limits: {limits}"


@dataclass
class Child:
    """A started child: its process, the supervisor's end of the channel, its private directory."""

    process: subprocess.Popen[bytes]
    channel: Channel
    workdir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def log_tail(self, max_bytes: int = 8000) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(log.seek(0, os.SEEK_END) - max_bytes, 0))
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Kill if still running, close the channel and remove the directory."""
        self.kill()
        self.channel.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_child(
    module: str, limits: SandboxLimits, env: Mapping[str, str] | None = None, hide: Sequence[Path] = ()
) -> Child:
    """Start ``python -m module`` as a sandboxed child; it must call ``enter_sandbox`` first.

    ``hide``: directories the child must not see (the blob store, the database's directory).
    """
    uid, gid, user_note, expose = _user_plan(limits.user)
    workdir = _make_workdir(uid, gid)
    channel, theirs = Channel.pair(limits.max_frame_bytes)
    log_path = workdir / "output.log"
    config = {
        **asdict(limits),
        "parent_pid": os.getpid(),
        "channel_fd": theirs.fileno(),
        "uid": uid,
        "gid": gid,
        "user_note": user_note,
        "expose": expose,
        "hide": _hideable(hide, workdir),
    }
    child_env = {name: os.environ[name] for name in ENV_PASSTHROUGH if name in os.environ}
    child_env.update(env or {})
    child_env.update(
        HOME=str(workdir),
        TMPDIR=str(workdir / "tmp"),
        PYTHONDONTWRITEBYTECODE="1",
        **{_SANDBOX_ENV: json.dumps(config)},
    )
    try:
        with log_path.open("wb") as log:  # created by the supervisor: the child writes through its descriptor
            process = subprocess.Popen(
                [sys.executable, "-m", module],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(theirs.fileno(),),
                env=child_env,
                cwd=workdir,
                start_new_session=True,
            )
    except BaseException:
        channel.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        theirs.close()
    return Child(process, channel, workdir, log_path)


def check_sandbox_user(user: str) -> None:
    """Raise ValueError at start-up when the configured user cannot be used."""
    _user_plan(user)


def _user_plan(user: str) -> tuple[int | None, int | None, str, list[str]]:
    """The uid and gid a child switches to (or None, and why it keeps the supervisor's user), and
    the code paths that user cannot reach as ``blocker:path`` (a child imports modules lazily long
    after it switched; with pyenv under a 0700 /root, say, the child exposes them in its own mount
    namespace before it switches)."""
    if os.geteuid() != 0:
        return None, None, "unchanged (the supervisor is not root)", []
    if not user:
        return None, None, "unchanged (MPQ_SANDBOX_USER is empty)", []
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(
            f"the sandbox user {user!r} does not exist (MPQ_SANDBOX_USER); create it or set "
            "MPQ_SANDBOX_USER to an existing unprivileged user"
        ) from None
    if entry.pw_uid == 0:
        raise ValueError(f"the sandbox user {user!r} is root; name an unprivileged user (MPQ_SANDBOX_USER)")
    expose = []
    for path in _code_paths():
        blocker = _first_blocker(path, entry.pw_uid, entry.pw_gid)
        if blocker is not None:
            expose.append(f"{blocker}:{path}")
    return entry.pw_uid, entry.pw_gid, user, expose


def _hideable(paths: Sequence[Path], workdir: Path) -> list[str]:
    """Existing directories to hide, minus any that holds the child's own directory or its code."""
    keep = [workdir, *_code_paths()]
    hidden = []
    for path in paths:
        path = Path(path).resolve()
        if path.is_dir() and not any(path == k or path in k.parents for k in keep):
            hidden.append(str(path))
    return hidden


def _code_paths() -> list[Path]:
    """Where the child's modules come from: the standard library, site-packages, this package."""
    import sysconfig

    paths = {Path(sysconfig.get_paths()[key]) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.add(Path(__file__).resolve().parents[2])  # the directory holding the service package
    return sorted(path.resolve() for path in paths if path.exists())


def _first_blocker(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory from / down to ``path`` that ``uid`` may not enter (or, for ``path``
    itself, list), by mode bits; None if the whole way is open."""
    for directory in [*reversed(path.parents), path]:
        info = directory.stat()
        shift = 6 if info.st_uid == uid else 3 if info.st_gid == gid else 0
        needed = 0o5 if directory == path else 0o1
        if (info.st_mode >> shift) & needed != needed:
            return directory
    return None


def workdir_base() -> Path:
    """One directory per supervising user; children's directories inside it are named by the
    supervisor's pid so that a restarted supervisor can remove what a killed one left."""
    base = Path(tempfile.gettempdir()) / f"mpq-sandbox-{os.geteuid()}"
    base.mkdir(mode=0o711, exist_ok=True)  # others may enter their own directory, not list the rest
    if base.stat().st_uid != os.geteuid() or base.is_symlink():
        raise RuntimeError(f"{base} is not owned by this user; refusing to start sandboxed children there")
    return base


def remove_stale_workdirs() -> int:
    """Remove children's directories whose supervisor is gone (killed with -9, say)."""
    removed = 0
    for path in workdir_base().iterdir():
        pid = path.name.split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def _make_workdir(uid: int | None, gid: int | None) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=workdir_base()))
    (workdir / "tmp").mkdir()
    if uid is not None and gid is not None:
        for path in (workdir, workdir / "tmp"):
            os.chown(path, uid, gid)
    return workdir


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- in the child


def enter_sandbox() -> tuple[Channel, SandboxReport]:
    """Apply what the supervisor chose; returns the channel to it. Call before reading user data."""
    config: dict[str, Any] = json.loads(os.environ.pop(_SANDBOX_ENV))
    die_with_parent(config["parent_pid"])
    limits = _apply_limits(config)
    isolated = _new_namespaces(as_root=os.geteuid() == 0)
    exposed = isolated and _private_filesystem(config["hide"], config["expose"])
    user = config["user_note"]
    if config["uid"] is not None and (exposed or not config["expose"]):
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(config["uid"])  # clears every capability
    elif config["uid"] is not None:
        user = f"unchanged ({config['user']} cannot read {config['expose'][0]} and no mount namespace)"
    _drop_capabilities()
    _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    network = "isolated" if isolated else f"shared ({_NAMESPACE_ERROR[0]})"
    files = f"store hidden ({len(config['hide'])} paths)" if isolated else "store visible"
    sock = socket.socket(fileno=config["channel_fd"])
    return Channel(sock, config["max_frame_bytes"]), SandboxReport(user, network, files, limits)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent ends (Linux's parent-death signal). The signal follows the
    parent's *thread* that started this process: start children from a thread that outlives them (the
    main thread, the inspector's keeper, a job's supervising thread)."""
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _apply_limits(config: Mapping[str, Any]) -> dict[str, int]:
    limits = {
        "RLIMIT_DATA": config["memory_bytes"],
        "RLIMIT_CPU": config["cpu_time_s"],
        "RLIMIT_FSIZE": config["file_size_bytes"],
        "RLIMIT_NOFILE": config["open_files"],
        "RLIMIT_CORE": 0,
    }
    applied = {}
    for name, value in limits.items():
        kind = getattr(resource, name)
        _soft, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))  # hard = soft: the child cannot raise it again
        applied[name] = value
    return applied


_NAMESPACE_ERROR = ["not tried"]


def _new_namespaces(as_root: bool) -> bool:
    """New mount and network namespaces: the network one has only a loopback that is down, so no
    connection leaves; the mount one lets the child hide the store. Without root this needs a user
    namespace, which some platforms (containers with the default seccomp profile) refuse."""
    flags = _CLONE_NEWNS | _CLONE_NEWNET | (0 if as_root else _CLONE_NEWUSER)
    uid, gid = os.getuid(), os.getgid()
    if _libc().unshare(flags) != 0:
        _NAMESPACE_ERROR[0] = f"unshare: {os.strerror(ctypes.get_errno())}"
        return False
    if not as_root:  # map ourselves, so that file ownership still reads as our own user
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    return True


def _private_filesystem(hide: list[str], expose: list[str]) -> bool:
    """Hide the store and database behind empty read-only tmpfs mounts; make the code paths in
    ``expose`` reachable for the sandbox user (each one is bound into a fresh tmpfs laid over the
    first directory above it that the user may not enter). Returns whether ``expose`` succeeded."""
    libc = _libc()
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:  # nothing propagates back
        return False
    for path in hide:
        libc.mount(
            b"tmpfs", path.encode(), b"tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"size=4k,mode=0"
        )
    return all(_expose(Path(blocked), [Path(p) for p in paths]) for blocked, paths in _by_blocker(expose).items())


def _by_blocker(expose: list[str]) -> dict[str, list[str]]:
    """Code paths grouped by the directory that blocks them (given as ``blocker:path``)."""
    groups: dict[str, list[str]] = {}
    for item in expose:
        blocker, path = item.split(":", 1)
        groups.setdefault(blocker, []).append(path)
    return groups


def _expose(blocker: Path, paths: list[Path]) -> bool:
    libc = _libc()
    stage = Path(tempfile.mkdtemp(prefix="stage-", dir=os.environ["TMPDIR"]))
    staged = []
    for index, path in enumerate(paths):
        target = stage / str(index)
        target.mkdir()
        if libc.mount(str(path).encode(), str(target).encode(), None, _MS_BIND | _MS_REC, None) != 0:
            return False
        staged.append((target, path))
    if libc.mount(b"tmpfs", str(blocker).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=64k,mode=0755") != 0:
        return False
    for target, path in staged:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o755)
        if libc.mount(str(target).encode(), str(path).encode(), None, _MS_MOVE, None) != 0:
            return False
    libc.mount(None, str(blocker).encode(), None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None)
    return True


def _drop_capabilities() -> None:
    """Whatever user the child ends as, it keeps no capability (root without a user switch, or
    the owner of a fresh user namespace, could otherwise undo the mounts)."""
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _libc().capset(header, data)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)
