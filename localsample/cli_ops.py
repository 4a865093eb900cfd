"""`localsample ps` and `localsample doctor`: what is running, and whether all is well.

Every `serve` process writes what it has loaded to ``state_dir/run/<pid>.json`` (and
removes it on exit); `ps` reads those files, so it sees every daemon a host started,
without a socket. A file whose process is gone is removed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from localsample.errors import LocalsampleError
from localsample.gguf_file import human_size


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemons(state_dir: Path) -> list[dict[str, Any]]:
    found = []
    for file in sorted((state_dir / "run").glob("*.json")):
        try:
            status = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not alive(int(status.get("pid", 0))):
            file.unlink(missing_ok=True)
            continue
        found.append(status)
    return found


def ps_command(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the models loaded by running `localsample serve` processes."""
    from localsample.settings import load_settings

    try:
        settings = load_settings()
    except LocalsampleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    running = daemons(settings.state_dir)
    if as_json:
        typer.echo(json.dumps(running, indent=2))
        return
    rows = [("PID", "MODEL", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")]
    for status in running:
        for model in status["models"]:
            if model["in_flight"]:
                until = f"busy ({model['in_flight']})"
            elif model["until"] is None:
                until = "forever"
            else:
                until = time.strftime("%H:%M:%S", time.localtime(model["until"]))
            rows.append((str(status["pid"]), model["id"], human_size(model["size"]), model["processor"],
                         str(model["n_ctx"]), until))
    if len(rows) == 1:
        typer.echo("No models loaded" + ("" if running else " (no localsample serve is running)") + ".")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def doctor_command() -> None:
    """Check this installation: llama.cpp build, GPU offload, settings, catalog, model files."""
    import llama_cpp

    from localsample.catalog import load_catalog
    from localsample.gguf_file import read_gguf
    from localsample.pool import Pool
    from localsample.settings import config_file_path, load_settings

    problems = 0

    def report(ok: bool | None, what: str, fix: str = "") -> None:
        nonlocal problems
        mark = {True: "ok     ", False: "error  ", None: "warning"}[ok]
        problems += ok is False
        typer.echo(f"{mark}  {what}" + (f"\n         fix: {fix}" if fix and ok is not True else ""))

    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    report(True, f"llama-cpp-python {llama_cpp.__version__}")
    report(True if gpu else None, f"GPU offload: {'supported' if gpu else 'not in this build (CPU only)'}",
           'reinstall with CMAKE_ARGS="-DGGML_CUDA=on" (NVIDIA) or "-DGGML_METAL=on" (Apple) to use a GPU')
    report(True, "CPU features: " + llama_cpp.llama_print_system_info().decode().strip().removeprefix("CPU : "))
    try:
        settings = load_settings()
        report(True, f"settings ({config_file_path()})")
        catalog = load_catalog(settings.catalog_path)
        report(True, f"catalog: {len(catalog)} models (your catalog: {settings.catalog_path})")
    except LocalsampleError as exc:
        report(False, exc.problem, exc.fix or "")
        raise typer.Exit(1) from None
    pool = Pool(catalog, settings)
    for model in catalog:
        if not pool.available(model):
            report(None, f"{model.id}: not downloaded", f"localsample models pull {model.id}")
            continue
        path = pool.engine(model).path
        try:
            info = read_gguf(path)
        except LocalsampleError as exc:
            report(False, f"{model.id}: {exc.problem}", exc.fix or "")
            continue
        where = "CPU" if model.load.n_gpu_layers == 0 else f"n_gpu_layers={model.load.n_gpu_layers}"
        size = human_size(path.stat().st_size)
        report(True, f"{model.id}: {info.architecture}, {info.quantization}, {size}, {where}")
        if model.load.n_gpu_layers != 0 and not gpu:
            report(None, f"{model.id}: asks for GPU layers, but this build runs on the CPU only",
                   "rebuild llama-cpp-python with GPU support, or set n_gpu_layers = 0")
        if info.chat_template is None and model.chat_template is None:
            report(False, f"{model.id}: no chat template in the GGUF", "set chat_template in its catalog entry")
    try:
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.log_dir / ".doctor"
        probe.write_text("ok")
        probe.unlink()
        report(True, f"log directory {settings.log_dir} is writable")
    except OSError as exc:
        report(False, f"log directory {settings.log_dir}: {exc}", "set log_dir to a writable directory")
    if problems:
        raise typer.Exit(1)
