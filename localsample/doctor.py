"""Health checks of an installation, behind `localsample doctor`.

:func:`diagnose` runs every check and returns typed results (ok, warning or error, what
was checked, how to fix it); printing them is the CLI's job. :func:`unknown_model_names`
is the pure check that every model name in the settings is in the catalog, shared with
anything that must refuse such settings before a request fails on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import httpx2

from localsample.catalog import Catalog, ModelEntry, find_source, load_catalog, resolve_model_path
from localsample.errors import LocalsampleError, ModelFileError
from localsample.gguf_file import human_size, read_gguf
from localsample.runtime import unknown_model_names
from localsample.settings import Settings, config_file_path, load_settings


class Level(StrEnum):
    """How a check came out."""

    OK = "ok"
    WARNING = "warning"
    """Works, but not as well as it could (a model not downloaded, no GPU)."""
    ERROR = "error"
    """Something will fail: `doctor` exits non-zero."""


@dataclass(frozen=True)
class Check:
    """The result of one check: its level, what was found, and what to do about it."""

    level: Level
    what: str
    fix: str | None = None

    def as_json(self) -> dict[str, str | None]:
        return {"level": self.level.value, "what": self.what, "fix": self.fix}


PROBE_TIMEOUT_S = 5.0
"""How long `doctor` waits for a remote endpoint's ``GET /models``."""


def ok(what: str) -> Check:
    return Check(Level.OK, what)


def warning(what: str, fix: str) -> Check:
    return Check(Level.WARNING, what, fix)


def error(what: str, fix: str | None) -> Check:
    return Check(Level.ERROR, what, fix)


def gpu_offload() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU."""
    import llama_cpp  # here, not at the top: `ps` and attached clients import this module's neighbours

    return bool(llama_cpp.llama_supports_gpu_offload())


def build_checks() -> list[Check]:
    """The llama.cpp build: version, GPU offload, CPU features."""
    import llama_cpp

    gpu = gpu_offload()
    features = llama_cpp.llama_print_system_info().decode().strip().removeprefix("CPU : ")
    return [
        ok(f"llama-cpp-python {llama_cpp.__version__}"),
        ok("GPU offload: supported")
        if gpu
        else warning(
            "GPU offload: not in this build (CPU only)",
            'reinstall with CMAKE_ARGS="-DGGML_CUDA=on" (NVIDIA) or "-DGGML_METAL=on" (Apple) to use a GPU',
        ),
        ok(f"CPU features: {features}"),
        multimodal_check(),
    ]


def multimodal_check() -> Check:
    """Whether this build has llama.cpp's multimodal library (images and audio)."""
    from localsample.errors import EngineError
    from localsample.vision import multimodal_library

    try:
        multimodal_library()
    except EngineError as exc:
        return warning(f"vision and audio: not in this build ({exc.problem})", exc.fix or "reinstall llama-cpp-python")
    return ok("vision and audio: multimodal library present (models with an mmproj read images/audio)")


def settings_checks(settings: Settings, catalog: Catalog) -> list[Check]:
    """The model names in the settings, against the catalog."""
    problems = unknown_model_names(settings, catalog)
    if problems:
        return [error(p.problem, p.fix) for p in problems]
    default = catalog.get(settings.default_model)
    return [ok(f"model names in the settings are in the catalog (default model: {default.id})")]


def model_checks(settings: Settings, catalog: Catalog, gpu: bool) -> list[Check]:
    """Each catalog model: downloaded, a readable GGUF, a chat template, GPU layers it can get."""
    checks = []
    for model in catalog:
        if model.remote:
            checks += remote_checks(settings, model)
            continue
        try:
            path = resolve_model_path(model, settings.model_dir)
        except ModelFileError:
            checks.append(warning(f"{model.id}: not downloaded", f"localsample models pull {model.id}"))
            continue
        try:
            info = read_gguf(path)
        except LocalsampleError as exc:
            checks.append(error(f"{model.id}: {exc.problem}", exc.fix))
            continue
        where = "CPU" if model.load.n_gpu_layers == 0 else f"n_gpu_layers={model.load.n_gpu_layers}"
        size = human_size(path.stat().st_size)
        checks.append(ok(f"{model.id}: {info.architecture}, {info.quantization}, {size}, {where}"))
        if model.load.n_gpu_layers != 0 and not gpu:
            checks.append(
                warning(
                    f"{model.id}: asks for GPU layers, but this build runs on the CPU only",
                    "rebuild llama-cpp-python with GPU support, or set n_gpu_layers = 0",
                )
            )
        checks += projector_checks(settings, model)
        if info.chat_template is None and model.chat_template is None:
            checks.append(error(f"{model.id}: no chat template in the GGUF", "set chat_template in its catalog entry"))
    return checks


