"""Strict JSON documents for the JSON batch format: bytes to a value, or a MalformedBatch saying where.

Owns RFC 8259 strictness (no NaN, no huge numbers, no repeated keys), the nesting pre-scan and pointers.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator
from itertools import accumulate

from gateway.errors import MalformedBatch

ROOT = "/"
"""The pointer of the whole document (RFC 6901 spells it "", which reads badly in an error)."""

MAX_JSON_DEPTH = 512
"""Hard cap on the nesting of any document the codec parses, far below Python's recursion limit."""

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_BRACKET_STEP = [1 if byte in b"[{" else -1 for byte in range(256)]
_MISSING = object()
"""Stands for an absent key, or for an upstream body that is not strict JSON."""

_ITEM_FORM = '{"SingleItem": {...}} or {"Batch": {...}}'
"""What a request document must be; the empty-body message names it too."""


class _NotJson(Exception):
    """Raised by the parse hooks and `_loads`; the caller decides what it means."""


class _DuplicateKeys(dict[str, object]):
    """An object in which a key appeared more than once, remembered so an error can point at it."""

    def __init__(self, pairs: dict[str, object], key: str) -> None:
        super().__init__(pairs)
        self.duplicate = key


def _reject_constant(name: str) -> object:
    raise _NotJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotJson(f"the number {text[:40]} is too large to represent")
    return value


def _nesting_depth(data: bytes, limit: int) -> int:
    """How deep brackets outside strings nest; 0 when there are too few brackets to pass `limit`.

    Scans bytes: in UTF-8 the quote, backslash and brackets never occur inside a multi-byte char.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return 0
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets), initial=0))


class _Repeats(threading.local):
    """Whether the document `_loads` is parsing repeated a key (set by `_pairs_hook`)."""

    found = False


_REPEATS = _Repeats()


def _pairs_hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    _REPEATS.found = True
    return _DuplicateKeys(obj, _first_repeated(pairs))


_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs_hook, parse_constant=_reject_constant, parse_float=_finite_float
)


def _loads(text: str) -> tuple[object, bool]:
    """Strict RFC 8259 JSON (no NaN, no overflowing numbers); also says whether a key repeated.

    One decoder for every call (`json.loads` with hooks builds one per call: most of the cost of
    a small upstream body); the repeat flag is per thread, and nothing awaits in between."""
    _REPEATS.found = False
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise _NotJson(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise _NotJson("a number has too many digits") from None
    except RecursionError:  # pre-empted by `_nesting_depth`; kept so it can never escape
        raise _NotJson("it is nested too deep") from None
    return value, _REPEATS.found


def _first_repeated(pairs: list[tuple[str, object]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return ""


def _find_duplicate(value: object, where: str) -> tuple[str, str] | None:
    """The pointer and key of the first object (document order) that repeats a key."""
    if isinstance(value, _DuplicateKeys):
        return where, value.duplicate
    children: Iterator[tuple[str | int, object]]
    if isinstance(value, dict):
        children = iter(value.items())
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        return None
    for token, child in children:
        found = _find_duplicate(child, _child(where, token))
        if found is not None:
            return found
    return None


def _parse_document(body: bytes, max_depth: int) -> object:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        detail = f"Body is not valid UTF-8 (byte {exc.start}). Send the batch as UTF-8 JSON."
        raise MalformedBatch(detail, where=ROOT) from None
    if not text.strip():
        raise MalformedBatch(f"Body is empty. Expected {_ITEM_FORM}.", where=ROOT)
    depth = _nesting_depth(body, max_depth)
    if depth > max_depth:
        detail = f"JSON nested {depth} levels deep. Maximum nesting is {max_depth} levels."
        raise MalformedBatch(detail, where=ROOT, limit="limits.max_depth")
    try:
        document, repeated = _loads(text)
    except _NotJson as exc:
        raise MalformedBatch(f"Body is not valid JSON: {exc}.", where=ROOT) from None
    duplicate = _find_duplicate(document, ROOT) if repeated else None
    if duplicate is not None:
        where, key = duplicate
        detail = f"Duplicate key {_show(key)}. Each key may appear only once in an object."
        raise MalformedBatch(detail, where=where)
    return document


def _show(value: object) -> str:
    """A short, ASCII-safe rendering of a client's value for an error message."""
    if isinstance(value, dict):
        return "an object" if value else "an empty object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str) and len(value) > 40:
        return json.dumps(value[:40]) + "..."
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _child(pointer: str, token: str | int) -> str:
    """RFC 6901 pointer of a member or element; unencodable characters are shown escaped."""
    if isinstance(token, int) or (token.isascii() and "~" not in token and "/" not in token):
        escaped = str(token)  # the common case (an index, a known key): nothing to escape
    else:
        text = token.encode("utf-8", "backslashreplace").decode("utf-8")
        escaped = text.replace("~", "~0").replace("/", "~1")
    return f"/{escaped}" if pointer == ROOT else f"{pointer}/{escaped}"
