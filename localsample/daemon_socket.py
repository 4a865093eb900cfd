"""Where `localsample daemon` listens and how other processes reach it: the paths in the
state directory, the routes only its Unix socket serves, and the small requests `ps`,
`daemon stop` and attaching clients make. The client side only: importing this module
loads no server code, no ``openai`` package and no llama.cpp (a client attached to a
daemon starts fast).

``state_dir/run`` (0700) holds ``daemon.sock`` (0600: its permissions are the credential),
``daemon.lock`` (held by the running daemon, naming its pid) and ``daemon.log`` (the log
of a daemon started by ``daemon = "spawn"``).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

import httpx2

from localsample.errors import DaemonError
from localsample.settings import Settings

__all__ = [
    "ASK_PATH",
    "ATTACH_PATH",
    "LOCK_NAME",
    "SOCKET_MODE",
    "SOCKET_URL",
    "STATUS_PATH",
    "STOP_PATH",
    "daemon_status",
    "is_locked",
    "log_path",
    "run_dir",
    "socket_path",
    "stop_daemon",
]

SOCKET_NAME = "daemon.sock"
LOCK_NAME = "daemon.lock"
LOG_NAME = "daemon.log"
SOCKET_MODE = 0o600
SOCKET_URL = "http://localsample"
"""The base URL of requests over the Unix socket (the host name is not looked at)."""
STATUS_PATH = "/localsample/status"
STOP_PATH = "/localsample/stop"
ATTACH_PATH = "/localsample/attach"
ASK_PATH = "/localsample/asks/{ask_id}"
STOP_WAIT_S = 10.0
"""How long `localsample daemon stop` waits for the daemon to exit."""


def run_dir(settings: Settings) -> Path:
    """Where running daemons keep their socket, lock and status (as `ps` reads them)."""
    return settings.state_dir / "run"


def socket_path(settings: Settings) -> Path:
    return run_dir(settings) / SOCKET_NAME


def log_path(settings: Settings) -> Path:
    return run_dir(settings) / LOG_NAME


def is_locked(path: Path) -> bool:
    """Whether a live daemon holds the lock at ``path``."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def socket_request(settings: Settings, method: str, path: str) -> dict[str, Any]:
    """A request to the running daemon over its socket; DaemonError if none answers."""
    sock = socket_path(settings)
    fix = "start one with `localsample daemon`"
    if not sock.exists():
        raise DaemonError(f"no localsample daemon runs (no socket at {sock})", fix)
    try:
        # No TLS on a Unix socket: verify=False skips building an SSL context (~40 ms).
        with httpx2.Client(transport=httpx2.HTTPTransport(uds=str(sock), verify=False), timeout=10.0) as client:
            response = client.request(method, SOCKET_URL + path)
    except httpx2.TransportError as exc:
        raise DaemonError(f"no localsample daemon answers on {sock} ({exc})", fix) from exc
    if response.status_code != 200:
        raise DaemonError(f"the daemon on {sock} answered {method} {path} with {response.status_code}", None)
    data: dict[str, Any] = response.json()
    return data


def daemon_status(settings: Settings) -> dict[str, Any]:
    """What the running daemon reports: pid, socket, listen address, loaded models, clients."""
    return socket_request(settings, "GET", STATUS_PATH)


def stop_daemon(settings: Settings, wait: float = STOP_WAIT_S) -> int:
    """Ask the running daemon to exit and wait until it has; its pid. DaemonError if none
    runs, or if it is still running after ``wait`` seconds."""
    pid = int(socket_request(settings, "POST", STOP_PATH)["pid"])
    lock = run_dir(settings) / LOCK_NAME
    deadline = time.monotonic() + wait
    while is_locked(lock):
        if time.monotonic() > deadline:
            raise DaemonError(f"the daemon (pid {pid}) did not stop within {wait:g} s", f"end it with `kill {pid}`")
        time.sleep(0.05)
    return pid
