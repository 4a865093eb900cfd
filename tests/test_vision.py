"""Images and audio on the real default model, with synthetic projectors (mmproj_fixture.py):
the real path end to end — decoding, preprocessing, projector load, embeddings evaluated in
the batcher beside text requests, prefix and embedding caches keyed by the image's hash,
cancellation, routing, errors, the daemon and its OpenAI endpoint. The projectors' weights
are random, so these tests assert counts and behaviour, never what the text says.

A real small vision model is tested too when its files are named by
LOCALSAMPLE_TEST_VISION_MODEL (``MODEL.gguf:MMPROJ.gguf``): the test is defined only then."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from localsample.catalog import ModelEntry
from localsample.engine import Engine
from localsample.errors import ModelFileError, RequestError
from localsample.generation import MEDIA_MARKER, ChatMessage, GenerationRequest, Media
from localsample.media import audio_of, image_of
from localsample.runtime import Runtime
from localsample.sampling import SamplingHandler
from localsample.settings import load_settings
from localsample.vision import Projector

from .conftest import small_entry
from .daemon_process import Running, daemon_in
from .mmproj_fixture import (
    audio_tokens,
    b64,
    image_bytes,
    image_tokens,
    wav_bytes,
    write_audio_projector,
    write_projector,
)
from .servers.sampling_server import server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
SERVER = Path(__file__).parent / "servers" / "sampling_server.py"
RED = image_of(b64(image_bytes(64, 48, (200, 30, 30))), "image/png", "red")
BLUE = image_of(b64(image_bytes(80, 60, (30, 30, 200), kind="JPEG")), "image/jpeg", "blue")
TOKENS = image_tokens()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def projectors() -> Iterator[dict[str, Path]]:
    """The synthetic projectors, written once for the run."""
    root = Path(tempfile.mkdtemp(prefix="lsv-"))
    yield {
        "vision": write_projector(root / "mmproj-vision.gguf"),
        "audio": write_audio_projector(root / "mmproj-audio.gguf"),
        "wide": write_projector(root / "mmproj-512.gguf", n_embd=512),
    }
    shutil.rmtree(root, ignore_errors=True)


def vision_entry(projector: Path, capabilities: tuple[str, ...] = ("chat", "vision")) -> ModelEntry:
    return small_entry().model_copy(update={"mmproj": str(projector), "capabilities": list(capabilities)})


@pytest.fixture
def seeing(model_dir: Path, projectors: dict[str, Path]) -> Iterator[Engine]:
    entry = vision_entry(projectors["vision"])
    engine = Engine(entry, model_dir / entry.source, slots=4)
    yield engine
    engine.close()


def ask(
    *media: Media, text: str = "What do you see?", tokens: int = 12, history: tuple[ChatMessage, ...] = ()
) -> GenerationRequest:
    turn = ChatMessage("user", MEDIA_MARKER * len(media) + text, media=media)
    return GenerationRequest(messages=[*history, turn], max_tokens=tokens, temperature=0.0)


def stats(engine: Engine) -> tuple[int, int, int]:
    """(media encoded, embeddings reused from the cache, media tokens evaluated)."""
    assert engine.projector is not None
    found = engine.projector.stats
    return found.encoded, found.reused, found.evaluated


# -- generation ---------------------------------------------------------------------------


async def test_image_tokens_count_in_the_prompt_and_greedy_output_is_deterministic(seeing: Engine) -> None:
    one = await seeing.generate(ask(RED))
    assert stats(seeing) == (1, 0, TOKENS)
    await seeing.reset_cache()
    two = await seeing.generate(ask(RED, BLUE))  # two images side by side: the text is the same
    assert two.prompt_tokens - one.prompt_tokens == TOKENS
    await seeing.reset_cache()
    again = await seeing.generate(ask(RED))
    assert (again.text, again.prompt_tokens, again.completion_tokens) == (one.text, one.prompt_tokens, 12)
    encoded, reused, _ = stats(seeing)
    assert (encoded, reused) == (2, 2)  # the cache kept both embeddings: evaluated again, never encoded again


async def test_a_second_question_about_the_same_image_reuses_its_cache(seeing: Engine) -> None:
    first = await seeing.generate(ask(RED, text="Describe it."))
    before = seeing.batcher.prompt_tokens_evaluated if seeing.batcher else 0
    history = (ChatMessage("user", MEDIA_MARKER + "Describe it.", media=(RED,)), ChatMessage("assistant", first.text))
    follow = await seeing.generate(
        GenerationRequest([*history, ChatMessage("user", "And its colour?")], max_tokens=8, temperature=0.0)
    )
    assert stats(seeing) == (1, 0, TOKENS)  # neither encoded nor evaluated again
    assert seeing.batcher is not None
    assert seeing.batcher.prompt_tokens_evaluated - before < follow.prompt_tokens - TOKENS
    await seeing.generate(ask(BLUE))  # another image: encoded
    assert stats(seeing) == (2, 0, 2 * TOKENS)
    other = dataclasses.replace(ask(RED), system="You are terse.")  # same image after another prefix
    await seeing.generate(other)
    assert stats(seeing) == (2, 1, 3 * TOKENS)  # evaluated there, its embeddings from the cache


async def test_image_and_text_requests_share_decode_steps_and_text_stays_exact(seeing: Engine) -> None:
    text = GenerationRequest([ChatMessage("user", "Name three rivers.")], max_tokens=40, temperature=0.0)
    alone = await seeing.generate(text)
    await seeing.reset_cache()
    image_alone = await seeing.generate(ask(RED, tokens=40))
    await seeing.reset_cache()
    results: dict[str, str] = {}

    async def run(name: str, request: GenerationRequest) -> None:
        results[name] = (await seeing.generate(request)).text

    async with anyio.create_task_group() as group:
        group.start_soon(run, "text", text)
        group.start_soon(run, "image", ask(RED, tokens=40))
    assert seeing.batcher is not None and seeing.batcher.widest_step >= 2
    assert results == {"text": alone.text, "image": image_alone.text}


async def test_cancelling_an_image_request_frees_its_slot(seeing: Engine) -> None:
    started = anyio.Event()

    async def on_text(_text: str, _tokens: int) -> None:
        started.set()

    async def long() -> None:
        await seeing.generate(ask(RED, tokens=400), on_text)

    async with anyio.create_task_group() as group:
        group.start_soon(long)
        await started.wait()
        group.cancel_scope.cancel()
    assert seeing.batcher is not None and seeing.batcher.running == 0
    after = await seeing.generate(ask(RED, tokens=4))
    assert after.completion_tokens == 4


async def test_a_prompt_s_media_are_freed_once_however_its_request_ends(
    model_dir: Path, projectors: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp's chunks of a prompt are freed once: answered, or cancelled while it waits
    at the head of the queue (its prompt already made), or failing at admission."""
    freed: list[int] = []
    made = Projector.prompt

    def counted(self: Projector, chunks: Any, media: list[Media]) -> Any:
        prompt = made(self, chunks, media)
        closer = prompt.closer
        assert closer is not None

        def close() -> None:
            freed.append(id(prompt))
            closer()

        prompt.closer = close
        return prompt

    monkeypatch.setattr(Projector, "prompt", counted)
    entry = vision_entry(projectors["vision"])
    engine = Engine(entry, model_dir / entry.source, slots=1)
    try:
        await engine.generate(ask(RED, tokens=2))
        assert len(freed) == 1
        started = anyio.Event()

        async def on_text(_text: str, _tokens: int) -> None:
            started.set()

        text = GenerationRequest([ChatMessage("user", "Tell a long story.")], max_tokens=60, temperature=0.0)
        async with anyio.create_task_group() as group:
            group.start_soon(engine.generate, text, on_text)
            await started.wait()
            with anyio.move_on_after(0.5):  # waits at the head: the only slot is busy
                await engine.generate(ask(BLUE, tokens=2))
        assert len(freed) == 2 and len(set(freed)) == 2
        overflowing = ask(RED, tokens=entry.load.n_ctx)  # its prompt is made, then refused
        with pytest.raises(RequestError, match="n_ctx"):
            await engine.generate(overflowing)
        assert len(freed) == 3
    finally:
        engine.close()


