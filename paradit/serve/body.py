"""The body of POST /v1/videos as it is read: UTF-8 JSON with numbers of sane length (400 naming the
field otherwise), then the request model's fields and types (pydantic; 422 naming each field and
what would be valid). The model and its checks against the served model are paradit.serve.schema's."""
from __future__ import annotations

import json

from pydantic import ValidationError

from paradit.serve.schema import FIELDS, HINTS, MAX_DIGITS, ApiError, LoraItem, VideoRequest


class LongNumber:
    """An integer of more than MAX_DIGITS digits in the body: refused naming its field, never converted
    (Python refuses to convert more than 4300 digits, and a number that long is no value of ours)."""

    def __init__(self, digits: str):
        self.digits = len(digits.lstrip("-"))


def parse_body(raw: bytes, content_type: str) -> VideoRequest:
    """The body of POST /v1/videos: UTF-8 JSON (RFC 8259) with numbers of sane length, then the
    request model's fields and types; ApiError (422, or 400 for a number too long) naming the field."""
    if content_type and "json" not in content_type:
        raise ApiError(422, f"the body must be JSON, sent with the header Content-Type: application/json "
                            f"(this request said {content_type!r})", "body")
    try:
        data = json.loads(raw.decode("utf-8"), parse_int=lambda s: int(s) if len(s) <= MAX_DIGITS else LongNumber(s))
    except UnicodeDecodeError as err:
        raise ApiError(422, f"the body is not valid JSON (not UTF-8: byte 0x{raw[err.start]:02x} at position "
                            f"{err.start})", "body") from None
    except ValueError as err:  # JSONDecodeError, or a number Python cannot convert
        raise ApiError(422, f"the body is not valid JSON ({err})", "body") from None
    return validate_data(data)


def validate_data(data) -> VideoRequest:
    """The request's fields, parsed from JSON or a form: numbers of sane length, then the request
    model's fields and types; ApiError (422, or 400 for a number too long) naming the field."""
    for key, value in (data.items() if isinstance(data, dict) else [("body", data)]):
        long = next(long_numbers(value), None)
        if long is not None:
            raise ApiError(400, f"{key}: a number of {long.digits} digits is beyond any value this field takes",
                           key if isinstance(data, dict) else "body")
    try:
        return VideoRequest.model_validate(data)
    except ValidationError as err:
        raise validation_error(err.errors()) from None


def long_numbers(value):
    if isinstance(value, LongNumber):
        yield value
    elif isinstance(value, (list, dict)):
        for v in (value.values() if isinstance(value, dict) else value):
            yield from long_numbers(v)


def item_field(loc: list[str]) -> str | None:
    """A field of one of a request's LoRA items, as its 400s name it: ["loras", "0", "scale"] ->
    "loras[0].scale"; None for any other place."""
    if len(loc) >= 3 and loc[0] == "loras" and loc[1].isdigit():
        return f"loras[{loc[1]}].{loc[2]}"
    return None


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's errors (the body's, or the query's) -> one 422 naming each field, with what would be valid."""
    lines, first = [], None
    for e in errors:
        loc = [str(p) for p in e["loc"][1:]] if e["loc"][:1] == ("query",) else [str(p) for p in e["loc"]]
        param = item_field(loc) or (loc[0] if loc else "body")
        first = first or param
        if e["type"] == "extra_forbidden" and param != loc[0]:
            lines.append(f"{param}: unknown field; a LoRA's fields are {', '.join(LoraItem.model_fields)}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{param}: unknown field; the fields are {', '.join(FIELDS)}")
        elif e["type"] == "missing":
            lines.append(f"{param}: required")
        elif param in HINTS:
            lines.append(f"{param}: {HINTS[param]}")
        elif param == "body":
            lines.append('the body must be a JSON object with a prompt, e.g. {"prompt": "a red circle moving left"}')
        else:
            lines.append(f"{param}: {e['msg'][0].lower()}{e['msg'][1:]}")
    return ApiError(422, "; ".join(dict.fromkeys(lines)), first)
