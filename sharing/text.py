"""Bounded text for messages: values quoted in errors and logs are shortened with a marker."""

from __future__ import annotations

import reprlib

SHORT_CHARS = 80  # values quoted in messages are cut to this many characters (names are <= 63)

_repr = reprlib.Repr()
_repr.maxstring = SHORT_CHARS
_repr.maxother = SHORT_CHARS
_repr.maxlevel = 2
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = _repr.maxdict = 4


def shorten(text: str, limit: int = SHORT_CHARS) -> str:
    """`text` cut to `limit` characters, the cut marked with how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"


def short_repr(value: object) -> str:
    """A bounded repr for messages: strings quoted and cut, long or deep collections elided.

    Work is bounded too: a huge or deeply nested value is never rendered in full.
    """
    if isinstance(value, str):
        return f'"{shorten(value)}"'
    if isinstance(value, bytes | bytearray):
        more = len(value) - SHORT_CHARS
        return repr(bytes(value[:SHORT_CHARS])) + (f"…(+{more} bytes)" if more > 0 else "")
    return shorten(_repr.repr(value), 2 * SHORT_CHARS)
