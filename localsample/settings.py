"""Settings: defaults < config file (TOML) < LOCALSAMPLE_* environment variables.

The config file lives in the platform's config directory (``~/.config/localsample/
config.toml`` on Linux) unless ``LOCALSAMPLE_CONFIG`` names another. Every field can be
set in the file by its name or in the environment as ``LOCALSAMPLE_<NAME>``.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from localsample.errors import ConfigError

APP = "localsample"
ENV_PREFIX = "LOCALSAMPLE_"
CONFIG_ENV = "LOCALSAMPLE_CONFIG"


def config_file_path() -> Path:
    """The config file to read: ``$LOCALSAMPLE_CONFIG`` or the platform default."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def _default_catalog() -> Path:
    return Path(platformdirs.user_config_dir(APP)) / "models.toml"


def default_model_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP)) / "models"


PRIVATE_DIR_MODE = 0o700
"""Directories that hold prompts, audit lines or status: the user's alone."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (and any missing parents) as 0700 whatever the umask, and make sure
    ``path`` itself is 0700 if it already existed. Returns ``path``."""
    missing = []
    at = path
    while not at.exists():
        missing.append(at)
        at = at.parent
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        folder.chmod(PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    if path.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
        path.chmod(PRIVATE_DIR_MODE)
    return path


def _default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP))


def _default_log_dir() -> Path:
    return Path(platformdirs.user_log_dir(APP))


class ServerSettings(BaseModel):
    """Per-server settings: ``[servers.NAME]`` in the config file (``[servers."*"]`` is the
    default for servers without a table of their own)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="pin: every request of this server uses this model")
    allow_models: list[str] = Field(default_factory=list, description="only these models (ids or aliases)")
    approve: Literal["auto", "ask", "deny"] = Field("auto", description="who approves each sampling request")
    ask_timeout: float = Field(120.0, gt=0, description="seconds to wait for a human before rejecting")
    ask_fallback: Literal["deny", "auto"] = Field(
        "deny", description="when approve = ask but no human can be asked (no terminal, host without elicitation)"
    )
    review_response: bool = Field(False, description="with approve = ask, show the response before it goes back")
    max_tokens: int | None = Field(None, ge=1, description="cap on a request's maxTokens")
    over_max_tokens: Literal["clamp", "reject"] = Field("clamp", description="what to do with a request over the cap")
    requests_per_minute: int | None = Field(None, ge=1, description="sampling requests per rolling minute")
    tokens_per_minute: int | None = Field(None, ge=1, description="generated tokens per rolling minute")
    approve_tools: Literal["auto", "ask", "deny"] | None = Field(
        None,
        description="`run`: who approves the model's calls of its tools (default: ask on a terminal, else deny)",
    )
    auto_tools: list[str] = Field(
        default_factory=list, description='`run`: tools that run without asking, by name or glob ("read_*")'
    )
    tool_timeout: float = Field(300.0, gt=0, description="`run`: seconds a tool call may take before it is cancelled")


class Settings(BaseSettings):
    """Effective settings. Use :func:`load_settings` to build one with clear errors."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    default_model: str = Field(
        "smollm2-135m-instruct",
        description="catalog id (or alias) used when a request names no usable model",
    )
    catalog_path: Path = Field(
        default_factory=_default_catalog,
        description="the user's catalog; extends and overrides the packaged models.toml by id",
    )
    model_dir: Path = Field(
        default_factory=default_model_dir,
        description="model store; relative `source` paths in catalogs resolve against it",
    )
    log_dir: Path = Field(default_factory=_default_log_dir, description="log and audit files")
    state_dir: Path = Field(default_factory=_default_state_dir, description="status of running daemons, for `ps`")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$", description="stderr log level")
    preload: list[str] | None = Field(
        None, description="models `serve` loads at start (default: the default model); [] loads none"
    )
    keep_alive: float = Field(
        5.0, ge=-1, description="minutes an idle model stays loaded (0 = unload after use, -1 = forever)"
    )
    max_loaded_models: int = Field(2, ge=1, description="most models loaded at once (least recently used go first)")
    memory_budget_mb: int | None = Field(
        None, ge=1, description="most memory for loaded models, in MB (default: 3/4 of the machine's RAM)"
    )
    parallel: int = Field(8, ge=1, le=64, description="requests one model decodes together (one KV cache)")
    queue_limit: int = Field(
        16, ge=1, description="requests waiting for one model beyond which new ones get 'busy, retry later'"
    )
    connect_timeout: float = Field(
        30.0, gt=0, description="seconds a downstream MCP server may take to start and answer its handshake"
    )
    queue_timeout: float = Field(
        60.0, gt=0, description="seconds a request may wait for a free slot before it gets 'busy, retry later'"
    )
    max_media_bytes: int = Field(
        20_000_000, ge=1, description="largest image or audio clip a request may carry, in bytes (after base64)"
    )
    max_image_pixels: int = Field(
        33_554_432, ge=1, description="largest image a request may carry, in pixels (width x height)"
    )
    tool_result_share: float = Field(
        0.25, gt=0, le=1, description="`run`: most of the model's context one tool result may fill (the rest is cut)"
    )
    offline: bool = Field(False, description="use only loopback endpoints of remote catalog entries (--offline)")
    daemon: Literal["auto", "spawn", "never"] = Field(
        "auto",
        description="serve/call/sample/run: use a running `localsample daemon` (auto), start one when none "
        "runs (spawn), or always generate in-process (never; --no-daemon)",
    )
    daemon_idle_exit: float = Field(
        10.0, gt=0, description="minutes a daemon started by daemon = spawn waits without clients before it exits"
    )
    audit: bool = Field(True, description="write one JSON line per sampling request to log_dir/audit.jsonl")
    audit_text: bool = Field(False, description="include prompt and response text in the audit trail")
    audit_max_bytes: int = Field(10_000_000, ge=10_000, description="rotate the audit file past this size")
    audit_backups: int = Field(3, ge=0, description="rotated audit files kept (audit.jsonl.1 ...)")
    servers: dict[str, ServerSettings] = Field(
        default_factory=dict, description='per-server settings, by server name ("*" = default)'
    )

    def server(self, name: str) -> ServerSettings:
        """The settings for server ``name``: its own table, else ``"*"``, else defaults."""
        return self.servers.get(name) or self.servers.get("*") or ServerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file_path())
        return (init_settings, env_settings, toml)


