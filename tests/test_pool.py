"""The model pool: keep-alive, eviction, memory budget and the queue bound (fast, on
FakeGenerators with the real models' file sizes); preload in `serve`, `ps` and `doctor`
(slow, on the real model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from localsample.errors import BusyError
from localsample.generation import ChatMessage, GenerationRequest
from localsample.runtime import Runtime
from localsample.settings import Settings

from .conftest import FakeGenerator, fake_runtime, real_model_dir

pytestmark = pytest.mark.anyio
TEST_CATALOG = Path(__file__).parent / "catalog.toml"
ROOT = Path(__file__).resolve().parent.parent
SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def runtime(tmp_path: Path, **settings: Any) -> Runtime:
    base = Settings(model_dir=real_model_dir(), catalog_path=TEST_CATALOG, state_dir=tmp_path, **settings)
    return fake_runtime(base, TEST_CATALOG)


def request(max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(messages=[ChatMessage("user", "Tell me a long story.")], max_tokens=max_tokens)


async def generate(rt: Runtime, model: str, max_tokens: int = 4) -> None:
    await rt.complete(rt.select(model=model), request(max_tokens))


def loaded(rt: Runtime) -> list[str]:
    return sorted(r.model.id for r in rt.pool.loaded())


async def test_keep_alive_unloads_an_idle_model_on_time(tmp_path: Path) -> None:
    rt = runtime(tmp_path, keep_alive=1.0)
    await generate(rt, SMOL)
    resident = rt.pool.resident(rt.catalog.get(SMOL))
    assert rt.pool.reap(now=resident.last_used + 59.9) == [] and loaded(rt) == [SMOL]
    assert rt.pool.reap(now=resident.last_used + 60.0) == [SMOL] and loaded(rt) == []
    await generate(rt, SMOL)  # loads again on demand
    assert loaded(rt) == [SMOL]
    assert isinstance(resident.generator, FakeGenerator) and resident.generator.loads == 2
    rt.close()


async def test_keep_alive_zero_and_forever(tmp_path: Path) -> None:
    rt = runtime(tmp_path, keep_alive=0)
    await generate(rt, SMOL)
    assert loaded(rt) == []
    forever = runtime(tmp_path, keep_alive=-1)
    await generate(forever, SMOL)
    assert forever.pool.reap(now=10**12) == [] and loaded(forever) == [SMOL]
    forever.close()


async def test_least_recently_used_is_evicted_past_max_loaded(tmp_path: Path) -> None:
    rt = runtime(tmp_path, max_loaded_models=1)
    await generate(rt, SMOL)
    await generate(rt, GEMMA)
    assert loaded(rt) == [GEMMA]
    rt.close()
    two = runtime(tmp_path, max_loaded_models=2)
    await generate(two, SMOL)
    await generate(two, GEMMA)
    assert loaded(two) == [GEMMA, SMOL]
    two.close()


async def test_the_memory_budget_evicts(tmp_path: Path) -> None:
    rt = runtime(tmp_path, memory_budget_mb=300)  # 98 MB + 253 MB do not fit in 300 MB
    await generate(rt, SMOL)
    await generate(rt, GEMMA)
    assert loaded(rt) == [GEMMA]
    rt.close()


async def test_a_busy_model_is_never_evicted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeGenerator, "delay", 0.01)
    rt = runtime(tmp_path, max_loaded_models=1)
    async with anyio.create_task_group() as group:
        group.start_soon(generate, rt, SMOL, 150)
        with anyio.fail_after(30):
            while not loaded(rt):
                await anyio.sleep(0.05)
        await generate(rt, GEMMA)  # needs room, but SMOL is generating
        assert loaded(rt) == [GEMMA, SMOL]
    rt.close()


async def test_busy_at_the_queue_bound_and_a_cancelled_request_frees_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeGenerator, "delay", 0.01)
    rt = runtime(tmp_path, queue_limit=2)
    engine = rt.pool.resident(rt.catalog.get(SMOL))
    async with anyio.create_task_group() as group:
        group.start_soon(generate, rt, SMOL, 300)
        queued = anyio.CancelScope()

        async def waiting() -> None:
            with queued:
                await generate(rt, SMOL, 300)

        group.start_soon(waiting)
        with anyio.fail_after(30):
            while engine.in_flight < 2:
                await anyio.sleep(0.01)
        busy = r"model 'smollm2-135m-instruct' has 2 requests running and 0 waiting \(queue_limit = 2\)"
        with pytest.raises(BusyError, match=busy):
            await generate(rt, SMOL)  # the third, exactly at the bound
        queued.cancel()
        with anyio.fail_after(5):
            while engine.in_flight != 1:
                await anyio.sleep(0.01)
        group.start_soon(generate, rt, SMOL, 50)  # accepted again at once
        await anyio.sleep(0.05)
        assert engine.in_flight == 2
    assert engine.in_flight == 0
    rt.close()


@pytest.mark.slow
async def test_serve_preloads_and_ps_shows_it(model_dir: Path, tmp_path: Path) -> None:
    env = os.environ | {"LOCALSAMPLE_STATE_DIR": str(tmp_path / "state")}
    server = f"{sys.executable} {ROOT / 'tests' / 'servers' / 'sampling_server.py'}"
    args = ["-m", "localsample", "serve", "--server", server]
    params = StdioServerParameters(command=sys.executable, args=args, env=env)

    def ps() -> list[dict[str, Any]]:
        out = subprocess.run(
            [sys.executable, "-m", "localsample", "ps", "--json"], capture_output=True, text=True, env=env, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    async with Client(params, mode="legacy") as host:
        await host.list_tools()
        with anyio.fail_after(30):
            while not (running := ps()) or not running[0]["models"]:
                await anyio.sleep(0.2)  # preload happens beside the handshake
        [daemon] = running
        [model] = daemon["models"]
        assert model["id"] == SMOL and model["processor"] == "CPU" and model["n_ctx"] == 8192
        assert model["size"] == (real_model_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size
        assert model["until"] is not None and model["in_flight"] == 0
        table = subprocess.run([sys.executable, "-m", "localsample", "ps"], capture_output=True, text=True, env=env)
        assert table.stdout.split()[:6] == ["PID", "MODEL", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
        assert f"{daemon['pid']}  {SMOL}" in table.stdout
    with anyio.fail_after(10):
        while ps():  # the daemon removed its status file when the host left
            await anyio.sleep(0.2)


@pytest.mark.slow
def test_doctor_checks_the_installation(model_dir: Path, isolated: Path) -> None:
    def doctor() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "localsample", "doctor"], capture_output=True, text=True, timeout=60
        )

    healthy = doctor()
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "ok       smollm2-135m-instruct: llama, Q4_1" in healthy.stdout
    assert "GPU offload:" in healthy.stdout
    assert "warning  qwen2.5-3b-instruct: not downloaded" in healthy.stdout
    broken = isolated / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 20)
    (isolated / "models.toml").write_text(f'[[models]]\nid = "broken"\nsource = "{broken}"\n')
    sick = doctor()
    assert sick.returncode == 1
    assert "error    broken: " in sick.stdout and "damaged GGUF" in sick.stdout
