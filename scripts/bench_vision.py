"""Images on a local model: what the caches save, and what an image request costs its neighbours.

    python scripts/bench_vision.py [--rounds R] [--model MODEL.gguf --mmproj MMPROJ.gguf]

Without --model: the default model (SmolLM2-135M) with a synthetic projector shaped like a
small real one (224 px, 14 px patches: 256 image tokens; a 6-block ViT of width 384, random
weights: its encode costs what such an encoder costs, its text means nothing).

a. Time to first token of a request with one image (greedy, 1 token), median of R rounds:
   - cold: an image never seen before (the projector already loaded);
   - cached: a second question about the same image (the prefix cache holds the image);
   - other conversation: the same image after another system prompt (its embeddings come
     from the cache; the tokens are evaluated again);
   peer: llama-cpp-python's own ``MTMDChatHandler`` (``Llama.create_chat_completion``) on
   the same model and projector, a new image and then the same image again (it clears the
   KV cache on every call). Target: cached <= 0.25 x cold.
b. Decode tokens/s of a 128-token text request: alone; with an image request (a new image,
   8 tokens generated) admitted beside it after 32 tokens; with a text request whose prompt
   has as many tokens admitted the same way (the peer: what evaluating that many prompt
   tokens costs the request beside it). Target: beside an image >= 0.9 x alone.

--small uses the tests' projector instead (32 px: 16 image tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localsample.catalog import load_catalog, resolve_model_path
from localsample.engine import Engine
from localsample.generation import MEDIA_MARKER, ChatMessage, GenerationRequest, Media
from localsample.media import image_of
from localsample.settings import load_settings
from tests.mmproj_fixture import b64, image_bytes, write_projector

QUESTION = "Describe this picture in detail."


def picture(index: int) -> Media:
    color = ((index * 53) % 256, (index * 97) % 256, (index * 151) % 256)
    return image_of(b64(image_bytes(320, 240, color)), "image/png", "bench")


def asking(medium: Media, question: str = QUESTION, system: str | None = None, tokens: int = 1) -> GenerationRequest:
    turn = ChatMessage("user", MEDIA_MARKER + question, media=(medium,))
    return GenerationRequest([turn], max_tokens=tokens, temperature=0.0, system=system)


async def ttft(engine: Engine, rounds: int) -> dict[str, float]:
    await engine.generate(asking(picture(999)))  # loads the projector
    times: dict[str, list[float]] = {"cold": [], "cached": [], "other conversation": []}
    for index in range(rounds):
        medium = picture(index)
        times["cold"].append((await engine.generate(asking(medium))).time_to_first_token)
        again = asking(medium, "What colours does it have?")
        times["cached"].append((await engine.generate(again)).time_to_first_token)
        other = asking(medium, system=f"You are assistant number {index}.")
        times["other conversation"].append((await engine.generate(other)).time_to_first_token)
    return {name: statistics.median(values) for name, values in times.items()}


def peer_ttft(model: Path, mmproj: Path, rounds: int) -> tuple[float, float]:
    """llama-cpp-python's MTMDChatHandler: a new image, then the same image again."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    class TextContent(MTMDChatHandler):
        """Content parts joined into one string (the marker where the image was), for
        templates that take only text content (SmolLM2's), as llama-server does."""

        @classmethod
        def _convert_message_for_template(cls, message: Any, media_marker: str) -> dict[str, Any]:
            converted: dict[str, Any] = super()._convert_message_for_template(message, media_marker)
            if isinstance(converted.get("content"), list):
                converted["content"] = "".join(part.get("text", "") for part in converted["content"])
            return converted

    llama = Llama(model_path=str(model), chat_handler=TextContent(str(mmproj)), n_ctx=4096, verbose=False)

    def first_token(medium: Media, question: str) -> float:
        url = f"data:{medium.mime_type};base64,{b64(medium.data)}"
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        started = time.perf_counter()
        for _chunk in llama.create_chat_completion(
            messages=[{"role": "user", "content": content}],  # type: ignore[list-item, misc]
            max_tokens=1,
            temperature=0.0,
            stream=True,
        ):
            break
        return time.perf_counter() - started

    first_token(picture(998), QUESTION)
    cold, again = [], []
    for index in range(rounds):
        medium = picture(500 + index)
        cold.append(first_token(medium, QUESTION))
        again.append(first_token(medium, "What colours does it have?"))
    llama.close()
    return statistics.median(cold), statistics.median(again)


