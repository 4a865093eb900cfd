"""Read-only reports behind `localsample models show` and `localsample ps`.

Every `serve` process writes what it has loaded to ``state_dir/run/<pid>.json`` (and
removes it on exit); :func:`daemons` reads those files, so `ps` sees every daemon a host
started, without a socket. A file whose process is gone is removed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsample.catalog import ModelEntry
from localsample.errors import ModelFileError
from localsample.gguf_file import GGUFInfo, read_gguf
from localsample.manage import details
from localsample.runtime import Runtime


@dataclass(frozen=True)
class ModelReport:
    """One model as `models show` reports it: catalog entry, GGUF header, files on disk."""

    entry: ModelEntry
    info: GGUFInfo | None
    """The GGUF header; None when the model is not downloaded."""
    files: list[Path]
    """Every file on disk: all parts of a split model, then its vision projector."""

    @property
    def downloaded(self) -> bool:
        return bool(self.files)

    @property
    def size(self) -> int | None:
        return sum(f.stat().st_size for f in self.files) if self.files else None

    @property
    def vision_projector(self) -> Path | None:
        """The mmproj file, when the catalog names one and it is on disk."""
        if self.info is None or not self.entry.mmproj or len(self.files) <= self.info.split_count:
            return None
        return self.files[-1]

    @property
    def projector_reads(self) -> tuple[str, ...]:
        """What the projector reads (``vision``, ``audio``), from its GGUF header."""
        projector = self.vision_projector
        if projector is None:
            return ()
        try:
            return read_gguf(projector).projector_reads
        except ModelFileError:
            return ()

    def as_json(self) -> dict[str, object]:
        entry, info = self.entry, self.info
        data: dict[str, object] = {
            "id": entry.id,
            "status": "downloaded" if self.downloaded else "missing",
            "source": entry.source,
            "path": str(self.files[0]) if self.files else None,
            "size": self.size,
            "aliases": entry.aliases,
            "capabilities": entry.capabilities,
            "scores": {"cost": entry.cost, "speed": entry.speed, "intelligence": entry.intelligence},
            "load": entry.load.model_dump(exclude_none=True),
        }
        if info is not None:
            projector = self.vision_projector
            data |= {
                "architecture": info.architecture,
                "parameters": info.parameters,
                "quantization": info.quantization,
                "context_length": info.context_length,
                "chat_template": info.template_family if info.chat_template else None,
                "chat_template_override": entry.chat_template is not None,
                "split_parts": info.split_count,
                "vision_projector": str(projector) if projector else None,
                "projector_reads": list(self.projector_reads),
            }
        return data


def model_report(runtime: Runtime, name: str) -> ModelReport:
    """The report for catalog id or alias ``name`` (UnknownModelError if there is none)."""
    entry, info, files = details(runtime, name)
    return ModelReport(entry, info, files)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (it may belong to another user)."""
    if pid <= 0:  # 0 and negative numbers address process groups, not one process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemons(state_dir: Path) -> list[dict[str, Any]]:
    """The status every running `serve` published: pid, start time, models loaded."""
    found = []
    for file in sorted((state_dir / "run").glob("*.json")):
        try:
            status = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not alive(int(status.get("pid", 0))):
            file.unlink(missing_ok=True)
            continue
        found.append(status)
    return found
