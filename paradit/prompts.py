"""A prompt as the text encoder reads it: Wan's cleaning, in plain Python.

Every door refuses a prompt that cleans to nothing (the CLI's checks, the service's request check)
before any weights exist, so the cleaning lives here, away from paradit.models.text_encoder: importing
that one imports transformers (and torch._dynamo through it), seconds that a check does not need.
"""
from __future__ import annotations

import functools
import html
import re


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
