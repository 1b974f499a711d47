"""The first frame of an image-to-video request: `input_reference`, as OpenAI's Videos API calls it.

A multipart/form-data upload (the file under `input_reference`, the other fields as text), or
base64 in JSON (a data URL or the bare base64). Checked before it is decoded: its bytes (at most
MAX_IMAGE_BYTES), its format (PNG, JPEG or WebP, from the header), its size (at least 16 pixels a
side, within PIL's decompression-bomb limit: paradit.conditioning.check_image_size). Accepted
images are stored as lossless PNG under the state directory (inputs/NAME.png, a name of its own for
each job), which every rank of the job reads: they all get the same pixels, and a restart finds them.
The job store deletes the file when the job ends (paradit.serve.jobs).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
import secrets
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

from paradit.errors import ParameterError
from paradit.serve.schema import ApiError

MAX_IMAGE_BYTES = 8 * 2**20              # an image file; base64 makes it 4/3 as long in JSON
MAX_IMAGE_BODY = MAX_IMAGE_BYTES * 4 // 3 + 2**16   # a request that carries one: the image and the rest
FORMATS = ("PNG", "JPEG", "WEBP")
FIELD = "input_reference"
TEXT_FIELDS = ("prompt", "negative_prompt", "model", "size", "sampler", "seconds", "cache")


def refuse(message: str, status: int = 400) -> ApiError:
    return ApiError(status, f"{FIELD}: {message}", FIELD)


def decode_base64(text: str) -> bytes:
    """A data URL (data:image/png;base64,...) or bare base64 -> the file's bytes."""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise refuse("a data URL must be base64 (data:image/png;base64,...)")
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise refuse(f"over {MAX_IMAGE_BYTES} bytes once decoded; give a smaller image", 413)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise refuse(f"not valid base64 ({err}); send the image file base64-encoded, or as a multipart upload") \
            from None


def open_image(data: bytes):
    """The image's bytes -> a PIL RGB image, checked before it is decoded; ApiError naming the field."""
    from PIL import Image, UnidentifiedImageError

    from paradit.conditioning import check_image_size
    if len(data) > MAX_IMAGE_BYTES:
        raise refuse(f"{len(data)} bytes, over {MAX_IMAGE_BYTES}; give a smaller image", 413)
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise refuse(f"not a readable image ({type(err).__name__}); give a PNG, JPEG or WebP file") from None
    with img:
        if img.format not in FORMATS:
            raise refuse(f"a {img.format} image; give a PNG, JPEG or WebP file")
        try:
            check_image_size(img.width, img.height)   # from the header: a bomb is never decoded
        except ParameterError as err:
            raise refuse(f"{err.reason}; {err.fix}") from None
        try:
            return img.convert("RGB")
        except (OSError, Image.DecompressionBombError) as err:
            raise refuse(f"the image could not be decoded ({err})") from None


def store_image(image, state_dir: Path) -> str:
    """Write the image as PNG under state_dir/inputs, under a name of its own (one file per job, deleted
    when the job ends: two jobs never share one); its relative path."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    name = f"inputs/{secrets.token_hex(16)}.png"
    path = Path(state_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)                    # whole or absent, for every rank that reads it
    return name


def load_stored(state_dir: Path, name: str):
    """A stored first frame (PIL RGB), as each rank of the job reads it."""
    from PIL import Image
    with Image.open(Path(state_dir) / name) as img:
        return img.convert("RGB")


def multipart_fields(raw: bytes, content_type: str) -> dict:
    """A multipart/form-data body -> the request's fields: the upload as base64 under input_reference
    (paradit.serve.body.parse_body's form), JSON-typed values for the number and list fields ("4" -> 4, "[4, 3]")."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    if not message.is_multipart():
        raise ApiError(422, "the multipart body has no parts (send Content-Type: multipart/form-data with a "
                            "boundary)", "body")
    out = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        data = part.get_payload(decode=True) or b""
        if name == FIELD:
            out[name] = base64.b64encode(data).decode()
            continue
        text = data.decode("utf-8", errors="replace")
        if name in TEXT_FIELDS:
            out[name] = text
        else:
            try:
                out[name] = json.loads(text)
            except ValueError:
                out[name] = text     # pydantic names the field and its type
    return out
