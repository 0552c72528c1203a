"""Images a client sends: a data URL or bare base64, checked from their headers with Pillow when the
request comes, decoded when it starts.

The client sends the bytes. A server-side path or an http(s) URL is refused: the server reads no file and
fetches nothing on a client's word.
"""
import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image

from llmws_server.errors import Refused

FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP"}
DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


class ImageError(Refused):
    """An image that cannot be used; the message says why."""


def image_bytes(value: object, index: int, max_bytes: int) -> bytes:
    """The bytes of one image as sent; ImageError names it (images[index]) and the problem."""
    where = f"images[{index}]"
    if not isinstance(value, str) or not value:
        raise ImageError(f"{where} must be a data URL (data:image/png;base64,...) or base64 text")
    if value.lower().startswith(("http://", "https://", "file:", "/", "./", "../", "~")):
        raise ImageError(f"{where}: send the image's bytes as a data URL or base64; the server fetches no URL "
                         "and reads no file")
    encoded = DATA_URL.sub("", value, count=1)
    if value.startswith("data:") and encoded is value:
        raise ImageError(f"{where}: a data URL must be data:image/<format>;base64,<data>")
    if len(encoded) * 3 // 4 > max_bytes + 3:
        raise ImageError(f"{where} is over limits.max_image_bytes ({max_bytes} bytes)")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where} is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageError(f"{where} is over limits.max_image_bytes ({max_bytes} bytes)")
    return data


@dataclass(frozen=True)
class CheckedImage:
    """An image whose header passed the limits, kept compressed while its request waits (the frame limit
    bounds those bytes); decoded when the request starts (`decoded`)."""
    data: bytes
    index: int
    pixels: int


def checked_image(data: bytes, index: int, max_pixels: int) -> CheckedImage:
    """The header alone read: a known format, and a size within max_pixels (a decompression bomb is
    refused before any pixel is decoded)."""
    where = f"images[{index}]"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                kind, (width, height) = image.format, image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{where} is not an image Pillow can read ({exc})") from None
    if kind not in FORMATS:
        raise ImageError(f"{where}: {kind} images are not supported (send {', '.join(sorted(FORMATS))})")
    if width * height > max_pixels:
        raise ImageError(f"{where} is {width}x{height}: over limits.max_image_pixels ({max_pixels})")
    return CheckedImage(data, index, width * height)


def check_images(values: list, limits: dict) -> list[CheckedImage]:
    """Every image of a request, in order, or ImageError for the first that cannot be used, or for
    images whose pixels together are over limits.max_request_pixels."""
    if len(values) > limits["max_images_per_request"]:
        raise ImageError(f"{len(values)} images: at most {limits['max_images_per_request']} a request "
                         "(limits.max_images_per_request)")
    images = [checked_image(image_bytes(value, index, limits["max_image_bytes"]), index, limits["max_image_pixels"])
              for index, value in enumerate(values)]
    total, most = sum(image.pixels for image in images), limits["max_request_pixels"]
    if total > most:
        raise ImageError(f"{len(images)} images of {total} pixels in all: over limits.max_request_pixels ({most})")
    return images


def open_image(image: CheckedImage) -> Image.Image:
    """Decode to RGB; ImageError for data its header promised but its body does not hold."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(image.data))
            opened.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"images[{image.index}] is not an image Pillow can read ({exc})") from None
    return opened.convert("RGB")


def decoded(turns: list[dict]) -> list[dict]:
    """The turns with their checked images decoded, for the engine, as their request starts (copies: the
    request keeps the compressed bytes, and the pixels go when the engine is done with them)."""
    return [{**turn, "images": [open_image(image) for image in turn["images"]]} if turn.get("images") else turn
            for turn in turns]
