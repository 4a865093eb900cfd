"""The model catalog: ``models.toml`` files turned into typed entries.

The packaged catalog (``localsample/models.toml``) is read first; the user's catalog
(``Settings.catalog_path``) extends it, and an entry with the same ``id`` replaces the
packaged one whole. Every problem is reported with the file, the model id, the field and
a fix, all problems of a file at once.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from localsample.errors import CatalogError, ModelFileError, UnknownModelError
from localsample.packaged import index_model_for
from localsample.toolcalls import template_supports_tools

if TYPE_CHECKING:
    from localsample.gguf_file import GGUFInfo

Capability = Literal["chat", "vision", "tools", "audio"]

# llama.cpp's enum values, so a catalog may say "row" or "q8_0" instead of magic numbers.
SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
ID_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoadSettings(_Strict):
    """Arguments for ``llama_cpp.Llama``, named exactly as llama.cpp names them."""

    n_ctx: int = Field(4096, ge=16, le=1 << 20)
    n_gpu_layers: int = Field(0, ge=-1)
    main_gpu: int = Field(0, ge=0)
    split_mode: int | None = Field(None, ge=0, le=2)
    tensor_split: list[float] | None = None
    n_threads: int | None = Field(None, ge=1)
    n_threads_batch: int | None = Field(None, ge=1)
    n_batch: int = Field(512, ge=1)
    n_ubatch: int = Field(512, ge=1)
    flash_attn: bool | None = None  # None: llama.cpp's auto (on wherever the device supports it)
    use_mmap: bool = True
    use_mlock: bool = False
    type_k: int | None = Field(None, ge=0)
    type_v: int | None = Field(None, ge=0)
    offload_kqv: bool = True
    adaptive_threads: bool = True  # localsample's own: fewer threads while the cores are busy

    @field_validator("split_mode", mode="before")
    @classmethod
    def _split_mode_name(cls, value: object) -> object:
        if isinstance(value, str):
            if value not in SPLIT_MODES:
                raise ValueError(f"must be one of {sorted(SPLIT_MODES)} or 0..2")
            return SPLIT_MODES[value]
        return value

    @field_validator("type_k", "type_v", mode="before")
    @classmethod
    def _kv_type_name(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lower() not in KV_TYPES:
                raise ValueError(f"must be one of {sorted(KV_TYPES)} or a ggml type number")
            return KV_TYPES[value.lower()]
        return value

    def llama_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Llama(...)``; ``n_threads`` defaults to all cores."""
        kwargs = self.model_dump(exclude_none=True, exclude={"adaptive_threads"})
        cores = os.cpu_count() or 1
        kwargs.setdefault("n_threads", cores)
        kwargs.setdefault("n_threads_batch", cores)
        return kwargs

    def context_kwargs(self) -> dict[str, Any]:
        """``llama_kwargs`` and localsample's own settings for the batcher's context."""
        # Offloaded layers leave CPU threads waiting on the GPU: their CPU share says nothing.
        return self.llama_kwargs() | {"adaptive_threads": self.adaptive_threads and self.n_gpu_layers == 0}


