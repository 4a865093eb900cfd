"""Settings: defaults < config file < LOCALSAMPLE_* environment, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from localsample.errors import ConfigError
from localsample.settings import load_settings, setting_sources


def test_file_then_env_override_defaults(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCALSAMPLE_LOG_DIR")
    (isolated / "config.toml").write_text('default_model = "from-file"\nlog_dir = "/tmp/from-file"\n')
    monkeypatch.setenv("LOCALSAMPLE_DEFAULT_MODEL", "from-env")
    settings = load_settings()
    assert settings.default_model == "from-env"
    assert settings.log_dir == Path("/tmp/from-file")
    sources = setting_sources(settings)
    assert sources["default_model"] == "env LOCALSAMPLE_DEFAULT_MODEL"
    assert sources["log_dir"] == str(isolated / "config.toml")
    assert sources["log_level"] == "default"


def test_unknown_key_in_file_is_named(isolated: Path) -> None:
    (isolated / "config.toml").write_text('defualt_model = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "defualt_model" in message and "default_model" in message  # names the known keys
    assert str(isolated / "config.toml") in message


def test_invalid_toml_names_the_file(isolated: Path) -> None:
    (isolated / "config.toml").write_text("default_model = \n")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "not valid TOML" in message and str(isolated / "config.toml") in message


def test_bad_value_from_env_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALSAMPLE_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "log_level" in str(info.value)


def test_a_mistyped_key_gets_the_nearest_one_also_in_server_tables(isolated: Path) -> None:
    (isolated / "config.toml").write_text('max_token = 5\nqueue_limit = "lots"\n[servers.w]\nmax_token = 3\n')
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "'servers.w.max_token': unknown setting; did you mean servers.w.max_tokens?" in message
    assert "'max_token': unknown setting; did you mean max_tokens in a [servers.NAME]" in message
    assert "'queue_limit': Input should be a valid integer" in message and "(got 'lots')" in message
