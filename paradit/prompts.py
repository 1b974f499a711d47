"""A prompt as the text encoder reads it: Wan's cleaning, in plain Python.

Every door refuses a prompt that cleans to nothing (the CLI's checks, the service's request check)
before any weights exist, so the cleaning lives here, away from paradit.models.text_encoder: importing
that one imports transformers (and torch._dynamo through it), seconds that a check does not need.
"""
from __future__ import annotations

import functools
import html
import re

from paradit.errors import ParameterError


@functools.cache
def _fix_text():
    """ftfy.fix_text where ftfy is installed, else the identity: looked up once, not on every prompt."""
    try:
        import ftfy
        return ftfy.fix_text
    except ImportError:  # ftfy only repairs mojibake; plain prompts are unchanged by it
        return lambda text: text


def clean_prompt(text: str) -> str:
    """wan/modules/tokenizers.py's clean='whitespace': ftfy (if installed), HTML unescaped twice, spaces."""
    text = html.unescape(html.unescape(_fix_text()(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def check_prompt(param: str, text, empty_ok: bool = False) -> str:
    """A prompt as the text encoder takes it: a str that UTF-8 can hold, not empty once cleaned as the
    encoder cleans it (a negative prompt may be: empty_ok)."""
    if not isinstance(text, str):
        raise ParameterError(param, text, "must be text (a str)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ParameterError(param, text if len(text) <= 60 else text[:57] + "...",
                             f"not valid UTF-8 (a lone surrogate at position {err.start})") from None
    if not empty_ok and not clean_prompt(text):
        raise ParameterError(param, text, "empty after removing whitespace", "describe the video")
    return text