class SamplingDefaults(_Strict):
    """Sampling parameters with their valid ranges: a model's defaults in the catalog, and
    the same checks for what a request's ``metadata`` sends (a request's own values win)."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1_000_000)  # 0 = off; beyond any vocabulary is meaningless
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)  # llama.cpp's seed is a uint32


class ModelEntry(_Strict):
    """One ``[[models]]`` table of a catalog."""

    id: str = Field(pattern=ID_PATTERN, max_length=128)
    endpoint: str | None = Field(None, pattern=r"^https?://")
    """An OpenAI-compatible engine's base URL (``http://gpu-box:8000/v1``): a remote model."""
    endpoints: list[str] = Field(default_factory=list)
    """Replicas of one remote model (balanced by requests in flight, failed over)."""
    source: str = Field("", validate_default=True)
    """A GGUF: ``hf://ORG/REPO/FILE.gguf``, a path, or a packaged file (local models).
    Declared after the endpoints so that its check sees them."""
    remote_model: str | None = None
    """The name the engine knows the model by (default: ``id``)."""
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The environment variable holding the engine's API key (never the key itself)."""
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(600.0, gt=0)
    """Seconds a remote request may take (connecting: at most 10)."""
    max_concurrency: int | None = Field(None, ge=1)
    """Requests at once per endpoint (default: the ``parallel`` setting)."""
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    mmproj: str | None = Field(None, min_length=1)
    family: str | None = None
    aliases: list[str] = Field(default_factory=list)
    capabilities: list[Capability] = Field(default_factory=lambda: list[Capability](["chat"]))
    cost: float = Field(0.5, ge=0.0, le=1.0)
    speed: float = Field(0.5, ge=0.0, le=1.0)
    intelligence: float = Field(0.5, ge=0.0, le=1.0)
    chat_template: str | None = Field(None, min_length=1)
    keep_alive: float | None = Field(None, ge=-1)  # minutes; None = the keep_alive setting
    description: str | None = None
    load: LoadSettings = Field(default_factory=lambda: LoadSettings())
    defaults: SamplingDefaults = Field(default_factory=lambda: SamplingDefaults())

    @field_validator("aliases")
    @classmethod
    def _aliases_are_names(cls, value: list[str]) -> list[str]:
        for alias in value:
            if not alias.strip() or "/" in alias or "\\" in alias:
                raise ValueError(f"alias {alias!r} must be a plain name (no slashes, not empty)")
        return value

    @field_validator("endpoints")
    @classmethod
    def _endpoints_are_urls(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for url in value:
            if not re.match(r"^https?://", url):
                raise ValueError(f"endpoint {url!r} must be an http:// or https:// URL")
        if value and info.data.get("endpoint") is not None:
            raise PydanticCustomError("endpoint_and_endpoints", "endpoint_and_endpoints")
        return value

    @field_validator("source")
    @classmethod
    def _local_or_remote(cls, value: str, info: ValidationInfo) -> str:
        remote = info.data.get("endpoint") is not None or bool(info.data.get("endpoints"))
        if not remote and not value:
            raise PydanticCustomError("no_source", "no_source")
        if remote and value:
            raise PydanticCustomError("source_and_endpoint", "source_and_endpoint")
        return value

    @property
    def remote(self) -> bool:
        """Whether an OpenAI-compatible engine elsewhere runs this model."""
        return bool(self.endpoints) or self.endpoint is not None

    @property
    def urls(self) -> list[str]:
        """The remote engine's base URLs, trailing slashes removed."""
        return [url.rstrip("/") for url in ([self.endpoint] if self.endpoint else self.endpoints)]

    def names(self) -> list[str]:
        """Every name a server may use for this model: id, aliases, family."""
        return [self.id, *self.aliases, *([self.family] if self.family else [])]


@dataclass(frozen=True)
class CatalogEntry:
    """A validated entry and the catalog file it came from."""

    model: ModelEntry
    origin: str


class Catalog:
    """The merged catalog: packaged entries, then the user's, in file order."""

    def __init__(self, entries: list[CatalogEntry]) -> None:
        self.entries = entries
        self._by_name: dict[str, ModelEntry] = {}
        for entry in entries:
            for name in [entry.model.id, *entry.model.aliases]:
                self._by_name[name.lower()] = entry.model

    def __iter__(self) -> Iterator[ModelEntry]:
        return (entry.model for entry in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def ids(self) -> list[str]:
        return [entry.model.id for entry in self.entries]

    def get(self, name: str) -> ModelEntry:
        """The entry whose id or alias is ``name`` (case-insensitive)."""
        found = self._by_name.get(name.lower())
        if found is None:
            raise UnknownModelError(
                f"no model '{name}' in the catalog (known: {', '.join(self.ids()) or 'none'})",
                "use one of the known ids or aliases, or add a [[models]] entry to your "
                "catalog (see `localsample config` for its path)",
            )
        return found

    def origin(self, model_id: str) -> str:
        return next(e.origin for e in self.entries if e.model.id == model_id)


def packaged_catalog_text() -> str:
    return resources.files("localsample").joinpath("models.toml").read_text(encoding="utf-8")


def parse_catalog(text: str, origin: str) -> list[ModelEntry]:
    """Parse one catalog file; every problem in it is reported in one CatalogError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{origin}: not valid TOML: {exc}", "correct the syntax at that line") from exc
    unknown = set(data) - {"models"}
    if unknown:
        raise CatalogError(
            f"{origin}: unknown top-level key(s) {sorted(unknown)}",
            "a catalog holds only [[models]] tables; remove or rename those keys",
        )
    raw_models = data.get("models", [])
    if not isinstance(raw_models, list):
        raise CatalogError(f"{origin}: 'models' must be an array of tables", "write each model as [[models]]")
    models: list[ModelEntry] = []
    problems: list[str] = []
    for index, raw in enumerate(raw_models):
        label = f"model '{raw.get('id')}'" if isinstance(raw, dict) and raw.get("id") else f"model #{index + 1}"
        try:
            models.append(ModelEntry.model_validate(raw))
        except ValidationError as exc:
            problems.extend(f"{origin}: {label}: {_describe(err)}" for err in exc.errors())
    seen: dict[str, str] = {}
    for model in models:
        if model.id in seen:
            problems.append(f"{origin}: model '{model.id}': duplicate id; fix: give each [[models]] a unique id")
        seen[model.id] = model.id
    if problems:
        raise CatalogError("invalid catalog:\n  " + "\n  ".join(problems), "correct the fields named above")
    return models


ENTRY_PROBLEMS = {
    "no_source": "field 'source': required (a local GGUF), or endpoint for a remote engine; fix: add "
    'source = "FILE.gguf" (or hf://ORG/REPO/FILE.gguf), or endpoint = "http://HOST:PORT/v1"',
    "source_and_endpoint": "fields 'source' and 'endpoint': a model is local (source) or remote (endpoint, "
    "endpoints), not both; fix: remove one of them",
    "endpoint_and_endpoints": "fields 'endpoint' and 'endpoints': give one endpoint, or endpoints for replicas; "
    "fix: remove one of them",
}
"""What an entry-level problem (no single field) says, by its error type."""


def _describe(err: Any) -> str:
    field = ".".join(str(part) for part in err["loc"]) or "(entry)"
    kind = err["type"]
    if kind == "extra_forbidden":
        fix = "remove it or correct the spelling (fields are named as in llama.cpp)"
        return f"field '{field}': unknown field; fix: {fix}"
    if kind == "missing":
        return f"field '{field}': required; fix: add {field} = ..."
    if kind in ENTRY_PROBLEMS:
        return ENTRY_PROBLEMS[kind]
    given = err.get("input")
    shown = "" if isinstance(given, dict | list) else f" (got {given!r})"
    return f"field '{field}': {err['msg']}{shown}; fix: change the value of {field}"


def merge(layers: list[tuple[list[ModelEntry], str]]) -> Catalog:
    """Later layers replace earlier entries with the same id, and take over aliases that
    earlier entries claimed. Within one file, an alias claimed twice is an error."""
    by_id: dict[str, CatalogEntry] = {}
    problems: list[str] = []
    for models, origin in layers:
        owners: dict[str, ModelEntry] = {}
        for model in models:
            for name in [model.id, *model.aliases]:
                other = owners.setdefault(name.lower(), model)
                if other.id != model.id:
                    problems.append(
                        f"{origin}: model '{model.id}': field 'aliases': '{name}' is already claimed by "
                        f"model '{other.id}' in the same file; fix: remove it from one of them"
                    )
        for old_id, old in list(by_id.items()):
            kept = [a for a in old.model.aliases if a.lower() not in owners]
            if kept != old.model.aliases:
                by_id[old_id] = CatalogEntry(old.model.model_copy(update={"aliases": kept}), old.origin)
        for model in models:
            by_id[model.id] = CatalogEntry(model, origin)
    if problems:
        raise CatalogError("invalid catalog:\n  " + "\n  ".join(problems), "correct the fields named above")
    return Catalog(list(by_id.values()))


def load_catalog(user_catalog: Path | None) -> Catalog:
    """The packaged catalog merged with the user's (if the file exists)."""
    layers = [(parse_catalog(packaged_catalog_text(), "packaged models.toml"), "packaged models.toml")]
    if user_catalog is not None and user_catalog.is_file():
        origin = str(user_catalog)
        layers.append((parse_catalog(user_catalog.read_text(encoding="utf-8"), origin), origin))
    return merge(layers)


HF_SOURCE = re.compile(r"^hf://(?P<repo>[^/]+/[^/]+)/(?P<file>.+\.gguf)$")


def cached_hf_file(repo: str, file: str, revision: str | None = None) -> Path | None:
    """Where the Hugging Face cache holds ``file`` of ``repo``; None if it is not there.
    Reads only the local cache, never the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, file, revision=revision)
    return Path(found) if isinstance(found, str) else None


def find_source(source: str, model_dir: Path) -> Path | None:
    """The file a catalog ``source`` (or ``mmproj``) names, if it is on this disk: an
    ``hf://`` source in the HF cache, a relative path under ``model_dir``."""
    match = HF_SOURCE.match(source)
    if match:
        return cached_hf_file(match["repo"], match["file"])
    path = local_source_path(source, model_dir)
    return path if path.is_file() else None


def local_source_path(source: str, model_dir: Path) -> Path:
    """A path ``source`` made absolute: relative paths resolve against ``model_dir``."""
    path = Path(source).expanduser()
    return path if path.is_absolute() else model_dir / path


def resolve_model_path(model: ModelEntry, model_dir: Path) -> Path:
    """The GGUF file for ``model`` on this disk, without touching the network."""
    if model.source.startswith("hf://") and not HF_SOURCE.match(model.source):
        raise ModelFileError(
            f"model '{model.id}': source {model.source!r} is not of the form hf://ORG/REPO/FILE.gguf",
            "correct the source in the catalog",
        )
    found = find_source(model.source, model_dir)
    if found is not None:
        return found
    if HF_SOURCE.match(model.source):
        raise ModelFileError(
            f"model '{model.id}' is not downloaded ({model.source} is not in the Hugging Face cache)",
            f"download it with `localsample models pull {model.id}`",
        )
    path = local_source_path(model.source, model_dir)
    if index_model_for(model.id, model.source) is not None:
        fix = f"download it with `localsample models pull {model.id}`"
    else:
        fix = (
            "register a GGUF of your own with `localsample models import PATH`, or correct `source` "
            "(relative paths resolve against model_dir, see `localsample config`)"
        )
    raise ModelFileError(f"model '{model.id}': file {path} does not exist", fix)


def with_projector_path(model: ModelEntry, model_dir: Path) -> ModelEntry:
    """The entry with ``mmproj`` as the path of its file on this disk, for the engine (an
    ``hf://`` projector not downloaded yet stays as it is: loading it says to pull)."""
    if not model.mmproj:
        return model
    found = find_source(model.mmproj, model_dir)
    return model.model_copy(update={"mmproj": str(found)}) if found is not None else model


NEW_ENTRY_MAX_CTX = 8192
"""The largest n_ctx a newly registered model gets (its trained context may be larger)."""


def new_entry_fields(
    model_id: str,
    source: str,
    info: GGUFInfo,
    origin: str,
    mmproj: str | None = None,
    projector: GGUFInfo | None = None,
) -> dict[str, Any]:
    """The user-catalog fields of a model registered from a file (pulled or imported):
    family, description and context size from its GGUF header; ``origin`` ends the
    description (e.g. ``pulled from ORG/REPO``). The ``tools`` capability is set when the
    chat template writes tool calls in a family localsample knows (toolcalls.py); ``vision``
    and ``audio`` as the projector's header says (``vision`` when it is not read)."""
    reads = list(projector.projector_reads) if projector is not None else ["vision"]
    capabilities = ["chat", *reads] if mmproj else ["chat"]
    if info.chat_template and template_supports_tools(info.chat_template):
        capabilities.append("tools")
    fields: dict[str, Any] = {
        "id": model_id,
        "source": source,
        "family": info.architecture,
        "description": f"{info.name or model_id}, {info.quantization}, {origin}",
        "capabilities": capabilities,
        "load": {"n_ctx": min(info.context_length or 4096, NEW_ENTRY_MAX_CTX)},
    }
    if mmproj:
        fields["mmproj"] = mmproj
    return fields


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def upsert_user_entry(path: Path, fields: dict[str, Any]) -> bool:
    """Add or update (by id) an entry of the user's catalog, keeping the file's comments
    and the entry's other fields; True if it existed. Validated before it is written."""
    import tomlkit

    doc = tomlkit.parse(path.read_text(encoding="utf-8")) if path.is_file() else tomlkit.document()
    if "models" not in doc:
        doc["models"] = tomlkit.aot()
    models = doc["models"]
    existing = next((table for table in models if table.get("id") == fields["id"]), None)
    if existing is None:
        models.append(tomlkit.item(fields))
    else:
        for key, value in fields.items():
            if isinstance(value, dict) and key in existing:
                existing[key].update(value)
            else:
                existing[key] = value
    text = tomlkit.dumps(doc)
    parse_catalog(text, str(path))
    _write_atomically(path, text)
    return existing is not None


def remove_user_entry(path: Path, model_id: str) -> bool:
    """Remove an entry from the user's catalog; True if it was there."""
    import tomlkit

    if not path.is_file():
        return False
    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    models = doc.get("models")
    if models is None:
        return False
    kept = [table for table in models if table.get("id") != model_id]
    if len(kept) == len(models):
        return False
    fresh = tomlkit.aot()
    for table in kept:
        fresh.append(table)
    doc["models"] = fresh
    _write_atomically(path, tomlkit.dumps(doc))
    return True
