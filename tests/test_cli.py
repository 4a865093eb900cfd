"""`localsample sample` and `localsample config`, through Typer's runner and as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localsample.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_sample_json_reports_text_model_reason_counts_and_timings(model_dir: Path) -> None:
    result = runner.invoke(
        app, ["sample", "Name a colour.", "--json", "--temperature", "0", "--max-tokens", "5", "--hint", "claude-haiku"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "smollm2-135m-instruct"
    assert data["stop_reason"] == "maxTokens" and data["completion_tokens"] == 5
    assert data["prompt_tokens"] > 0 and 0 < data["time_to_first_token"] <= data["duration"]
    assert "hint 'claude-haiku'" in data["reason"]
    assert data["text"]


@pytest.mark.slow
def test_sample_stop_option_is_applied(model_dir: Path) -> None:
    base = json.loads(runner.invoke(app, ["sample", "Count from 1 to 20.", "--json", "--temperature", "0"]).stdout)
    stop = base["text"][6:9]
    result = runner.invoke(app, ["sample", "Count from 1 to 20.", "--json", "--temperature", "0", "--stop", stop])
    data = json.loads(result.stdout)
    assert data["stop_reason"] == "stopSequence" and data["stop_sequence"] == stop
    assert data["text"] == base["text"][: base["text"].index(stop)]


def test_unknown_model_is_a_clear_error(model_dir: Path) -> None:
    result = runner.invoke(app, ["sample", "hi", "--model", "gpt-9"])
    assert result.exit_code == 1
    assert "no model 'gpt-9'" in result.stderr and "fix:" in result.stderr


@pytest.mark.slow
def test_sample_streams_to_stdout_as_a_real_process(model_dir: Path) -> None:
    """Text arrives on stdout before the process ends; the summary line goes to stderr."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localsample",
            "sample",
            "Write a long story about a lighthouse.",
            "--max-tokens",
            "60",
            "--temperature",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    assert proc.stdout is not None
    first = proc.stdout.read(1)  # blocks until the first byte is flushed
    assert proc.poll() is None, "the first text should arrive while generation is still running"
    rest = proc.stdout.read()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(first + rest) > 50
    assert b"smollm2-135m-instruct: 60 tokens, maxTokens" in err


def test_config_shows_values_and_sources(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (isolated / "config.toml").write_text('log_level = "warning"\n')
    monkeypatch.setenv("LOCALSAMPLE_DEFAULT_MODEL", "haiku")
    data = json.loads(runner.invoke(app, ["config", "--json"]).stdout)
    assert data["config_file"] == str(isolated / "config.toml") and data["config_file_exists"]
    assert data["settings"]["log_level"] == "warning"
    assert data["sources"]["log_level"] == str(isolated / "config.toml")
    assert data["sources"]["default_model"] == "env LOCALSAMPLE_DEFAULT_MODEL"
    text = runner.invoke(app, ["config"]).stdout
    assert "default_model" in text and "[env LOCALSAMPLE_DEFAULT_MODEL]" in text


def test_bad_config_is_a_clear_error(isolated: Path) -> None:
    (isolated / "config.toml").write_text("nonsense = 1\n")
    result = runner.invoke(app, ["sample", "hi"])
    assert result.exit_code == 1
    assert "nonsense" in result.stderr and "fix:" in result.stderr