def projector_checks(settings: Settings, model: ModelEntry) -> list[Check]:
    """A model's projector: on disk, a projector, reading what the entry's capabilities say."""
    media = [c for c in ("vision", "audio") if c in model.capabilities]
    if not model.mmproj:
        if media:
            return [error(f"{model.id}: {'/'.join(media)} capability but no mmproj", "set mmproj in its entry")]
        return []
    path = find_source(model.mmproj, settings.model_dir)
    if path is None:
        return [
            warning(
                f"{model.id}: its projector {model.mmproj} is not downloaded", f"localsample models pull {model.id}"
            )
        ]
    try:
        info = read_gguf(path)
    except LocalsampleError as exc:
        return [error(f"{model.id}: projector {exc.problem}", exc.fix)]
    if not info.is_projector:
        return [error(f"{model.id}: mmproj {path} is not a projector", "point mmproj at the model's mmproj GGUF")]
    unread = [c for c in media if c not in info.projector_reads]
    if unread:
        return [
            error(
                f"{model.id}: capability {'/'.join(unread)}, but its projector reads only "
                f"{'/'.join(info.projector_reads)}",
                f"remove {'/'.join(unread)} from the entry's capabilities",
            )
        ]
    return [ok(f"{model.id}: projector {path.name} reads {'/'.join(info.projector_reads)}")]


def remote_checks(settings: Settings, model: ModelEntry) -> list[Check]:
    """Each endpoint of a remote model: allowed (offline), answering, the key accepted, the
    model listed by ``GET /models``."""
    from localsample.remote import RemoteGenerator, is_loopback  # the openai client: only for remote entries

    headers = RemoteGenerator(model, settings).headers()
    name = model.remote_model or model.id
    checks = []
    for url in model.urls:
        if settings.offline and not is_loopback(url):
            checks.append(warning(f"{model.id}: {url} is not used offline", "drop offline, or use a loopback endpoint"))
            continue
        try:
            response = httpx2.get(url + "/models", headers=headers, timeout=PROBE_TIMEOUT_S)
        except httpx2.HTTPError as exc:
            checks.append(error(f"{model.id}: {url} does not answer ({exc})", "start the engine, or correct the URL"))
            continue
        if response.status_code in (401, 403):
            fix = f"set {model.api_key_env} to a key it accepts" if model.api_key_env else "add api_key_env"
            checks.append(error(f"{model.id}: {url} refused the key (HTTP {response.status_code})", fix))
            continue
        if response.status_code != 200:
            checks.append(error(f"{model.id}: {url}/models answered HTTP {response.status_code}", "see its log"))
            continue
        try:
            served = [str(entry["id"]) for entry in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            served = []
        if name in served:
            checks.append(ok(f"{model.id}: {url} answers and serves '{name}'"))
        else:
            checks.append(
                warning(
                    f"{model.id}: {url} answers but does not list '{name}' (it lists: {', '.join(served) or 'none'})",
                    "set remote_model to a name it lists (engines that serve one model may ignore the name)",
                )
            )
    return checks


def log_dir_check(settings: Settings) -> Check:
    """Whether log and audit files can be written."""
    try:
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.log_dir / ".doctor"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return error(f"log directory {settings.log_dir}: {exc}", "set log_dir to a writable directory")
    return ok(f"log directory {settings.log_dir} is writable")


def diagnose() -> list[Check]:
    """Every check, in order. Settings or a catalog that do not load end the list there."""
    checks = build_checks()
    try:
        settings = load_settings()
        checks.append(ok(f"settings ({config_file_path()})"))
        catalog = load_catalog(settings.catalog_path)
        checks.append(ok(f"catalog: {len(catalog)} models (your catalog: {settings.catalog_path})"))
    except LocalsampleError as exc:
        return [*checks, error(exc.problem, exc.fix)]
    checks += settings_checks(settings, catalog)
    checks += model_checks(settings, catalog, gpu_offload())
    checks.append(log_dir_check(settings))
    return checks


def healthy(checks: list[Check]) -> bool:
    """Whether no check is an error."""
    return all(check.level is not Level.ERROR for check in checks)
