"""`localsample doctor`: the checks as data (localsample.doctor) and as the command prints them.

No model is loaded here: doctor only reads GGUF headers.
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from localsample.catalog import load_catalog
from localsample.cli import app
from localsample.doctor import Check, Level, diagnose, healthy, settings_checks
from localsample.runtime import unknown_model_names
from localsample.settings import ServerSettings, load_settings

runner = CliRunner()


def errors(checks: list[Check]) -> list[Check]:
    return [check for check in checks if check.level is Level.ERROR]


def test_an_unknown_default_model_is_an_error(isolated: Path) -> None:
    (isolated / "config.toml").write_text('default_model = "nosuch"\n')
    [found] = errors(diagnose())
    assert found.what == "setting default_model names 'nosuch', which is not in the catalog"
    assert found.fix is not None and "smollm2-135m-instruct" in found.fix and str(isolated / "models.toml") in found.fix
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1, result.output
    assert "error    setting default_model names 'nosuch', which is not in the catalog" in result.stdout
    assert "         fix: use a catalog id or alias (" in result.stdout


def test_unknown_per_server_model_names_are_errors(isolated: Path) -> None:
    (isolated / "config.toml").write_text(
        '[servers.writer]\nmodel = "gpt-9"\n\n[servers."*"]\nallow_models = ["haiku", "nosuch"]\n'
    )
    assert [check.what for check in errors(diagnose())] == [
        "setting servers.writer.model names 'gpt-9', which is not in the catalog",
        "setting servers.*.allow_models names 'nosuch', which is not in the catalog",
    ]
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert {row["level"] for row in data} >= {"ok", "error"}
    assert any("servers.writer.model names 'gpt-9'" in row["what"] for row in data)


def test_known_names_and_aliases_pass() -> None:
    settings = load_settings(
        default_model="haiku", preload=["smollm2-135m-instruct"], servers={"a": ServerSettings(allow_models=["flash"])}
    )
    catalog = load_catalog(settings.catalog_path)
    assert unknown_model_names(settings, catalog) == []
    [check] = settings_checks(settings, catalog)
    assert check.level is Level.OK and "default model: smollm2-135m-instruct" in check.what


def test_unknown_preload_names_are_errors_too() -> None:
    settings = load_settings(preload=["nosuch"])
    [problem] = unknown_model_names(settings, load_catalog(settings.catalog_path))
    assert problem.problem == "setting preload names 'nosuch', which is not in the catalog"


def test_settings_that_do_not_load_end_the_checks_with_an_error(isolated: Path) -> None:
    (isolated / "config.toml").write_text("nonsense = 1\n")
    checks = diagnose()
    assert checks[-1].level is Level.ERROR and "nonsense" in checks[-1].what and checks[-1].fix
    assert not healthy(checks)
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1 and "error    invalid settings" in result.stdout


def test_a_fresh_installation_has_no_errors(isolated: Path) -> None:
    checks = diagnose()
    assert healthy(checks), errors(checks)
    whats = [check.what for check in checks]
    assert any(what.startswith("llama-cpp-python ") for what in whats)
    assert any(what.startswith("GPU offload: ") for what in whats)
    assert f"log directory {isolated / 'logs'} is writable" in whats
    assert all(check.fix for check in checks if check.level is Level.WARNING)


def test_a_truncated_gguf_is_an_error_not_ok(isolated: Path) -> None:
    from .conftest import real_model_dir

    whole = (real_model_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()
    cut = isolated / "cut.gguf"
    cut.write_bytes(whole[: 50 * 1000 * 1000])  # a download that stopped at 50 MB
    (isolated / "models.toml").write_text(f'[[models]]\nid = "cut"\nsource = "{cut}"\n')
    [found] = [check for check in errors(diagnose()) if check.what.startswith("cut:")]
    assert "damaged GGUF" in found.what and f"need {len(whole)} bytes, the file has 50000000" in found.what
    assert found.fix is not None and "download" in found.fix


def test_the_multimodal_library_and_each_projector_are_checked(isolated: Path) -> None:
    from .mmproj_fixture import write_projector

    projector = write_projector(isolated / "mmproj-v.gguf")
    smol = "source = 'SmolLM2-135M-Instruct.Q4_1.gguf'\n"
    (isolated / "models.toml").write_text(
        f"[[models]]\nid = 'eyes'\n{smol}mmproj = '{projector}'\ncapabilities = ['chat', 'vision']\n"
        f"[[models]]\nid = 'ears'\n{smol}mmproj = '{projector}'\ncapabilities = ['chat', 'audio']\n"
        f"[[models]]\nid = 'blind'\n{smol}capabilities = ['chat', 'vision']\n"
    )
    checks = {check.what: check for check in diagnose()}
    assert (
        checks["vision and audio: multimodal library present (models with an mmproj read images/audio)"].level
        is Level.OK
    )
    assert checks["eyes: projector mmproj-v.gguf reads vision"].level is Level.OK
    assert checks["ears: capability audio, but its projector reads only vision"].level is Level.ERROR
    assert checks["blind: vision capability but no mmproj"].fix == "set mmproj in its entry"
