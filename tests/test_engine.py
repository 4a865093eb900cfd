"""The engine on the real SmolLM2-135M model: determinism, max tokens, stop sequences,
end of turn, cancellation, context overflow, bad files."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from localsample.engine import Engine
from localsample.errors import ContextOverflowError, ModelFileError, RequestError
from localsample.generation import ChatMessage, Completion, GenerationRequest, StopMatcher

from .conftest import TEST_N_CTX, small_entry

pytestmark = pytest.mark.anyio

STORY = [ChatMessage("user", "Write a long story about a lighthouse keeper and the sea.")]
HI = [ChatMessage("user", "Say hello in one short sentence.")]


def greedy(messages: list[ChatMessage] = STORY, max_tokens: int = 48, **kw: object) -> GenerationRequest:
    return GenerationRequest(messages=messages, max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_greedy_output_is_identical_across_runs_and_streams_whole(engine: Engine) -> None:
    pieces: list[str] = []

    async def collect(text: str, _tokens: int) -> None:
        pieces.append(text)

    first = await engine.generate(greedy(), collect)
    second = await engine.generate(greedy())
    assert first.text == second.text
    assert len(first.text) > 20
    assert "".join(pieces) == first.text  # streamed pieces add up to the result
    assert len(pieces) > 10  # and did arrive piece by piece


async def test_a_fully_cached_prompt_gives_the_fresh_greedy_output(engine: Engine) -> None:
    """Regression: re-evaluating only the last prompt token used other llama.cpp kernels
    and flipped this prompt's third token."""
    await engine.reset_cache()
    fresh = await engine.generate(greedy(HI, max_tokens=60))
    again = await engine.generate(greedy(HI, max_tokens=60))
    assert again.text == fresh.text


async def test_max_tokens_is_honoured_exactly(engine: Engine) -> None:
    for n in (1, 7, 33):
        result = await engine.generate(greedy(max_tokens=n))
        assert result.completion_tokens == n
        assert result.stop_reason == "maxTokens"
        assert result.stop_sequence is None


async def test_stop_sequence_cuts_output_and_is_reported(engine: Engine) -> None:
    full = await engine.generate(greedy())
    words = full.text.split()
    stop = " ".join(words[5:7])  # two words from the middle, possibly spanning tokens
    cut = await engine.generate(greedy(stop=["never-appears", stop]))
    assert cut.stop_reason == "stopSequence"
    assert cut.stop_sequence == stop
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


async def test_natural_end_reports_end_turn(engine: Engine) -> None:
    result = await engine.generate(greedy(HI, max_tokens=200))
    assert result.stop_reason == "endTurn"
    assert 0 < result.completion_tokens < 200
    assert result.prompt_tokens > 5
    assert 0 < result.time_to_first_token <= result.duration


async def test_cancellation_stops_within_a_token_and_model_stays_usable(engine: Engine) -> None:
    expected = await engine.generate(greedy(HI, max_tokens=200))
    seen: dict[str, int] = {}
    with anyio.CancelScope() as scope:

        async def cancel_after_five(_text: str, tokens: int) -> None:
            if tokens >= 5 and "at_cancel" not in seen:
                seen["at_cancel"] = engine.tokens_generated
                scope.cancel()

        await engine.generate(greedy(max_tokens=1000), cancel_after_five)
    assert scope.cancelled_caught
    # The worker may be a token or two ahead of the event loop; no more.
    assert engine.tokens_generated - seen["at_cancel"] <= 3
    after = await engine.generate(greedy(HI, max_tokens=200))
    assert after.text == expected.text


async def test_context_overflow_is_refused_with_the_numbers(engine: Engine) -> None:
    with pytest.raises(ContextOverflowError) as info:
        await engine.generate(greedy(max_tokens=TEST_N_CTX))
    err = info.value
    assert err.n_ctx == TEST_N_CTX and err.max_tokens == TEST_N_CTX and err.prompt_tokens > 0
    message = str(err)
    assert str(TEST_N_CTX) in message and str(err.prompt_tokens) in message
    assert f"at most {TEST_N_CTX - err.prompt_tokens}" in message


async def test_sampling_with_seed_is_repeatable(engine: Engine) -> None:
    request = GenerationRequest(messages=STORY, max_tokens=24, temperature=1.0, seed=1234)
    assert (await engine.generate(request)).text == (await engine.generate(request)).text


async def test_missing_file_names_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    engine = Engine(small_entry(), missing)
    with pytest.raises(ModelFileError) as info:
        await engine.generate(greedy())
    assert str(missing) in str(info.value) and "fix" in str(info.value)


async def test_corrupt_file_names_path_and_fix(tmp_path: Path, model_dir: Path) -> None:
    not_gguf = tmp_path / "bad.gguf"
    not_gguf.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        await Engine(small_entry(), not_gguf).generate(greedy())
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((model_dir / small_entry().source).read_bytes()[:4096])
    with pytest.raises(ModelFileError) as info:
        await Engine(small_entry(), truncated).generate(greedy())
    assert str(truncated) in str(info.value) and "download it again" in str(info.value)


def test_bad_requests_are_refused_before_generation() -> None:
    with pytest.raises(RequestError, match="maxTokens must be positive"):
        GenerationRequest(messages=HI, max_tokens=0)
    with pytest.raises(RequestError, match="no messages"):
        GenerationRequest(messages=[], max_tokens=5)


def test_decode_rate_excludes_the_first_token() -> None:
    done = Completion("x", "m", "maxTokens", None, 10, 11, time_to_first_token=1.0, duration=2.0)
    assert done.decode_tokens_per_second == 10.0


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "found"),
    [
        (["Hel", "lo ", "wor", "ld"], ["lo wo"], "Hel", "lo wo"),
        (["ab", "c"], ["x"], "abc", None),
        (["EN", "D", "!"], ["END"], "", "END"),
        (["a<", "b"], ["<|end|>"], "a<b", None),  # a partial match is held, then released
        (["xy", "z"], ["yz", "xyz"], "", "xyz"),  # the earliest occurrence wins
    ],
)
def test_stop_matcher(pieces: list[str], stops: list[str], emitted: str, found: str | None) -> None:
    matcher = StopMatcher(stops)
    out, hit = [], None
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            break
    if hit is None:
        out.append(matcher.flush())
    assert "".join(out) == emitted
    assert hit == found


def test_stop_matcher_never_emits_a_partial_match() -> None:
    matcher = StopMatcher(["</answer>"])
    assert matcher.feed("done </ans") == ("done ", None)
    assert matcher.feed("wer> tail") == ("", "</answer>")
