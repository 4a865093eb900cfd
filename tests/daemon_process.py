"""A `localsample daemon` process for tests: started in a short temporary root (a Unix
socket's path has at most 107 bytes) with its own state, logs, config and catalog, and
ended with SIGTERM. Shared by the daemon, attached-client and remote-engine tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai

TOKEN = "test-token-for-the-daemon"
START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    root: Path
    port: int | None

    @property
    def socket(self) -> Path:
        return self.root / "state" / "run" / "daemon.sock"

    @property
    def stderr(self) -> str:
        return (self.root / "stderr.txt").read_text()

    def client(self, token: str = TOKEN) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=token, max_retries=0, timeout=60)

    def over_socket(self) -> httpx2.Client:
        transport = httpx2.HTTPTransport(uds=str(self.socket))
        return httpx2.Client(transport=transport, base_url="http://localsample", timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "localsample", *args]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in (self.root / "logs" / "audit.jsonl").read_text().splitlines()]


def daemon_env(root: Path) -> dict[str, str]:
    """The environment of a daemon (and of its clients) whose files all live in ``root``."""
    return dict(os.environ) | {
        "LOCALSAMPLE_STATE_DIR": str(root / "state"),
        "LOCALSAMPLE_LOG_DIR": str(root / "logs"),
        "LOCALSAMPLE_CONFIG": str(root / "config.toml"),
        "LOCALSAMPLE_CATALOG_PATH": str(root / "models.toml"),
    }


def start_daemon(root: Path, listen: bool = True, *extra: str) -> Running:
    """A daemon in ``root`` (short: a Unix socket's path has at most 107 bytes), answering;
    ``extra`` arguments go to `localsample daemon`."""
    env = daemon_env(root)
    port = free_port() if listen else None
    args = ["--listen", f"127.0.0.1:{port}", "--token", TOKEN] if listen else []
    with (root / "stderr.txt").open("ab") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "localsample", "daemon", *args, *extra], env=env, stdout=errors, stderr=errors
        )
    running = Running(process, env, root, port)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert process.poll() is None, running.stderr
        try:
            with running.over_socket() as http:
                if http.get("/v1/models").status_code == 200:
                    return running
        except httpx2.TransportError:
            pass
        assert time.monotonic() < deadline, f"the daemon did not answer within {START_TIMEOUT:g} s:\n{running.stderr}"
        time.sleep(0.2)


def end(running: Running) -> None:
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGTERM)
        try:
            running.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait()


@contextmanager
def daemon_in(root: Path, listen: bool = True, *extra: str) -> Iterator[Running]:
    """A daemon in ``root`` (see ``start_daemon``) for the block; then it is ended and
    ``root`` removed."""
    running = start_daemon(root, listen, *extra)
    try:
        yield running
    finally:
        end(running)
        shutil.rmtree(root, ignore_errors=True)