async def test_audio_over_30_seconds_is_several_chunks_of_one_clip(
    model_dir: Path, projectors: dict[str, Path]
) -> None:
    entry = vision_entry(projectors["audio"], ("chat", "audio"))
    engine = Engine(entry, model_dir / entry.source)
    try:
        short = await engine.generate(ask(audio_of(b64(wav_bytes(5.0)), "audio/wav", "short"), tokens=3))
        long = await engine.generate(ask(audio_of(b64(wav_bytes(45.0)), "audio/wav", "long"), tokens=3))
        assert long.prompt_tokens - short.prompt_tokens == audio_tokens()  # two windows of 30 s
        assert stats(engine) == (3, 0, 3 * audio_tokens())
    finally:
        engine.close()


# -- errors -------------------------------------------------------------------------------


async def test_what_the_projector_cannot_read_is_refused_and_the_engine_goes_on(seeing: Engine) -> None:
    clip = audio_of(b64(wav_bytes()), "audio/wav", "clip")
    with pytest.raises(RequestError, match=r"its projector mmproj-vision\.gguf reads no audio"):
        await seeing.generate(ask(clip))
    assert (await seeing.generate(ask(RED, tokens=3))).completion_tokens == 3
    cut = image_of(b64(image_bytes()), "image/png", "cut")
    broken = dataclasses.replace(cut, data=cut.data[:60])  # a header, then nothing
    with pytest.raises(RequestError, match="an image could not be decoded"):
        await seeing.generate(ask(broken))


