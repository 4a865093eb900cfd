"""Message content in OpenAI's shape, both ways: text parts, ``image_url`` parts (data:
URIs only: nothing is fetched) and ``input_audio`` parts ⇄ a turn's text with a
``MEDIA_MARKER`` where each medium stands and its ``Media``.

``InvalidField`` (a request refused because of one field) lives here too, so that the
parsing of bodies (openai_map.py) and of content share it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from localsample.errors import RequestError
from localsample.generation import MEDIA_MARKER, ChatMessage, Media
from localsample.media import audio_of, from_data_uri

Content = str | list[dict[str, Any]] | None


class InvalidField(RequestError):
    """A request refused because of one field: ``param`` names it (None: the whole body)."""

    def __init__(self, param: str | None, problem: str, fix: str | None = None) -> None:
        self.param = param
        super().__init__(problem, fix)


@contextmanager
def field(param: str) -> Iterator[None]:
    """A RequestError raised inside (by the MCP path's checks) becomes an InvalidField."""
    try:
        yield
    except InvalidField:
        raise
    except RequestError as exc:
        raise InvalidField(param, exc.problem, exc.fix) from None


# -- reading ------------------------------------------------------------------------------


def text_of(content: Content, where: str, *, media_here: bool = False) -> str:
    """A message's text: a string, or its text parts joined (refusal parts are left out).
    ``media_here``: the message may hold media (a user message), which the caller reads."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = [text_part(part, f"{where}.content[{index}]", media_here) for index, part in enumerate(content)]
    return "".join(texts)


def text_part(part: dict[str, Any], at: str, media_here: bool) -> str:
    kind, text = part.get("type"), part.get("text")
    if kind == "text" and isinstance(text, str):
        return text
    if kind == "refusal":
        return ""
    where_media = "image_url and input_audio parts" if media_here else "images and audio: in user messages"
    raise InvalidField(
        at,
        f"{at} has {kind!r} content, which localsample does not read here",
        f'send text parts: {{"type": "text", "text": "..."}} ({where_media})',
    )


def user_content(content: Content, where: str) -> tuple[str, tuple[Media, ...]]:
    """A user message's text and its images (``image_url`` parts with data: URIs) and audio
    (``input_audio`` parts), each at a media marker in the text."""
    if not isinstance(content, list) or not any(p.get("type") in ("image_url", "input_audio") for p in content):
        return text_of(content, where, media_here=True), ()
    texts: list[str] = []
    media: list[Media] = []
    for index, part in enumerate(content):
        at = f"{where}.content[{index}]"
        with field(at):
            medium = medium_part(part, at)
        if medium is None:
            texts.append(text_part(part, at, True))
        else:
            media.append(medium)
            texts.append(MEDIA_MARKER)
    with field(where):
        if "".join(texts).count(MEDIA_MARKER) != len(media):
            raise RequestError(f"{where}: its text holds {MEDIA_MARKER}", f"leave the text {MEDIA_MARKER} out")
    return "".join(texts), tuple(media)


def medium_part(part: dict[str, Any], at: str) -> Media | None:
    """The image or audio clip of a content part (None: not a media part)."""
    kind = part.get("type")
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str):
            raise InvalidField(at, f"{at}.image_url.url must be a string", 'send {"url": "data:image/png;base64,..."}')
        return from_data_uri(url, f"{at}.image_url")
    if kind == "input_audio":
        audio = part.get("input_audio")
        data, fmt = (audio.get("data"), audio.get("format")) if isinstance(audio, dict) else (None, None)
        if not isinstance(data, str) or fmt not in ("wav", "mp3"):
            raise InvalidField(at, f"{at}.input_audio needs data (base64) and format wav or mp3", "send both")
        return audio_of(data, "audio/mpeg" if fmt == "mp3" else "audio/wav", f"{at}.input_audio")
    return None


# -- writing ------------------------------------------------------------------------------


def media_part(medium: Media) -> dict[str, Any]:
    """An image as an ``image_url`` part (a data: URI), an audio clip as ``input_audio``."""
    data = base64.b64encode(medium.data).decode("ascii")
    if medium.kind == "image":
        return {"type": "image_url", "image_url": {"url": f"data:{medium.mime_type};base64,{data}"}}
    return {
        "type": "input_audio",
        "input_audio": {"data": data, "format": "mp3" if medium.mime_type == "audio/mpeg" else "wav"},
    }


def content_body(message: ChatMessage) -> Content:
    """The turn's content: its text, or text and media parts in the order they were sent."""
    if not message.media:
        return message.content
    pieces = message.content.split(MEDIA_MARKER)
    parts: list[dict[str, Any]] = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
    for medium, text in zip(message.media, pieces[1:], strict=True):
        parts.append(media_part(medium))
        if text:
            parts.append({"type": "text", "text": text})
    return parts
