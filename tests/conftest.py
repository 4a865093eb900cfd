"""Shared fixtures.

Two tiers. Generation behaviour is tested on the real default model, fetched by
`scripts/fetch_model.py` (scripts/test.sh does that first; a missing model is an error,
never a skip); those tests, and every test that starts processes, are marked ``slow``.
Policy, selection, pool, error mapping, routing and CLI logic run against
``FakeGenerator`` behind the generation seam: `scripts/test.sh -m "not slow"`.

No test touches the user's files: every localsample directory points into a temporary
directory for the whole session (module-scoped fixtures included) and again per test,
and HOME itself is an empty temporary directory that must stay free of localsample state.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from localsample.catalog import LoadSettings, ModelEntry, load_catalog
from localsample.engine import Engine
from localsample.errors import BusyError
from localsample.generation import Completion, GenerationRequest, OnText, StopMatcher, StopReason, ToolCall
from localsample.gguf_file import check_gguf_file, files_size
from localsample.pool import GeneratorFactory
from localsample.runtime import Runtime
from localsample.settings import Settings, default_model_dir

DEFAULT_ID = "smollm2-135m-instruct"
TEST_N_CTX = 2048
LOCALSAMPLE_DIRS = ("LOCALSAMPLE_CONFIG", "LOCALSAMPLE_CATALOG_PATH", "LOCALSAMPLE_LOG_DIR", "LOCALSAMPLE_STATE_DIR")

SESSION_ROOT = pytest.StashKey[Path]()

# Where fetch_model.py put the real model, read before HOME is replaced below.
REAL_MODEL_DIR = Path(os.environ.get("LOCALSAMPLE_TEST_MODEL_DIR") or default_model_dir())


def real_model_dir() -> Path:
    """Where fetch_model.py put the model (LOCALSAMPLE_TEST_MODEL_DIR overrides)."""
    return REAL_MODEL_DIR


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module is imported: HOME and every localsample directory point into
    one temporary directory for the whole session, so that nothing a fixture or a child
    process does (whatever its scope) can reach the user's own files."""
    root = Path(tempfile.mkdtemp(prefix="localsample-tests-"))
    config.stash[SESSION_ROOT] = root
    home = root / "home"
    home.mkdir()
    os.environ["LOCALSAMPLE_TEST_HOME"] = str(home)
    os.environ["LOCALSAMPLE_TEST_MODEL_DIR"] = str(REAL_MODEL_DIR)
    os.environ["HOME"] = str(home)
    os.environ.pop("XDG_CONFIG_HOME", None)
    os.environ.pop("XDG_DATA_HOME", None)
    os.environ.pop("XDG_STATE_HOME", None)
    os.environ.pop("XDG_CACHE_HOME", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["PIP_NO_INDEX"] = "1"  # no test reaches the package index by accident
    os.environ["LOCALSAMPLE_MODEL_DIR"] = str(REAL_MODEL_DIR)
    for name in LOCALSAMPLE_DIRS:
        os.environ[name] = str(root / "session" / name.removeprefix("LOCALSAMPLE_").lower())


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(SESSION_ROOT, None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


REAL_MODEL_FIXTURES = {"model_dir", "engine"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for the real model (``model_dir``, ``engine``) is ``slow``; tests
    that only start processes carry the mark themselves."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def localsample_files_in(home: Path) -> list[Path]:
    """Files under ``home`` that localsample could have written (its config, data, state)."""
    return [p for p in home.rglob("*") if "localsample" in str(p.relative_to(home)).lower()]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    entry = load_catalog(None).get(DEFAULT_ID)
    path = real_model_dir() / entry.source
    if not path.is_file():
        pytest.fail(f"test model missing at {path}: run `python scripts/fetch_model.py` (scripts/test.sh does)")
    return real_model_dir()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads the developer's own config or catalog, or touches the network."""
    monkeypatch.setenv("LOCALSAMPLE_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("LOCALSAMPLE_CATALOG_PATH", str(tmp_path / "models.toml"))
    monkeypatch.setenv("LOCALSAMPLE_MODEL_DIR", str(real_model_dir()))
    monkeypatch.setenv("LOCALSAMPLE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("LOCALSAMPLE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def small_entry(**load: object) -> ModelEntry:
    """The default model's entry with a small context, to keep tests quick."""
    entry = load_catalog(None).get(DEFAULT_ID)
    settings = entry.load.model_dump() | {"n_ctx": TEST_N_CTX} | load
    return entry.model_copy(update={"load": LoadSettings(**settings)})


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> Iterator[Engine]:
    entry = small_entry()
    eng = Engine(entry, model_dir / entry.source)
    eng.load()
    yield eng
    eng.close()


# -- the fast tier: a generator that loads nothing -------------------------------------


class FakeGenerator:
    """A ``Generator`` that answers without a model, for policy/pool/routing/CLI tests.

    It "generates" the words of ``REPLY`` (one token per word, after a space), honouring
    maxTokens and stop sequences with the same ``StopMatcher`` as the engine, streaming
    each token to ``on_text``, and sleeping ``delay`` seconds per token so tests can catch
    a request in flight. Its ``size`` is its file's, so memory budgets behave as for real.
    Never use it to test generation behaviour itself.
    """

    REPLY = "one two three four five six seven eight nine ten " * 50
    delay = 0.0

    def __init__(self, model: ModelEntry, path: Path, slots: int) -> None:
        self.model = model
        self.model_id = model.id
        self.path = path
        self.slots = slots
        self.loads = 0
        self.requests: list[GenerationRequest] = []
        self._loaded = False
        self._slots = anyio.Semaphore(slots)
        self._running = 0

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def size(self) -> int:
        return files_size(self.path)

    @property
    def running(self) -> int:
        return self._running

    async def ensure_loaded(self) -> None:
        check_gguf_file(self.path, self.model_id)  # as the engine does before loading
        if not self._loaded:
            self.loads += 1
            self._loaded = True

    async def generate(
        self, request: GenerationRequest, on_text: OnText | None = None, *, queue_timeout: float | None = None
    ) -> Completion:
        await self.ensure_loaded()
        admitted = False
        with anyio.move_on_after(queue_timeout if queue_timeout is not None else math.inf):
            await self._slots.acquire()  # only the wait for a slot is bounded, as in the engine
            admitted = True
        if not admitted:
            raise BusyError(f"busy: waited {queue_timeout:g} s for a free slot of model '{self.model_id}'", "retry")
        self._running += 1
        try:
            return await self._generate(request, on_text)
        finally:
            self._running -= 1
            self._slots.release()

    async def _generate(self, request: GenerationRequest, on_text: OnText | None) -> Completion:
        self.requests.append(request)
        if request.offers_tools and request.tool_choice == "required":  # a call of the first tool
            call = ToolCall(f"call_fake{len(self.requests)}", request.tools[0].name, {})
            return Completion("", self.model_id, "toolUse", None, 1, 1, 0.0, 0.0, tool_calls=(call,))
        matcher = StopMatcher(request.stop)
        words = self.REPLY.split()
        prompt = " ".join(m.content for m in request.messages) + (request.system or "")
        parts: list[str] = []
        count = 0
        stop: str | None = None
        for word in words:
            await anyio.sleep(self.delay)
            count += 1
            text, stop = matcher.feed(word if count == 1 else " " + word)
            if text:
                parts.append(text)
                if on_text is not None:
                    await on_text(text, count)
            if stop is not None or count >= request.max_tokens:
                break
        if stop is None:
            tail = matcher.flush()
            parts.append(tail)
            if on_text is not None and tail:
                await on_text(tail, count)
        reason: StopReason = (
            "stopSequence" if stop is not None else "maxTokens" if count >= request.max_tokens else "endTurn"
        )
        return Completion(
            text="".join(parts),
            model=self.model_id,
            stop_reason=reason,
            stop_sequence=stop,
            prompt_tokens=len(prompt.split()),
            completion_tokens=count,
            time_to_first_token=0.0,
            duration=0.0,
        )

    async def reset_cache(self) -> None:
        pass

    def close(self) -> None:
        self._loaded = False


def fake_factory() -> GeneratorFactory:
    def make(model: ModelEntry, path: Path, slots: int) -> FakeGenerator:
        return FakeGenerator(model, path, slots)

    return make


def fake_runtime(settings: Settings, catalog_path: Path | None = None) -> Runtime:
    """A Runtime whose models are FakeGenerators (the packaged catalog by default)."""
    return Runtime(settings, load_catalog(catalog_path), factory=fake_factory())


@pytest.fixture(scope="session", autouse=True)
def home_stays_untouched() -> Iterator[None]:
    """After the whole run, the (empty, temporary) HOME holds no localsample state: every
    test, fixture and child process wrote only into its own temporary directories."""
    home = Path(os.environ["LOCALSAMPLE_TEST_HOME"])
    yield
    written = localsample_files_in(home)
    assert not written, f"tests wrote localsample state into HOME: {written[:5]}"