def load_settings(**overrides: Any) -> Settings:
    """Build the effective settings; a bad file or variable raises :class:`ConfigError`."""
    path = config_file_path()
    try:
        return Settings(**overrides)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not valid TOML: {exc}",
            f"correct the syntax at the line given, or point {CONFIG_ENV} at another file",
        ) from exc
    except ValidationError as exc:
        problems = [describe_problem(err) for err in exc.errors()]
        known = ", ".join(Settings.model_fields)
        raise ConfigError(
            f"invalid settings ({path} or {ENV_PREFIX}* variables): " + "; ".join(problems),
            f"fix or remove those keys; known settings: {known}",
        ) from exc


def describe_problem(err: Any) -> str:
    """One validation error of the settings: the key, what is wrong, the value given, and
    for an unknown key the nearest known one (also inside ``[servers.NAME]`` tables)."""
    loc = [str(part) for part in err["loc"]]
    name = ".".join(loc)
    if err["type"] == "extra_forbidden":
        in_server = len(loc) == 3 and loc[0] == "servers"
        fields = ServerSettings.model_fields if in_server else Settings.model_fields
        if near := difflib.get_close_matches(loc[-1], list(fields), n=1):
            return f"'{name}': unknown setting; did you mean {'.'.join([*loc[:-1], near[0]])}?"
        if not in_server and (near := difflib.get_close_matches(loc[-1], list(ServerSettings.model_fields), n=1)):
            return f"'{name}': unknown setting; did you mean {near[0]} in a [servers.NAME] or [servers.\"*\"] table?"
        return f"'{name}': unknown setting"
    return f"'{name}': {err['msg']} (got {err.get('input')!r})"


def setting_sources(settings: Settings) -> dict[str, str]:
    """Where each effective value came from: an env variable, the config file, or default."""
    path = config_file_path()
    file_keys: set[str] = set()
    if path.is_file():
        with path.open("rb") as fh:
            file_keys = set(tomllib.load(fh))
    sources: dict[str, str] = {}
    for name in type(settings).model_fields:
        env = ENV_PREFIX + name.upper()
        if env in os.environ:
            sources[name] = f"env {env}"
        elif name in file_keys:
            sources[name] = str(path)
        else:
            sources[name] = "default"
    return sources
