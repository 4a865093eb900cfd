"""Images and audio in requests: checked when they arrive, decoded when a model reads them.

A request's image or audio comes as base64 with a declared type (MCP ``image``/``audio``
content, OpenAI ``image_url`` data URIs and ``input_audio``). ``image_of`` and
``audio_of`` decode the base64 and check that the bytes are what the type says (an image's
header is read by Pillow for its format and size; nothing is decoded yet), so a bad item
is refused with a -32602 that names the field. ``check_limits`` applies the settings'
byte and pixel limits (``max_media_bytes``, ``max_image_pixels``) where the request is
answered. ``rgb_pixels`` decodes an image for the engine (the first frame of a GIF).
"""

from __future__ import annotations

import base64
import binascii
import io
import mimetypes
import wave
from collections.abc import Sequence
from pathlib import Path

from localsample.errors import RequestError
from localsample.generation import Media

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
"""Image types accepted, and the format Pillow must find in the bytes."""

AUDIO_TYPES = {
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/vnd.wave": "wav",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
}
"""Audio types accepted (llama.cpp's multimodal library decodes WAV and MP3)."""


def decode_base64(data: str, where: str) -> bytes:
    """The bytes of a base64 string (line breaks allowed); RequestError names the field."""
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            f"{where}.data is not valid base64 ({exc})", "send the bytes base64-encoded (RFC 4648, no data: prefix)"
        ) from None
    if not raw:
        raise RequestError(f"{where}.data is empty", "send the image or audio bytes")
    return raw


def image_of(data: str, mime_type: str, where: str) -> Media:
    """An image from base64 ``data`` of ``mime_type``: its type checked against its bytes,
    its size read from its header."""
    mime = mime_type.strip().lower()
    expected = IMAGE_TYPES.get(mime)
    if expected is None:
        raise RequestError(
            f"{where}.mimeType {mime_type!r} is not an image type localsample reads",
            f"send one of {', '.join(sorted(set(IMAGE_TYPES) - {'image/jpg'}))}",
        )
    raw = decode_base64(data, where)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            found, (width, height) = image.format, image.size
    except Image.DecompressionBombError as exc:  # a header claiming billions of pixels
        raise RequestError(
            f"{where}.data declares an image too large to read ({exc})",
            "send a smaller image (max_image_pixels in the settings sets the limit)",
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RequestError(
            f"{where}.data is not a readable image ({len(raw)} bytes declared {mime}: {exc})",
            "send the image file's bytes, base64-encoded",
        ) from None
    if found == "MPO" and expected == "JPEG":  # a camera's JPEG with extra pictures: its first is a JPEG
        found = "JPEG"
    if found != expected:
        raise RequestError(
            f"{where} declares {mime} but its bytes are {found or 'of no known format'}",
            f"send mimeType image/{(found or 'png').lower()}, or convert the image to {mime}",
        )
    return Media("image", "image/jpeg" if mime == "image/jpg" else mime, raw, width=width, height=height)


def audio_of(data: str, mime_type: str, where: str) -> Media:
    """An audio clip from base64 ``data`` of ``mime_type`` (WAV or MP3), its type checked
    against its first bytes; a WAV's length is read from its header."""
    mime = mime_type.strip().lower()
    kind = AUDIO_TYPES.get(mime)
    if kind is None:
        raise RequestError(
            f"{where}.mimeType {mime_type!r} is not an audio type localsample reads",
            "send audio/wav or audio/mpeg (MP3)",
        )
    raw = decode_base64(data, where)
    seconds: float | None = None
    if kind == "wav":
        if not (raw[:4] == b"RIFF" and raw[8:12] == b"WAVE"):
            raise RequestError(f"{where} declares {mime} but its bytes are not a WAV file", "send a RIFF/WAVE file")
        try:
            with wave.open(io.BytesIO(raw)) as clip:
                seconds = clip.getnframes() / clip.getframerate()
        except (wave.Error, EOFError, ZeroDivisionError):
            seconds = None  # a float or compressed WAV: the engine's decoder reads more kinds than `wave`
    elif not (raw[:3] == b"ID3" or (len(raw) > 1 and raw[0] == 0xFF and raw[1] & 0xE0 == 0xE0)):
        raise RequestError(f"{where} declares {mime} but its bytes are not an MP3 file", "send an MP3 file")
    return Media("audio", "audio/mpeg" if kind == "mp3" else "audio/wav", raw, seconds=seconds)


def from_data_uri(url: str, where: str) -> Media:
    """An image from an OpenAI ``image_url``: only ``data:`` URIs (nothing is fetched)."""
    head, comma, data = url.partition(",")
    if not url.startswith("data:") or not comma or not head.endswith(";base64"):
        raise RequestError(
            f"{where}.url is not a base64 data: URI (localsample fetches nothing from the network)",
            "send the image inline: data:image/png;base64,...",
        )
    return image_of(data, head[len("data:") : -len(";base64")], where)


def medium_from_file(path: Path) -> Media:
    """An image or audio clip from a file, its type from its name (``sample --image``)."""
    mime = mimetypes.guess_type(path.name)[0] or ""
    try:
        data = base64.b64encode(path.expanduser().read_bytes()).decode("ascii")
    except OSError as exc:
        raise RequestError(f"cannot read {path}: {exc.strerror}", "check the path") from None
    if mime in IMAGE_TYPES:
        return image_of(data, mime, str(path))
    if mime in AUDIO_TYPES:
        return audio_of(data, mime, str(path))
    raise RequestError(
        f"{path}: {mime or 'an unknown type'} is neither an image nor audio localsample reads",
        "give a .png, .jpg, .webp, .gif, .wav or .mp3 file",
    )


def check_limits(media: Sequence[Media], max_bytes: int, max_pixels: int) -> None:
    """Every item within the settings' limits; RequestError with the numbers otherwise."""
    for index, medium in enumerate(media):
        if len(medium.data) > max_bytes:
            raise RequestError(
                f"{medium.kind} {index + 1} of the request has {len(medium.data):,} bytes; "
                f"at most {max_bytes:,} are accepted (max_media_bytes)",
                "send a smaller file, or raise max_media_bytes in the settings",
            )
        if medium.kind == "image" and medium.pixels > max_pixels:
            raise RequestError(
                f"image {index + 1} of the request is {medium.width}x{medium.height} = {medium.pixels:,} pixels; "
                f"at most {max_pixels:,} are accepted (max_image_pixels)",
                "send a smaller image, or raise max_image_pixels in the settings",
            )


def rgb_pixels(medium: Media) -> tuple[int, int, bytes]:
    """Width, height and RGB bytes of an image (a GIF's first frame, alpha dropped)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(medium.data)) as image:
            image.seek(0)
            rgb = image.convert("RGB")
            return rgb.width, rgb.height, rgb.tobytes()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # a corrupt file passes the header check
        raise RequestError(
            f"an image could not be decoded ({medium.describe()}): {exc}", "send the whole file"
        ) from None