async def test_a_projector_for_another_model_fails_to_load_clearly(
    model_dir: Path, projectors: dict[str, Path]
) -> None:
    entry = vision_entry(projectors["wide"])
    engine = Engine(entry, model_dir / entry.source)
    try:
        with pytest.raises(ModelFileError, match=r"(?s)could not load the projector .* belongs to the model"):
            await engine.generate(ask(RED))
        text = GenerationRequest([ChatMessage("user", "Hi")], max_tokens=3, temperature=0.0)
        assert (await engine.generate(text)).completion_tokens == 3  # text requests still served
        missing = Engine(vision_entry(projectors["vision"].with_name("gone.gguf")), model_dir / entry.source)
        with pytest.raises(ModelFileError, match=r"its projector .*gone\.gguf is not on disk"):
            await missing.generate(ask(RED))
        missing.close()
    finally:
        engine.close()


async def test_an_audio_clip_is_evaluated_by_an_audio_projector(model_dir: Path, projectors: dict[str, Path]) -> None:
    entry = vision_entry(projectors["audio"], ("chat", "audio"))
    engine = Engine(entry, model_dir / entry.source)
    clip = audio_of(b64(wav_bytes(2.0)), "audio/wav", "clip")
    try:
        text = await engine.generate(GenerationRequest([ChatMessage("user", "Listen.")], max_tokens=6, temperature=0))
        heard = await engine.generate(ask(clip, text="Listen.", tokens=6))
        assert stats(engine) == (1, 0, audio_tokens())
        assert heard.prompt_tokens > text.prompt_tokens + audio_tokens() - 4  # the marker splits the text
        await engine.reset_cache()
        assert (await engine.generate(ask(clip, text="Listen.", tokens=6))).text == heard.text
        with pytest.raises(RequestError, match="reads no image"):
            await engine.generate(ask(RED))
    finally:
        engine.close()


# -- through MCP, the daemon and its OpenAI endpoint ----------------------------------------


def vision_catalog(root: Path, projector: Path) -> Path:
    catalog = root / "models.toml"
    catalog.write_text(
        '[[models]]\nid = "smolvision"\nsource = "SmolLM2-135M-Instruct.Q4_1.gguf"\n'
        f'mmproj = "{projector}"\ncapabilities = ["chat", "vision"]\naliases = ["eyes"]\n[models.load]\nn_ctx = 2048\n'
    )
    return catalog


