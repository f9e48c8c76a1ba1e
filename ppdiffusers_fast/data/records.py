"""One training record (caption + encoded image) and the safe parsing of its parts.

Every function here either returns a clean value or raises :class:`BadRecordError` with the reason
and the record's location; nothing is evaluated as code (captions go through ``json.loads`` and
then ``ast.literal_eval``, never ``eval``).
"""
import ast
import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass

from PIL import Image

from .bad_records import (BAD_CAPTION, IMAGE_TOO_SMALL, NON_UTF8_CAPTION, UNDECODABLE_IMAGE,
                          BadRecordError)

MAX_CAPTION_FIELD_BYTES = 1 << 20  # a caption field longer than 1 MiB is refused, not parsed


@dataclass
class RawRecord:
    """A record as read from disk, before decoding the image.

    Attributes:
        where: location, e.g. ``"part-0.txt:12"`` (file:line) or ``"00001.tar:000010012"`` (shard:key).
        caption: the caption text (already UTF-8 decoded and unwrapped from any dict).
        image_bytes: the encoded image file (JPEG, PNG, WebP, ...).
    """

    where: str
    caption: str
    image_bytes: bytes


def decode_utf8(raw, where):
    """``bytes`` -> ``str``; raises ``non_utf8_caption`` for invalid UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecordError(NON_UTF8_CAPTION, where, error) from None


def parse_caption_field(text, where, caption_key="caption"):
    """Extract the caption from a field holding a dict literal, a JSON object, or plain text.

    ``{'caption': 'a dog', 'url': ...}`` (Python literal) and ``{"caption": "a dog"}`` (JSON) both
    give ``"a dog"``; a JSON/Python string literal gives that string; text that starts with neither
    ``{`` nor a quote is taken as the caption itself.

    Raises:
        BadRecordError(bad_caption): unparsable literal, a dict without ``caption_key``, a caption
            that is not a string, or an empty caption.
    """
    if len(text) > MAX_CAPTION_FIELD_BYTES:
        raise BadRecordError(BAD_CAPTION, where, f"caption field of {len(text)} characters is too long")
    stripped = text.strip()
    if stripped[:1] in ("{", "'", '"'):
        value = _parse_literal(stripped, where)
    else:
        value = stripped
    if isinstance(value, dict):
        if caption_key not in value:
            raise BadRecordError(BAD_CAPTION, where, f"no {caption_key!r} key in caption dict "
                                                     f"(keys: {sorted(map(str, value))[:8]})")
        value = value[caption_key]
    if not isinstance(value, str):
        raise BadRecordError(BAD_CAPTION, where, f"caption is a {type(value).__name__}, not a string")
    value = value.strip()
    if not value:
        raise BadRecordError(BAD_CAPTION, where, "empty caption")
    return value


def _parse_literal(text, where):
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
        raise BadRecordError(BAD_CAPTION, where, f"unparsable caption field: {error}") from None


def decode_base64(field, where):
    """Base64 text (``str`` or ``bytes``) -> bytes; raises ``undecodable_image`` on bad input."""
    try:
        return base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadRecordError(UNDECODABLE_IMAGE, where, f"invalid base64: {error}") from None


def decode_image(image_bytes, where, min_width=0, min_height=0):
    """Encoded image -> fully decoded RGB ``PIL.Image``.

    The whole image is decoded here (``Image.load``), so a truncated file fails now, inside the
    reader, and not later in a transform.

    Raises:
        BadRecordError(undecodable_image): empty, truncated, unknown format, or a decompression bomb.
        BadRecordError(image_too_small): width < ``min_width`` or height < ``min_height``.
    """
    if not image_bytes:
        raise BadRecordError(UNDECODABLE_IMAGE, where, "empty image data")
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            rgb = image.convert("RGB")
    except Exception as error:  # decoders raise OSError, ValueError, SyntaxError, zlib/struct errors...
        raise BadRecordError(UNDECODABLE_IMAGE, where, f"{type(error).__name__}: {error}") from None
    if rgb.width < min_width or rgb.height < min_height:
        raise BadRecordError(IMAGE_TOO_SMALL, where,
                             f"{rgb.width}x{rgb.height} is below the minimum {min_width}x{min_height}")
    return rgb
