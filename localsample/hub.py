"""Pulling GGUF models from the Hugging Face hub into the shared HF cache.

A REF is a catalog id or alias, ``hf://ORG/REPO/FILE.gguf``, or ``ORG/REPO[:QUANT]``
(the GGUF of that quantization, Q4_K_M by default; a split model's parts and a vision
repo's mmproj file come along). Files go through ``hf_hub_download`` into the HF cache,
so other tools reuse them; each is checked against the hub's sha256 before the model is
registered, so a partial or damaged download is never in the catalog. Only ``pull``
touches the network: ``serve``, ``call`` and ``sample`` read the cache offline.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localsample.catalog import HF_SOURCE, Catalog, ModelEntry, cached_hf_file, new_entry_fields
from localsample.errors import HubError
from localsample.gguf_file import SPLIT, GGUFInfo, human_size, id_like, quant_from_name, sha256_file, split_parts

DEFAULT_QUANT = "Q4_K_M"
REPO_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<quant>[\w.-]+))?$")


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None


@dataclass
class PullPlan:
    """What to download for a REF, and the catalog entry it makes (None: already listed)."""

    repo: str
    revision: str | None
    files: list[RemoteFile]
    mmproj: RemoteFile | None = None
    entry_id: str | None = None
    existing: ModelEntry | None = None
    quant: str | None = None
    listing: list[RemoteFile] = field(default_factory=list)

    @property
    def source(self) -> str:
        return f"hf://{self.repo}/{self.files[0].path}"

    @property
    def all_files(self) -> list[RemoteFile]:
        return self.files + ([self.mmproj] if self.mmproj else [])


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_error(exc: BaseException, what: str) -> HubError:
    """A clear error for whatever huggingface-hub or the network raised."""
    from huggingface_hub import errors

    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, errors.GatedRepoError):
        return HubError(f"{what}: the repository is gated", "accept its terms on the hub, then `hf auth login`")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubError(f"{what}: no such repository on the hub", "check ORG/REPO (it may be private: `hf auth login`)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(f"{what}: no such revision", "check the branch, tag or commit")
    if isinstance(exc, errors.EntryNotFoundError):
        return HubError(f"{what}: no such file in the repository", "check the file name (`hf://ORG/REPO/FILE.gguf`)")
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return HubError(f"{what}: the disk is full ({exc})", "free disk space, then pull again (it resumes)")
    if isinstance(exc, errors.OfflineModeIsEnabled) or offline():
        return HubError(f"{what}: offline (HF_HUB_OFFLINE is set)", OFFLINE_FIX)
    return HubError(
        f"{what}: cannot reach the hub at {endpoint()} ({type(exc).__name__}: {exc})",
        "check the network connection (or HF_ENDPOINT), then pull again; a partial download resumes",
    )


OFFLINE_FIX = "unset HF_HUB_OFFLINE to download, or copy the GGUF here and use `localsample models import`"


def list_files(repo: str, revision: str | None) -> list[RemoteFile]:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        tree = HfApi(endpoint=endpoint()).list_repo_tree(repo, recursive=True, revision=revision)
        return [
            RemoteFile(item.path, item.size, item.lfs.sha256 if item.lfs else None)
            for item in tree
            if isinstance(item, RepoFile)
        ]
    except Exception as exc:
        raise hub_error(exc, f"listing {repo}") from exc


def _choose(repo: str, listing: list[RemoteFile], quant: str | None) -> tuple[list[RemoteFile], RemoteFile | None]:
    ggufs = [f for f in listing if f.path.lower().endswith(".gguf")]
    projectors = [f for f in ggufs if "mmproj" in Path(f.path).name.lower()]
    models = [f for f in ggufs if f not in projectors]
    if not models:
        raise HubError(
            f"{repo} has no GGUF model files ({len(listing)} files, none ending in .gguf)",
            "look for a GGUF version of this model (repositories named like ORG/MODEL-GGUF)",
        )
    by_quant: dict[str, list[RemoteFile]] = {}
    for f in models:
        by_quant.setdefault(quant_from_name(Path(f.path).name) or "unknown", []).append(f)
    choices = ", ".join(sorted(by_quant))
    if quant is not None:
        wanted = quant.upper()
        if wanted not in by_quant:
            raise HubError(f"{repo} has no {wanted} GGUF (it has: {choices})", f"pull {repo}:QUANT with one of those")
    elif DEFAULT_QUANT in by_quant:
        wanted = DEFAULT_QUANT
    elif len(by_quant) == 1:
        wanted = next(iter(by_quant))
    else:
        raise HubError(f"{repo} has several quantizations: {choices}", f"choose one: {repo}:QUANT")
    picked = sorted(by_quant[wanted], key=lambda f: f.path)
    stems = {SPLIT.sub("", f.path) for f in picked}
    if len(stems) > 1:
        listed = ", ".join(f.path for f in picked)
        raise HubError(f"{repo} has several {wanted} files: {listed}", "pull one of them: hf://ORG/REPO/FILE.gguf")
    mmproj = next((p for p in projectors if "f16" in p.path.lower()), projectors[0] if projectors else None)
    return picked, mmproj


def plan_pull(ref: str, catalog: Catalog, new_id: str | None = None, revision: str | None = None) -> PullPlan:
    """Resolve a REF to files on the hub (lists the repository unless the REF names a file)."""
    plan = _plan(ref, catalog, new_id, revision)
    plan.revision = revision
    return plan


def _plan(ref: str, catalog: Catalog, new_id: str | None, revision: str | None) -> PullPlan:
    try:
        existing: ModelEntry | None = catalog.get(ref)
    except Exception:
        existing = None
    if existing is not None:
        match = HF_SOURCE.match(existing.source)
        if match is None:
            raise HubError(
                f"model '{existing.id}' is a local file ({existing.source}), not on the hub",
                "register a GGUF of your own with `localsample models import PATH`, or correct its `source`",
            )
        plan = PullPlan(match["repo"], None, [RemoteFile(match["file"], 0, None)], existing=existing)
        mm = HF_SOURCE.match(existing.mmproj or "")
        if mm:
            plan.mmproj = RemoteFile(mm["file"], 0, None)
        return plan
    match = HF_SOURCE.match(ref)
    if match:
        repo, path = match["repo"], match["file"]
        parts = [part.as_posix() for part in split_parts(Path(path))]  # a split model: every part
        return PullPlan(repo, None, [RemoteFile(part, 0, None) for part in parts], entry_id=new_id or id_like(path))
    match = REPO_REF.match(ref)
    if not match:
        raise HubError(
            f"'{ref}' is neither a catalog model nor a hub reference",
            "give a catalog id, hf://ORG/REPO/FILE.gguf or ORG/REPO[:QUANT] (see `localsample models list`)",
        )
    repo = match["repo"]
    listing = list_files(repo, revision)
    files, mmproj = _choose(repo, listing, match["quant"])
    entry_id = new_id or id_like(files[0].path)
    quant = quant_from_name(files[0].path)
    return PullPlan(repo, None, files, mmproj, entry_id=entry_id, quant=quant, listing=listing)


def _expected_sha256(plan: PullPlan, remote: RemoteFile) -> str | None:
    if remote.sha256:
        return remote.sha256
    if not plan.listing:  # a named file: ask the hub for its metadata (one request)
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        try:
            paths = [f.path for f in plan.all_files]
            infos = HfApi(endpoint=endpoint()).get_paths_info(plan.repo, paths, revision=plan.revision)
        except Exception as exc:
            raise hub_error(exc, f"{plan.repo}/{remote.path}") from exc
        plan.listing = [
            RemoteFile(i.path, i.size, i.lfs.sha256 if i.lfs else None) for i in infos if isinstance(i, RepoFile)
        ]
        known = {f.path for f in plan.listing}
        missing = [f.path for f in plan.all_files if f.path not in known]
        if missing:
            raise HubError(f"{plan.repo} has no file {missing[0]}", "check the file name (`hf://ORG/REPO/FILE.gguf`)")
    return next((f.sha256 for f in plan.listing if f.path == remote.path), None)


def remove_cached(path: Path) -> int:
    """Delete a file from the HF cache (its snapshot link, and its blob unless another
    snapshot still links to it); returns the bytes freed."""
    blob = path.resolve()
    size = blob.stat().st_size if blob.exists() else 0
    path.unlink(missing_ok=True)
    snapshots = next((p for p in path.parents if p.name == "snapshots"), None)
    still_used = snapshots is not None and any(
        link.is_symlink() and link.resolve() == blob for link in snapshots.rglob("*")
    )
    if still_used:
        return 0
    if blob != path:
        blob.unlink(missing_ok=True)
    return size


def download(plan: PullPlan, progress: bool, say: Callable[[str], None]) -> list[Path]:
    """Download (or find in the cache) every file of the plan, each checked by sha256."""
    from huggingface_hub.utils.tqdm import disable_progress_bars

    present = {f.path: cached_hf_file(plan.repo, f.path, plan.revision) for f in plan.all_files}
    if all(present.values()):
        return [p for p in present.values() if p is not None]
    if offline():
        raise HubError(f"{plan.repo}: offline (HF_HUB_OFFLINE is set) and not downloaded yet", OFFLINE_FIX)
    todo = [f for f in plan.all_files if present[f.path] is None]
    check_space(plan, todo)
    with nullcontext() if progress else disable_progress_bars():
        return _download_all(plan, present, say)


def _download_all(plan: PullPlan, present: dict[str, Path | None], say: Callable[[str], None]) -> list[Path]:
    from huggingface_hub import hf_hub_download

    paths: list[Path] = []
    for remote in plan.all_files:
        known = present[remote.path]
        if known is not None:
            paths.append(known)
            continue
        expected = _expected_sha256(plan, remote)
        say(f"pulling {plan.repo}/{remote.path}")
        try:
            local = Path(hf_hub_download(plan.repo, remote.path, revision=plan.revision, endpoint=endpoint()))
        except Exception as exc:
            raise hub_error(exc, f"downloading {plan.repo}/{remote.path}") from exc
        if expected is not None and (actual := sha256_file(local)) != expected:
            remove_cached(local)
            raise HubError(
                f"{plan.repo}/{remote.path} does not match the hub's checksum (got {actual[:12]}…, "
                f"want {expected[:12]}…); the damaged download was deleted",
                "pull again",
            )
        paths.append(local)
    return paths


def check_space(plan: PullPlan, todo: list[RemoteFile]) -> None:
    """Refuse (HubError) a download that does not fit the free space of the HF cache."""
    sizes = {f.path: f.size for f in plan.listing}
    needed = sum(sizes.get(f.path, f.size) for f in todo)
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if needed > free:
        raise HubError(
            f"not enough disk space in {cache}: the download needs {human_size(needed)}, {human_size(free)} is free",
            "free some space (e.g. `localsample models rm` an unused model) or set HF_HOME to a larger disk",
        )


def entry_fields(plan: PullPlan, info: GGUFInfo, projector: GGUFInfo | None = None) -> dict[str, Any]:
    """The catalog fields a pulled model gets, from the plan and the GGUF headers of the
    model and its projector (which says whether it reads images, audio or both)."""
    assert plan.entry_id is not None
    mmproj = f"hf://{plan.repo}/{plan.mmproj.path}" if plan.mmproj else None
    return new_entry_fields(plan.entry_id, plan.source, info, f"pulled from {plan.repo}", mmproj, projector)
