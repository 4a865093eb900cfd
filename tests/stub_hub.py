"""A local stand-in for the Hugging Face hub, for download tests (HF_ENDPOINT points here).

It answers the requests huggingface-hub makes: HEAD/GET ``/{repo}/resolve/{rev}/{path}``
(with ``Range``), ``GET /api/models/{repo}/tree/{rev}`` and ``POST /api/models/{repo}/
paths-info/{rev}``, and 404s with ``X-Error-Code`` for unknown repos, revisions and files.
Faults can be switched on per file: serve wrong bytes (checksum mismatch) or drop the
connection after some bytes (an interrupted transfer).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def make_gguf(
    arch: str = "llama",
    name: str = "Tiny Test",
    file_type: int = 15,
    context: int = 4096,
    template: str | None = CHATML,
    tensors: int = 2,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """A small GGUF v3 with a real header (key/values, tensor infos) and zeroed data."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    values: dict[str, Any] = {"general.architecture": arch, "general.name": name, "general.file_type": file_type}
    values[f"{arch}.context_length"] = context
    if template is not None:
        values["tokenizer.chat_template"] = template
    values.update(extra or {})
    body = b""
    for key, value in values.items():
        body += string(key)
        if isinstance(value, str):
            body += struct.pack("<I", 8) + string(value)
        elif isinstance(value, list):  # an array of strings, as vocabularies are
            body += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(string(v) for v in value)
        else:
            body += struct.pack("<II", 4, value)
    for i in range(tensors):
        body += string(f"blk.{i}.weight") + struct.pack("<IQQIQ", 2, 8, 4, 0, i * 128)
    header = b"GGUF" + struct.pack("<IQQ", 3, tensors, len(values)) + body
    header += b"\0" * (-len(header) % 32)
    return header + b"\0" * (128 * tensors)


@dataclass
class StubHub:
    repos: dict[str, dict[str, bytes | Path]] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)  # paths served with wrong bytes
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before dropping
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def data(self, repo: str, path: str) -> bytes:
        value = self.repos[repo][path]
        return value.read_bytes() if isinstance(value, Path) else value

    def sha256(self, repo: str, path: str) -> str:
        return hashlib.sha256(self.data(repo, path)).hexdigest()

    def start(self) -> StubHub:
        handler = type("Handler", (StubHandler,), {"hub": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class StubHandler(BaseHTTPRequestHandler):
    """Answers huggingface-hub's requests from ``hub`` (set on a subclass per server)."""

    hub: StubHub

    def log_message(self, *args: Any) -> None:
        pass

    def fail(self, code: str, status: int = 404) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route(self) -> tuple[str, str, str, str] | None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append(f"{self.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 5:
            return "api", "/".join(parts[2:4]), parts[5] if len(parts) > 5 else "main", parts[4]
        if len(parts) >= 5 and parts[2] == "resolve":
            return "file", "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        return None

    def check(self, repo: str, rev: str) -> bool:
        if repo not in self.hub.repos:
            self.fail("RepoNotFound", 401)
            return False
        if rev not in ("main", COMMIT):
            self.fail("RevisionNotFound")
            return False
        return True

    def listing(self, repo: str, paths: list[str] | None) -> list[dict[str, Any]]:
        items = []
        for path in self.hub.repos[repo]:
            if paths is not None and path not in paths:
                continue
            size, sha = len(self.hub.data(repo, path)), self.hub.sha256(repo, path)
            lfs = {"oid": sha, "size": size, "pointerSize": 134}
            items.append({"type": "file", "path": path, "size": size, "oid": sha[:40], "lfs": lfs})
        return items

    def send_json(self, payload: Any) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:  # paths-info
        route = self.route()
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        if route is None or route[0] != "api" or route[3] != "paths-info":
            return self.fail("EntryNotFound")
        if self.check(route[1], route[2]):
            self.send_json(self.listing(route[1], form.get("paths", [])))

    def do_GET(self) -> None:
        self.serve(body=True)

    def do_HEAD(self) -> None:
        self.serve(body=False)

    def serve(self, body: bool) -> None:
        route = self.route()
        if route is None:
            return self.fail("EntryNotFound")
        kind, repo, rev, rest = route
        if not self.check(repo, rev):
            return
        if kind == "api":
            return self.send_json(self.listing(repo, None)) if rest == "tree" else self.fail("EntryNotFound")
        if rest not in self.hub.repos[repo]:
            return self.fail("EntryNotFound")
        data = self.hub.data(repo, rest)
        sha = self.hub.sha256(repo, rest)
        if rest in self.hub.corrupt:
            data = data[:-16] + b"\xff" * 16
        start = 0
        if body and (header := self.headers.get("Range")):
            start = int(header.removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{sha}"')
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        cut = self.hub.cut_after.get(rest)
        payload = data[start:] if cut is None else data[start:cut]
        self.wfile.write(payload)
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
