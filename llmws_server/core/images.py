"""Images a client sends: a data URL or bare base64, checked and decoded with Pillow.

The client sends the bytes. A server-side path or an http(s) URL is refused: the server reads no file and
fetches nothing on a client's word.
"""
import base64
import binascii
import io
import re
import warnings

from PIL import Image

from llmws_server.errors import Refused

FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP"}
DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


class ImageError(Refused):
    """An image that cannot be used; the message says why."""


def image_bytes(value, index: int, max_bytes: int) -> bytes:
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


def open_image(data: bytes, index: int, max_pixels: int) -> Image.Image:
    """Decode to RGB, refusing what is not an image of a known format and what would decode too big (a
    decompression bomb: the size is read from the header before any pixel is)."""
    where = f"images[{index}]"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise ImageError(f"{where}: {image.format} images are not supported "
                                 f"(send {', '.join(sorted(FORMATS))})")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{where} is {width}x{height}: over limits.max_image_pixels ({max_pixels})")
            image.load()
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{where} is not an image Pillow can read ({exc})") from None
    return image.convert("RGB")


def decode_images(values: list, limits: dict) -> list[Image.Image]:
    """Every image of a request, in order, or ImageError for the first that cannot be used."""
    if len(values) > limits["max_images_per_request"]:
        raise ImageError(f"{len(values)} images: at most {limits['max_images_per_request']} a request "
                         "(limits.max_images_per_request)")
    return [open_image(image_bytes(value, index, limits["max_image_bytes"]), index, limits["max_image_pixels"])
            for index, value in enumerate(values)]
