"""The CLI's shared parts: the error boundary, the output helpers, and commands that load no model."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import anyio
import pytest
import typer
from typer.testing import CliRunner

from localsample.cli import app, main
from localsample.cli_common import INTERRUPTED, JsonOption, command_group, output, run_async, table
from localsample.errors import ConfigError, LocalsampleError

runner = CliRunner()


def failing_app() -> typer.Typer:
    """A small app built like the real one, whose commands fail in the ways commands do."""
    demo = command_group(name="demo")
    sub = command_group()
    demo.add_typer(sub, name="sub")

    @demo.command()
    def plain() -> None:
        raise ConfigError("the problem", "the fix")

    @demo.command()
    def grouped() -> None:
        async def go() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.sleep, 10)
                raise LocalsampleError("inside a task group")

        run_async(go)

    @demo.command()
    def interrupted() -> None:
        raise KeyboardInterrupt

    @demo.command()
    def bug() -> None:
        raise ValueError("a bug, not a user error")

    @sub.command()
    def nested() -> None:
        raise LocalsampleError("from a sub-command")

    @sub.command()
    def other() -> None:
        """A second command, so that `sub` stays a group."""

    return demo


def test_a_localsample_error_becomes_one_message_and_exit_1() -> None:
    result = runner.invoke(failing_app(), ["plain"])
    assert result.exit_code == 1
    assert result.stderr == "error: the problem\n  fix: the fix\n" and result.stdout == ""


def test_errors_inside_exception_groups_and_sub_commands_are_unwrapped() -> None:
    demo = failing_app()
    grouped = runner.invoke(demo, ["grouped"])
    assert grouped.exit_code == 1 and grouped.stderr == "error: inside a task group\n"
    nested = runner.invoke(demo, ["sub", "nested"])
    assert nested.exit_code == 1 and nested.stderr == "error: from a sub-command\n"


def test_an_interrupt_exits_130_and_other_exceptions_are_not_hidden() -> None:
    demo = failing_app()
    interrupted = runner.invoke(demo, ["interrupted"])
    assert interrupted.exit_code == INTERRUPTED == 130 and "interrupted" in interrupted.stderr
    bug = runner.invoke(demo, ["bug"])
    assert bug.exit_code == 1 and isinstance(bug.exception, ValueError)
    assert "error:" not in bug.stderr


def test_the_real_app_reports_library_errors_the_same_way() -> None:
    shown = runner.invoke(app, ["models", "show", "gpt-9"])
    assert shown.exit_code == 1
    assert shown.stderr.startswith("error: no model 'gpt-9' in the catalog") and "fix:" in shown.stderr
    bad_env = runner.invoke(app, ["call", "echo", "--server", "python server.py", "--env", "NOEQUALS"])
    assert bad_env.exit_code == 1 and "error: --env 'NOEQUALS' is not KEY=VALUE" in bad_env.stderr
    bad_needs = runner.invoke(app, ["models", "select", "--needs", "telepathy"])
    assert bad_needs.exit_code == 1 and "error: --needs telepathy: use vision, audio, tools" in bad_needs.stderr


def test_main_reports_errors_as_the_runner_sees_them(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (isolated / "config.toml").write_text('log_level = "loud"\n')
    monkeypatch.setattr(sys, "argv", ["localsample", "config"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: invalid settings") and "\n  fix: " in err


def test_table_aligns_columns_and_strips_trailing_space() -> None:
    lines = table(("ID", "SIZE", "NOTE"), [("a-long-id", "1 MB", ""), ("b", "100 MB", "x")])
    assert lines == [
        "ID         SIZE    NOTE",
        "a-long-id  1 MB",
        "b          100 MB  x",
    ]
    assert table(("ONLY",), []) == ["ONLY"]
    with pytest.raises(ValueError, match="2 cells"):
        table(("A", "B"), [("just one",)])


def test_output_prints_json_or_the_text_lines(capsys: pytest.CaptureFixture[str]) -> None:
    output({"a": [1, 2]}, True, lambda: ["never rendered"])
    assert json.loads(capsys.readouterr().out) == {"a": [1, 2]}
    output({"a": [1, 2]}, False, lambda: ["first", "second"])
    assert capsys.readouterr().out == "first\nsecond\n"


def test_the_json_option_is_one_flag_everywhere() -> None:
    demo = command_group(name="demo")

    @demo.command()
    def show(as_json: JsonOption = False) -> None:
        output({"json": True}, as_json, lambda: ["text"])

    @demo.command()
    def other() -> None:
        """Keeps `demo` a group."""

    assert runner.invoke(demo, ["show"]).stdout == "text\n"
    assert json.loads(runner.invoke(demo, ["show", "--json"]).stdout) == {"json": True}


def test_ps_lists_the_models_of_running_daemons(isolated: Path) -> None:
    assert runner.invoke(app, ["ps"]).stdout == "No models loaded (no localsample serve is running).\n"
    run = isolated / "state" / "run"
    run.mkdir(parents=True)
    model = {
        "id": "smollm2-135m-instruct",
        "size": 100 << 20,
        "processor": "CPU",
        "n_ctx": 8192,
        "in_flight": 0,
        "until": None,
    }
    (run / f"{os.getpid()}.json").write_text(json.dumps({"pid": os.getpid(), "started": 0, "models": [model]}))
    (run / "999999999.json").write_text(json.dumps({"pid": 999999999, "started": 0, "models": [model]}))
    lines = runner.invoke(app, ["ps"]).stdout.splitlines()
    assert lines[0].split() == ["PID", "MODEL", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert lines[1].split()[:2] == [str(os.getpid()), "smollm2-135m-instruct"] and lines[1].endswith("forever")
    assert len(lines) == 2 and not (run / "999999999.json").exists()  # a file whose process is gone is removed
    assert [d["pid"] for d in json.loads(runner.invoke(app, ["ps", "--json"]).stdout)] == [os.getpid()]


def test_models_list_is_a_table(isolated: Path) -> None:
    lines = runner.invoke(app, ["models", "list"]).stdout.splitlines()
    assert lines[0].split() == ["ID", "ALIASES", "SIZE", "QUANT", "STATUS"]
    assert any(line.startswith("qwen2.5-3b-instruct") and line.endswith("missing") for line in lines)
    rows = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)
    assert {row["id"] for row in rows} >= {"smollm2-135m-instruct", "qwen2.5-3b-instruct"}


def test_models_show_json_of_a_downloaded_model(model_dir: Path) -> None:
    data = json.loads(runner.invoke(app, ["models", "show", "haiku", "--json"]).stdout)
    assert data["id"] == "smollm2-135m-instruct" and data["status"] == "downloaded"
    assert data["architecture"] == "llama" and data["quantization"] == "Q4_1" and data["chat_template"] == "chatml"
    assert data["path"] == str(model_dir / "SmolLM2-135M-Instruct.Q4_1.gguf") and data["vision_projector"] is None
    missing = json.loads(runner.invoke(app, ["models", "show", "qwen2.5-3b-instruct", "--json"]).stdout)
    assert missing["status"] == "missing" and missing["path"] is None and "architecture" not in missing


def test_help_names_arguments_plainly_and_gives_flags_no_type() -> None:
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "<bool>" not in top.stdout
    assert "--version  Print the version." in top.stdout
    sample = runner.invoke(app, ["sample", "--help"])
    assert "Usage: localsample sample [OPTIONS] PROMPT" in sample.stdout and "{prompt}" not in sample.stdout
    rm = runner.invoke(app, ["models", "rm", "--help"])
    assert "Usage: localsample models rm [OPTIONS] MODELS..." in rm.stdout


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_line_never_starts_inside_streamed_text() -> None:
    import logging

    from localsample.cli_common import LineAwareHandler, end_line, stream_text

    terminal = Tty()
    logger = logging.getLogger("localsample.test-lines")
    handler = LineAwareHandler(terminal)
    logger.addHandler(handler)
    try:
        stream_text(terminal, "3. Oranges")
        logger.warning("answered")
        stream_text(terminal, "more text\n")
        logger.warning("again")  # the text ended its own line: no blank line added
        stream_text(terminal, "tail")
        end_line(terminal)
        end_line(terminal)  # once only
    finally:
        logger.removeHandler(handler)
    assert terminal.getvalue() == "3. Oranges\nanswered\nmore text\nagain\ntail\n"


def test_models_select_without_priorities_shows_no_scores(isolated: Path) -> None:
    result = runner.invoke(app, ["models", "select"])
    assert result.exit_code == 0, result.output
    assert "no priorities given" in result.stdout and "0.00" not in result.stdout
    assert "  * smollm2-135m-instruct" in result.stdout and "—" in result.stdout
    data = json.loads(runner.invoke(app, ["models", "select", "--json"]).stdout)
    assert all(row["score"] is None for row in data["ranking"])
    scored = runner.invoke(app, ["models", "select", "--speed", "1"])
    assert "0.95" in scored.stdout


def test_audit_tail_error_rows_have_no_token_counts(isolated: Path) -> None:
    from localsample.audit import AuditLog, AuditRecord

    log = AuditLog(isolated / "logs" / "audit.jsonl", max_bytes=10**6, backups=1, include_text=False)
    log.write(AuditRecord("srv", "1", decision="error", error="params.messages is empty"))
    log.write(AuditRecord("srv", "2", decision="approved", prompt_tokens=7, completion_tokens=3, duration=0.5))
    lines = runner.invoke(app, ["audit", "tail"]).stdout.splitlines()
    assert "-+-" not in lines[0] and "error: params.messages is empty" in lines[0]
    assert "7+3 tok" in lines[1]
