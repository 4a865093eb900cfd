"""The audit trail: one JSON line per sampling request, in ``log_dir/audit.jsonl``.

Each line is an ``AuditRecord``: ``time`` (UTC, ISO 8601), ``server``, ``request_id``,
``protocol``, ``decision`` (approved / rejected / cancelled / busy / load_failed /
error) and ``by``
(who decided), ``model`` and
``reason`` (why that model), ``prompt_tokens``, ``completion_tokens``,
``time_to_first_token`` and ``duration`` (seconds), ``stop_reason``, ``tools_called``
(the names of the tools the model called, never their arguments), ``endpoint`` (the
remote engine's URL, for a remote model) and ``error``; with
``audit_text = true`` also ``system``, ``messages`` and ``response`` (with the calls).

``origin`` says which front end the request came through when it is not a server's own
sampling request: ``run`` for the agent's model steps (server ``run``) and for sampling its
servers ask for during a run. The agent also writes one line per tool call it makes:
``server`` (the tool's), ``origin`` ``run``, ``tool``, ``decision`` and ``by`` (approval),
``is_error`` and ``duration``; with ``audit_text`` also ``arguments`` and ``result``.

The file is created with mode 0600, in a 0700 directory. When a line would take it past ``audit_max_bytes`` it
is rotated: ``audit.jsonl`` → ``audit.jsonl.1`` → … → ``audit.jsonl.N`` (``audit_backups``),
the oldest dropped, so the trail never takes more than (N + 1) x ``audit_max_bytes``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from localsample.settings import private_dir

if TYPE_CHECKING:
    from localsample.settings import Settings

AuditDecision = Literal["approved", "rejected", "cancelled", "busy", "load_failed", "error"]


@dataclass
class AuditRecord:
    """One audited request; fields stay None until the pipeline knows them."""

    server: str
    request_id: str
    protocol: str | None = None
    origin: str | None = None
    tool: str | None = None  # set on the line of a tool call the agent made
    is_error: bool | None = None
    decision: AuditDecision | None = None
    by: str | None = None
    model: str | None = None
    reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    time_to_first_token: float | None = None
    duration: float | None = None
    stop_reason: str | None = None
    tools_called: list[str] | None = None  # names only: arguments are text (audit_text)
    endpoint: str | None = None  # the remote engine that answered (catalog entries with endpoints)
    media: list[str] | None = None  # each image or audio clip's type, size, dimensions: never its bytes
    error: str | None = None
    # Only with audit_text = true:
    system: str | None = None
    messages: list[list[str]] | None = None
    response: str | None = None
    arguments: str | None = None
    result: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The record as written: fields that were never set are left out."""
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v is not None or k in ("server", "request_id", "protocol")}


class AuditLog:
    @classmethod
    def from_settings(cls, settings: Settings) -> AuditLog:
        return cls(
            settings.log_dir / "audit.jsonl",
            max_bytes=settings.audit_max_bytes,
            backups=settings.audit_backups,
            include_text=settings.audit_text,
        )

    def __init__(self, path: Path, *, max_bytes: int, backups: int, include_text: bool) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.include_text = include_text
        self._lock = threading.Lock()

    def write(self, record: AuditRecord) -> None:
        """Append one record (a failure to write is logged by the caller, never fatal)."""
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        line = json.dumps({"time": stamp, **record.as_json()}) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            private_dir(self.path.parent)
            if self.path.exists() and self.path.stat().st_size + len(data) > self.max_bytes:
                self._rotate()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(self.backups, 0, -1):
            older = self._rotated(index)
            if index == self.backups:
                older.unlink(missing_ok=True)
            newer = self._rotated(index - 1) if index > 1 else self.path
            if newer.exists():
                newer.replace(older)

    def _rotated(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record, oldest first (rotated files, then the current one)."""
        files = [self._rotated(i) for i in range(self.backups, 0, -1)] + [self.path]
        for file in files:
            if not file.exists():
                continue
            with file.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash

    def tail(self, count: int) -> list[dict[str, Any]]:
        return list(deque(self.records(), maxlen=count))

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per server: requests, by decision, tokens, mean duration, models used, and the
        tool calls `run` made on it."""
        result: dict[str, dict[str, Any]] = {}
        for record in self.records():
            entry = result.setdefault(
                str(record.get("server")),
                {
                    "requests": 0,
                    "decisions": Counter(),
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "seconds": 0.0,
                    "models": Counter(),
                    "tool_calls": 0,
                },
            )
            if record.get("tool"):
                entry["tool_calls"] += 1
                continue
            entry["requests"] += 1
            entry["decisions"][record.get("decision", "?")] += 1
            entry["prompt_tokens"] += record.get("prompt_tokens") or 0
            entry["completion_tokens"] += record.get("completion_tokens") or 0
            entry["seconds"] += record.get("duration") or 0.0
            if record.get("model"):
                entry["models"][record["model"]] += 1
        for entry in result.values():
            entry["decisions"] = dict(entry["decisions"])
            entry["models"] = dict(entry["models"])
            entry["seconds"] = round(entry["seconds"], 3)
        return result