async def decode_rate(engine: Engine, beside: GenerationRequest | None) -> tuple[float, int]:
    """A 128-token text request's decode tok/s, with ``beside`` admitted after its 32nd
    token; and the prompt tokens of ``beside``."""
    text = GenerationRequest([ChatMessage("user", "Write a long story about a lighthouse.")], 128, temperature=0.0)
    await engine.reset_cache()
    counted = asyncio.Event()

    async def on_text(_text: str, tokens: int) -> None:
        if tokens >= 32:
            counted.set()

    main = asyncio.create_task(engine.generate(text, on_text))
    prompt = 0
    if beside is not None:
        await counted.wait()
        prompt = (await engine.generate(beside)).prompt_tokens
    return (await main).decode_tokens_per_second, prompt


async def rates(engine: Engine, rounds: int) -> dict[str, tuple[float, int]]:
    """Median decode tok/s alone, beside an image request (a new image each round), and
    beside a text request with a prompt as long in tokens (8 tokens generated by each)."""
    probe = await engine.generate(asking(picture(3000), tokens=8))
    words = "apple " * max(probe.prompt_tokens - 12, 1)  # about one token a word, plus the template's
    found: dict[str, list[tuple[float, int]]] = {"alone": [], "text": [], "image": []}
    for index in range(rounds):
        found["alone"].append(await decode_rate(engine, None))
        long_text = GenerationRequest([ChatMessage("user", f"{words}{index}")], 8, temperature=0.0)
        found["text"].append(await decode_rate(engine, long_text))
        found["image"].append(await decode_rate(engine, asking(picture(2000 + index), tokens=8)))
    return {
        name: (statistics.median(r for r, _ in values), max(p for _, p in values)) for name, values in found.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", type=Path, help="a vision model's GGUF (default: SmolLM2 + a synthetic projector)")
    parser.add_argument("--mmproj", type=Path, help="its projector")
    parser.add_argument("--small", action="store_true", help="the tests' projector: 16 image tokens")
    args = parser.parse_args()
    settings = load_settings()
    entry = load_catalog(None).get("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or resolve_model_path(entry, settings.model_dir)
        small = write_projector(Path(scratch) / "mmproj-small.gguf") if args.small else None
        mmproj = (
            args.mmproj
            or small
            or write_projector(
                Path(scratch) / "mmproj-bench.gguf",
                image_size=224,
                patch_size=14,
                hidden_size=384,
                n_layer=6,
                n_head=6,
                n_ff=1536,
                projector_hidden=1024,
            )
        )
        load = entry.load.model_copy(update={"n_ctx": 4096})
        vision = entry.model_copy(update={"mmproj": str(mmproj), "capabilities": ["chat", "vision"], "load": load})
        engine = Engine(vision, model, slots=4)
        try:
            first = asyncio.run(ttft(engine, args.rounds))
            rate = asyncio.run(rates(engine, args.rounds))
        finally:
            engine.close()
        peer_cold, peer_again = peer_ttft(model, mmproj, args.rounds)
    cold = first["cold"]
    print(f"\nmodel {model.name}, projector {mmproj.name}, {args.rounds} rounds (medians)")
    print("\na. time to first token, one image        localsample      llama-cpp-python MTMDChatHandler")
    print(f"   a new image                           {cold * 1e3:8.1f} ms      {peer_cold * 1e3:8.1f} ms")
    for name in ("cached", "other conversation"):
        value = first[name]
        label = "the same image, a second question" if name == "cached" else "the same image, another conversation"
        peer = f"{peer_again * 1e3:8.1f} ms ({peer_again / peer_cold:.2f}x)" if name == "cached" else "   -"
        print(f"   {label:37} {value * 1e3:8.1f} ms ({value / cold:.2f}x)   {peer}")
    print("   target: a second question <= 0.25x a new image")
    alone = rate["alone"][0]
    print("\nb. decode tok/s of a 128-token text request (what the request admitted beside it costs)")
    print(f"   alone                                                  {alone:8.1f}")
    for name, what in (("image", "an image request"), ("text", "a text request, as many prompt tokens")):
        value, prompt = rate[name]
        print(f"   {what + f' ({prompt} tokens)':54} {value:8.1f} ({value / alone:.2f}x)")
    print("   target: beside an image >= 0.9x alone; beside the text request: what its tokens cost")


if __name__ == "__main__":
    main()
