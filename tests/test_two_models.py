"""Two real models (SmolLM2-135M-Instruct and Gemma 3 270M) chosen by hints and settings
through real MCP servers; `models select` output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from typer.testing import CliRunner

from localsample.catalog import load_catalog
from localsample.cli import app
from localsample.errors import ConfigError
from localsample.runtime import Runtime
from localsample.sampling import SamplingHandler
from localsample.settings import ServerSettings, Settings

from .conftest import real_model_dir
from .servers.sampling_server import server

pytestmark = pytest.mark.anyio
TEST_CATALOG = Path(__file__).parent / "catalog.toml"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    path = real_model_dir() / "gemma-3-270m-q4_k_m.gguf"
    if not path.is_file():
        pytest.fail(f"{path} missing: run `python scripts/fetch_model.py gemma3-270m` (scripts/test.sh does)")
    return path


def make_runtime(**servers: ServerSettings) -> Runtime:
    settings = Settings(model_dir=real_model_dir(), catalog_path=TEST_CATALOG, servers=servers)
    return Runtime(settings, load_catalog(TEST_CATALOG))


@pytest.fixture(scope="module")
def runtime(gemma_file: Path, model_dir: Path) -> Iterator[Runtime]:
    rt = make_runtime()
    yield rt
    rt.close()


async def sample(runtime: Runtime, server_name: str = "test", **arguments: Any) -> dict[str, Any]:
    handler = SamplingHandler(runtime, server=server_name)
    async with Client(server, sampling_callback=handler, mode="legacy") as client:
        result = await client.call_tool("push", {"max_tokens": 8, **arguments})
    return json.loads(result.content[0].text)["result"]  # type: ignore[no-any-return, union-attr]


@pytest.mark.parametrize(
    ("hints", "model"),
    [
        (["gemini-1.5-pro"], "gemma3-270m"),  # an alias as a word of the hint (not smollm2's "mini")
        (["gemma"], "gemma3-270m"),  # family
        (["claude-3-5-haiku"], "smollm2-135m-instruct"),
        (["gpt-7", "gemma"], "gemma3-270m"),  # the first hint that matches
        (["unheard-of"], "smollm2-135m-instruct"),  # the default
    ],
)
async def test_hints_choose_between_two_real_models(runtime: Runtime, hints: list[str], model: str) -> None:
    result = await sample(runtime, hints=hints)
    assert result["model"] == model
    assert result["content"]["text"]  # it really generated


@pytest.mark.parametrize(
    ("priorities", "model"),
    [
        # gemma3-270m: intelligence 0.15 > smollm2's 0.10; the qwen models are not downloaded
        ({"intelligence": 1.0}, "gemma3-270m"),
        # smollm2: speed 0.95 > 0.80 and cost 0.05 < 0.10
        ({"speed": 1.0}, "smollm2-135m-instruct"),
        ({"cost": 1.0}, "smollm2-135m-instruct"),
        ({"intelligence": 0.9, "speed": 0.1}, "gemma3-270m"),
    ],
)
async def test_priorities_choose_without_hints(runtime: Runtime, priorities: dict[str, float], model: str) -> None:
    result = await sample(runtime, priorities=priorities)
    assert result["model"] == model
    assert result["content"]["text"]  # it really generated


async def test_a_pinned_server_gets_its_model_whatever_the_hints(gemma_file: Path, model_dir: Path) -> None:
    pinned = make_runtime(test=ServerSettings(model="gemma3-270m"))
    try:
        assert (await sample(pinned, hints=["haiku"]))["model"] == "gemma3-270m"
        assert (await sample(pinned, "other", hints=["haiku"]))["model"] == "smollm2-135m-instruct"
    finally:
        pinned.close()


async def test_an_allow_list_restricts_a_server(gemma_file: Path, model_dir: Path) -> None:
    allowed = make_runtime(**{"*": ServerSettings(allow_models=["gemini"])})
    try:
        assert (await sample(allowed, hints=["haiku"]))["model"] == "gemma3-270m"
    finally:
        allowed.close()


def test_settings_naming_an_unknown_model_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"servers\.writer\.model names 'gpt-9'"):
        make_runtime(writer=ServerSettings(model="gpt-9"))


def test_call_uses_the_hinted_model_and_settings_from_the_config_file(gemma_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[servers.pinned]\nmodel = "gemma3-270m"\n')
    env = os.environ | {"LOCALSAMPLE_CATALOG_PATH": str(TEST_CATALOG), "LOCALSAMPLE_CONFIG": str(config)}
    server_cmd = f"{sys.executable} {ROOT / 'tests' / 'servers' / 'sampling_server.py'}"

    def run(name: str, hints: list[str]) -> str:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "localsample",
                "call",
                "--server",
                f"{name}={server_cmd}",
                "push",
                "--args",
                json.dumps({"max_tokens": 4, "hints": hints}),
                "--protocol",
                "legacy",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        return str(json.loads(proc.stdout)["result"]["model"])

    assert run("free", ["gemma"]) == "gemma3-270m"
    assert run("free", ["haiku"]) == "smollm2-135m-instruct"
    assert run("pinned", ["haiku"]) == "gemma3-270m"


def test_models_select_prints_choice_reason_and_runners_up(gemma_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALSAMPLE_CATALOG_PATH", str(TEST_CATALOG))
    runner = CliRunner()
    result = runner.invoke(app, ["models", "select", "--hint", "gemini", "--intelligence", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "gemma3-270m" and "hint 'gemini'" in data["reason"]
    ids = [row["id"] for row in data["ranking"]]
    assert ids[:2] == ["gemma3-270m", "smollm2-135m-instruct"]  # on disk first, by score
    assert {row["id"]: row["excluded"] for row in data["ranking"]}["qwen2.5-3b-instruct"].startswith("not downloaded")
    text = runner.invoke(app, ["models", "select", "--intelligence", "1"]).stdout
    assert text.splitlines()[0] == "gemma3-270m"
    assert "best priority score 0.15" in text and "* gemma3-270m" in text
    bad = runner.invoke(app, ["models", "select", "--needs", "telepathy"])
    assert bad.exit_code == 1 and "use vision, audio, tools" in bad.stderr
    out_of_range = runner.invoke(app, ["models", "select", "--cost", "2"])
    assert out_of_range.exit_code == 1 and "costPriority must be between 0 and 1" in out_of_range.stderr