async def test_an_mcp_server_s_image_is_answered_by_the_vision_model(
    isolated: Path, projectors: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCALSAMPLE_CATALOG_PATH", str(vision_catalog(isolated, projectors["vision"])))
    runtime = Runtime(load_settings())
    try:
        async with Client(server, sampling_callback=SamplingHandler(runtime, server="shop"), mode="legacy") as client:
            result = await client.call_tool(
                "push", {"max_tokens": 6, "text": "Describe the product: ", "image_data": b64(RED.data)}
            )
        report: dict[str, Any] = json.loads(result.content[0].text)  # type: ignore[union-attr]
        assert report["result"]["model"] == "smolvision" and report["result"]["stopReason"] == "maxTokens"
        audit = [json.loads(x) for x in (isolated / "logs" / "audit.jsonl").read_text().splitlines()]
        assert audit[-1]["media"] == [f"image {RED.describe()}"] and audit[-1]["prompt_tokens"] > TOKENS
    finally:
        runtime.close()


@pytest.fixture(scope="module")
def vision_daemon(model_dir: Path, projectors: dict[str, Path]) -> Iterator[Running]:
    root = Path(tempfile.mkdtemp(prefix="lsv-"))
    vision_catalog(root, projectors["vision"])
    with daemon_in(root) as running:
        yield running


def test_an_attached_call_sends_the_image_through_the_daemon(vision_daemon: Running) -> None:
    args = {"image_data": b64(RED.data), "max_tokens": 5}
    command = ["call", "--server", f"{sys.executable} {SERVER}", "push", "--args", json.dumps(args)]
    done = vision_daemon.cli(*command, "--protocol", "legacy", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "attached to the localsample daemon" in done.stderr
    assert json.loads(done.stdout)["result"]["model"] == "smolvision"
    record = vision_daemon.audit()[-1]
    assert record["media"] == [f"image {RED.describe()}"] and record["model"] == "smolvision"


def test_the_openai_endpoint_reads_image_url_parts(vision_daemon: Running) -> None:
    url = f"data:image/png;base64,{b64(RED.data)}"
    content: Any = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    client = vision_daemon.client()
    answer = client.chat.completions.create(
        model="eyes", messages=[{"role": "user", "content": content}], max_tokens=5, temperature=0
    )
    assert answer.model == "smolvision" and answer.usage is not None and answer.usage.prompt_tokens > TOKENS
    with pytest.raises(Exception, match="not a base64 data: URI"):
        bad: Any = [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
        client.chat.completions.create(model="eyes", messages=[{"role": "user", "content": bad}], max_tokens=5)
    plain = client.chat.completions.create(model="eyes", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert plain.usage is not None and plain.usage.completion_tokens == 3  # still serving


# -- a real vision model, where its files are --------------------------------------------------

REAL = os.environ.get("LOCALSAMPLE_TEST_VISION_MODEL", "")
if REAL:  # defined only where the files are named: never a skipped test

    async def test_a_real_small_vision_model_describes_a_picture() -> None:
        model_file, projector = (Path(p).expanduser() for p in REAL.split(":"))
        entry = small_entry().model_copy(
            update={
                "id": "real-vision",
                "source": str(model_file),
                "mmproj": str(projector),
                "capabilities": ["chat", "vision"],
            }
        )
        engine = Engine(entry, model_file)
        try:
            answer = await engine.generate(ask(RED, text="What colour is this image? One word.", tokens=8))
            assert "red" in answer.text.lower(), answer.text
        finally:
            engine.close()


def test_sample_reads_an_image_file(isolated: Path, projectors: dict[str, Path], model_dir: Path) -> None:
    (isolated / "red.png").write_bytes(RED.data)
    env = dict(os.environ) | {"LOCALSAMPLE_CATALOG_PATH": str(vision_catalog(isolated, projectors["vision"]))}
    command = [sys.executable, "-m", "localsample", "sample", "What is it?", "--image", str(isolated / "red.png")]
    done = subprocess.run(
        [*command, "--max-tokens", "4", "--json", "--no-daemon"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["model"] == "smolvision" and answer["prompt_tokens"] > TOKENS
    (isolated / "notes.txt").write_text("hello")
    refused = subprocess.run(
        [*command[:-1], str(isolated / "notes.txt")], env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and "is neither an image nor audio" in refused.stderr


def test_a_fastmcp_server_s_image_is_answered(isolated: Path, projectors: dict[str, Path], model_dir: Path) -> None:
    """FastMCP 3 (mcp 1.x, in its own virtualenv: see test_fastmcp.py) sends the image."""
    fastmcp = Path(__file__).parent / "servers" / "fastmcp"
    server_command = f"{fastmcp / '.venv' / 'bin' / 'python'} {fastmcp / 'tools_server.py'}"
    env = dict(os.environ) | {"LOCALSAMPLE_CATALOG_PATH": str(vision_catalog(isolated, projectors["vision"]))}
    command = [sys.executable, "-m", "localsample", "call", "--server", server_command, "describe_photo"]
    done = subprocess.run(
        [*command, "--arg", f"image={b64(RED.data)}", "--no-daemon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"]
    record = json.loads((isolated / "logs" / "audit.jsonl").read_text().splitlines()[-1])
    assert record["model"] == "smolvision" and record["media"] == [f"image {RED.describe()}"]
    assert record["stop_reason"] in ("maxTokens", "endTurn")
