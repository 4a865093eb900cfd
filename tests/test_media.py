"""Images and audio in requests, without a model: checking the bytes, limits, routing to a
model that reads them, what approval and the audit trail show, the OpenAI wire form, and
catalog entries marked from their projector. Generation with media is in test_vision.py."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, types

from localsample import Runtime
from localsample.catalog import load_catalog
from localsample.errors import INVALID_PARAMS, RequestError
from localsample.generation import MEDIA_MARKER, ChatMessage, GenerationRequest, Media
from localsample.gguf_file import read_gguf
from localsample.manage import import_model
from localsample.media import audio_of, check_limits, from_data_uri, image_of
from localsample.openai_map import parse_chat, to_generation_request
from localsample.openai_request import chat_body
from localsample.policy import Pending, edited
from localsample.sampling import SamplingHandler
from localsample.sampling_map import to_generation_request as from_sampling
from localsample.selection import Needs, Preferences
from localsample.settings import Settings

from .conftest import FakeGenerator, fake_runtime, real_model_dir
from .mmproj_fixture import b64, image_bytes, wav_bytes, write_audio_projector, write_projector
from .servers.sampling_server import server

PNG = image_bytes()


def vision_catalog(tmp_path: Path, *, mmproj: bool = True) -> Path:
    """The tests' catalog plus a vision entry (the default model's file, a synthetic projector)."""
    projector = write_projector(tmp_path / "mmproj-test.gguf")
    catalog = tmp_path / "vision.toml"
    catalog.write_text(
        (Path(__file__).parent / "catalog.toml").read_text()
        + '\n[[models]]\nid = "smolvision"\nsource = "SmolLM2-135M-Instruct.Q4_1.gguf"\n'
        + (f'mmproj = "{projector}"\n' if mmproj else "")
        + 'capabilities = ["chat", "vision"]\n'
    )
    return catalog


def runtime(tmp_path: Path, catalog: Path | None = None, **settings: Any) -> Runtime:
    catalog = catalog or Path(__file__).parent / "catalog.toml"
    base = Settings(model_dir=real_model_dir(), catalog_path=catalog, log_dir=tmp_path / "logs", **settings)
    return fake_runtime(base, catalog)


def image_request(data: bytes = PNG, text: str = "What is in ") -> GenerationRequest:
    medium = image_of(b64(data), "image/png", "x")
    return GenerationRequest([ChatMessage("user", f"{text}{MEDIA_MARKER}?", media=(medium,))], max_tokens=4)


# -- the bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")]
)
def test_each_image_type_is_read_with_its_size(kind: str, mime: str) -> None:
    medium = image_of(b64(image_bytes(40, 30, kind=kind)), mime, "params.messages[0].content")
    assert (medium.kind, medium.mime_type, medium.width, medium.height) == ("image", mime, 40, 30)
    assert medium.describe().startswith(f"{mime} 40x30, ")
    assert image_of(b64(image_bytes(kind="JPEG")), "image/jpg", "x").mime_type == "image/jpeg"


@pytest.mark.parametrize(
    ("data", "mime", "expected"),
    [
        ("not base64!", "image/png", "m.data is not valid base64"),
        ("", "image/png", "m.data is empty"),
        (b64(b"hello, not an image"), "image/png", "m.data is not a readable image (19 bytes declared image/png"),
        (b64(image_bytes(kind="JPEG")), "image/png", "m declares image/png but its bytes are JPEG"),
        (b64(PNG), "image/bmp", "m.mimeType 'image/bmp' is not an image type localsample reads"),
    ],
)
def test_bad_images_are_refused_naming_the_field(data: str, mime: str, expected: str) -> None:
    with pytest.raises(RequestError) as refused:
        image_of(data, mime, "m")
    assert expected in str(refused.value) and refused.value.fix


def test_audio_is_checked_against_its_type() -> None:
    clip = audio_of(b64(wav_bytes(1.5)), "audio/wav", "m")
    assert (clip.kind, clip.mime_type, clip.seconds) == ("audio", "audio/wav", 1.5)
    assert clip.describe().startswith("audio/wav 1.5 s, ")
    assert audio_of(b64(b"ID3\x04\x00" + b"\x00" * 64), "audio/mpeg", "m").mime_type == "audio/mpeg"
    with pytest.raises(RequestError, match="declares audio/wav but its bytes are not a WAV file"):
        audio_of(b64(PNG), "audio/wav", "m")
    with pytest.raises(RequestError, match="declares audio/mp3 but its bytes are not an MP3 file"):
        audio_of(b64(PNG), "audio/mp3", "m")
    with pytest.raises(RequestError, match="'audio/ogg' is not an audio type"):
        audio_of(b64(PNG), "audio/ogg", "m")


def test_limits_give_the_numbers_and_the_setting() -> None:
    medium = image_of(b64(image_bytes(100, 50)), "image/png", "m")
    check_limits([medium], max_bytes=len(medium.data), max_pixels=5000)
    with pytest.raises(RequestError, match=r"image 1 of the request is 100x50 = 5,000 pixels; at most 4,999"):
        check_limits([medium], max_bytes=10**9, max_pixels=4999)
    with pytest.raises(RequestError, match=r"has [\d,]+ bytes; at most 10 are accepted \(max_media_bytes\)"):
        check_limits([medium], max_bytes=10, max_pixels=10**9)


def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG that claims ``width`` x ``height`` (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_a_header_claiming_a_huge_image_is_refused_not_read() -> None:
    with pytest.raises(RequestError, match="declares an image too large to read") as refused:
        image_of(b64(png_header(20000, 20000)), "image/png", "m")
    assert "max_image_pixels" in str(refused.value)
    claimed = image_of(b64(png_header(8000, 5000)), "image/png", "m")  # read from its header only
    with pytest.raises(RequestError, match="8000x5000 = 40,000,000 pixels"):
        check_limits([claimed], max_bytes=10**9, max_pixels=33_554_432)


def test_a_camera_jpeg_with_extra_pictures_is_a_jpeg() -> None:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(out, "MPO", save_all=True, append_images=[Image.new("RGB", (30, 20))])
    assert image_of(b64(out.getvalue()), "image/jpeg", "m").width == 30


def test_data_uris_only() -> None:
    assert from_data_uri(f"data:image/png;base64,{b64(PNG)}", "u").width == 64
    with pytest.raises(RequestError, match="not a base64 data: URI"):
        from_data_uri("https://example.com/cat.png", "u")


# -- MCP requests -------------------------------------------------------------------------


def params(*blocks: Any, role: str = "user") -> types.CreateMessageRequestParams:
    message = types.SamplingMessage(role=role, content=list(blocks))
    return types.CreateMessageRequestParams(messages=[message], max_tokens=5)


def test_images_in_a_content_list_stand_where_they_were_sent() -> None:
    image = types.ImageContent(type="image", data=b64(PNG), mime_type="image/png")
    audio = types.AudioContent(type="audio", data=b64(wav_bytes()), mime_type="audio/wav")
    request = from_sampling(
        params(
            types.TextContent(type="text", text="Compare "), image, types.TextContent(type="text", text=" and "), audio
        )
    )
    [turn] = request.messages
    assert turn.content == f"Compare {MEDIA_MARKER} and {MEDIA_MARKER}"
    assert [m.kind for m in turn.media] == ["image", "audio"] and turn.text == "Compare  and "
    assert turn.shown().startswith("Compare [image image/png 64x48, ") and "[audio audio/wav 1.0 s, " in turn.shown()
    with pytest.raises(RequestError, match=r"params.messages\[0\].content: image content is read in user messages"):
        from_sampling(params(image, role="assistant"))
    with pytest.raises(RequestError, match="its text holds <__media__>"):
        from_sampling(params(types.TextContent(type="text", text=f"a {MEDIA_MARKER}"), image))


async def push(rt: Runtime, **arguments: Any) -> dict[str, Any]:
    async with Client(server, sampling_callback=SamplingHandler(rt, server="test"), mode="legacy") as client:
        result = await client.call_tool("push", {"max_tokens": 4, **arguments})
    return json.loads(result.content[0].text)  # type: ignore[no-any-return, union-attr]


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "logs" / "audit.jsonl").read_text().splitlines()]


@pytest.mark.anyio
async def test_an_image_no_model_can_read_is_invalid_params_saying_how_to_add_one(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    report = await push(rt, image_data=b64(PNG))
    message = report["error"]["message"]
    assert report["error"]["code"] == INVALID_PARAMS and "it needs vision" in message
    assert "smollm2-135m-instruct: no vision capability" in message and "localsample models pull ORG/REPO" in message
    [line] = audit(tmp_path)
    assert line["decision"] == "error" and line["media"][0].startswith("image image/png 64x48, ")
    assert (await push(rt))["result"]["content"]["type"] == "text"  # and the next request is served


@pytest.mark.anyio
async def test_an_image_goes_to_the_model_with_vision_and_a_projector(tmp_path: Path) -> None:
    rt = runtime(tmp_path, vision_catalog(tmp_path), audit_text=True)
    report = await push(rt, image_data=b64(PNG), text="Describe this: ")
    assert report["result"]["model"] == "smolvision"
    generator = rt.pool.generator(rt.catalog.get("smolvision"))
    assert isinstance(generator, FakeGenerator)
    [medium] = generator.requests[-1].media
    assert (medium.width, medium.height, medium.data) == (64, 48, PNG)
    [line] = audit(tmp_path)
    assert line["media"] == [f"image image/png 64x48, {len(PNG) / 1024:.1f} KB"]
    assert line["messages"][0][1].startswith("Describe this: [image image/png 64x48")
    assert b64(PNG)[:40] not in json.dumps(line)  # never the bytes, even with audit_text


@pytest.mark.anyio
async def test_bad_image_data_and_limits_are_invalid_params_and_the_server_goes_on(tmp_path: Path) -> None:
    rt = runtime(tmp_path, vision_catalog(tmp_path), max_image_pixels=1000)
    bad = await push(rt, image_data="%%%")
    assert bad["error"]["code"] == INVALID_PARAMS and "content[1].data is not valid base64" in bad["error"]["message"]
    wrong = await push(rt, image_data=b64(image_bytes(kind="JPEG")))
    assert "declares image/png but its bytes are JPEG" in wrong["error"]["message"]
    big = await push(rt, image_data=b64(PNG))
    assert "64x48 = 3,072 pixels; at most 1,000 are accepted (max_image_pixels)" in big["error"]["message"]
    assert [line["decision"] for line in audit(tmp_path)] == ["error", "error", "error"]
    assert (await push(rt))["result"]["content"]["type"] == "text"


def test_a_vision_entry_without_a_projector_cannot_serve_and_says_why(tmp_path: Path) -> None:
    rt = runtime(tmp_path, vision_catalog(tmp_path, mmproj=False))
    with pytest.raises(RequestError, match=r"smolvision: vision capability but no projector \(set mmproj"):
        rt.select(needs=Needs(frozenset({"vision"})), prefs=Preferences(), server="s")


# -- what a person and the wire see --------------------------------------------------------


def test_approval_shows_an_image_is_attached_and_an_edit_keeps_it() -> None:
    request = image_request()
    summary = Pending("s", "smolvision", "why", request).summary()
    assert f"user: What is in [image image/png 64x48, {len(PNG) / 1024:.1f} KB]?" in summary
    changed = edited(request, "And now?", None, None)
    assert changed.messages[-1].content == f"{MEDIA_MARKER}And now?" and changed.media == request.media


def test_media_cross_the_openai_wire_unchanged() -> None:
    request = image_request(text="Look: ")
    body = chat_body(request, "smolvision")
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    back = to_generation_request(parse_chat(json.dumps(body).encode()))
    assert back.messages == request.messages
    assert [m.digest for m in back.media] == [m.digest for m in request.media]
    wav = audio_of(b64(wav_bytes()), "audio/wav", "a")
    mp3 = audio_of(b64(b"ID3\x04\x00" + b"\x00" * 64), "audio/mpeg", "a")
    audio = GenerationRequest([ChatMessage("user", MEDIA_MARKER * 2, media=(wav, mp3))], max_tokens=3)
    body = chat_body(audio, "m")
    assert [p["input_audio"]["format"] for p in body["messages"][0]["content"]] == ["wav", "mp3"]  # OpenAI's names
    again = to_generation_request(parse_chat(json.dumps(body).encode()))
    assert again.media == [wav, mp3]
    bad = json.loads(json.dumps(body))
    bad["messages"][0]["content"].append({"type": "video", "video": {}})
    with pytest.raises(RequestError, match=r"messages\[0\]\.content\[2\] has 'video' content"):
        to_generation_request(parse_chat(json.dumps(bad).encode()))


def test_a_message_whose_marker_count_differs_from_its_media_is_refused() -> None:
    medium = image_request().media[0]
    with pytest.raises(RequestError, match="holds 0 media markers"):
        ChatMessage("user", "no marker", media=(medium,))
    assert ChatMessage("user", f"text alone may say {MEDIA_MARKER}").text.endswith(MEDIA_MARKER)


# -- catalog entries from their projector --------------------------------------------------


@pytest.mark.parametrize(("write", "reads"), [(write_projector, ("vision",)), (write_audio_projector, ("audio",))])
def test_import_marks_what_the_projector_reads(tmp_path: Path, write: Any, reads: tuple[str, ...]) -> None:
    projector = write(tmp_path / "mmproj-x.gguf")
    assert read_gguf(projector).projector_reads == reads
    rt = Runtime(Settings(catalog_path=tmp_path / "models.toml", model_dir=tmp_path / "store", log_dir=tmp_path))
    model_id, _ = import_model(
        rt, real_model_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf", new_id="mine", copy=False, mmproj=projector
    )
    entry = load_catalog(tmp_path / "models.toml").get(model_id)
    assert entry.capabilities == ["chat", *reads] and entry.mmproj == str(projector)


def test_media_are_data_with_an_identity() -> None:
    one, two = Media("image", "image/png", b"a"), Media("image", "image/png", b"a")
    assert one.digest == two.digest == "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
    assert "data" not in repr(one)
