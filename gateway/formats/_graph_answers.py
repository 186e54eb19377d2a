"""What the Graph and Salesforce Composite codecs share (and OData JSON, the streamed answer):
reading a request's header map; when they answer, which items stand for themselves and which for a
failed atomic group, header maps, body renderings and the answer written one response at a time.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from gateway.errors import HeadersTooLarge, MalformedBatch
from gateway.formats._json_results import _content_type, _is_json_type, _json_body, chunked
from gateway.formats._strict_json import _MISSING, _child, _show
from gateway.formats.json_batch import FORBIDDEN_IN_VALUES_PATTERN, FRAMING_HEADERS, TOKEN_PATTERN
from gateway.graph_model import GraphBatch, GraphResult, Unmet
from gateway.headers import without_hop_by_hop
from gateway.model import BatchLimits, BatchOutcome, Headers, ItemResult, RollbackStatus, Skipped

ITEM_STATUS_HEADER = "X-Batch-Item-Status"
"""Set on an item's answer in an atomic batch when its change did not stay: `rolled_back`,
`rollback_failed`, `skipped` or `failed` (the values of RollbackStatus)."""
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_TOKEN = re.compile(TOKEN_PATTERN)
_FORBIDDEN_IN_VALUES = re.compile(FORBIDDEN_IN_VALUES_PATTERN)


def read_headers(value: object, where: str, limits: BatchLimits, *, key: str, lists: bool) -> Headers:
    """A request's `key` (Graph `headers`, Composite `httpHeaders`): name -> string, or with
    `lists` a list of strings (the header repeated); null is none. Token names, no framing headers,
    no CR/LF/NUL or unpaired surrogates in values, within the part header limits."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise MalformedBatch(f'"{key}" must be an object of header name to string; got {_show(value)}.',
                             where=where)
    expected = "a string or a list of strings" if lists else "a string"
    pairs: list[tuple[str, str]] = []
    for name, values in value.items():
        header_where = _child(where, name)
        if not _TOKEN.fullmatch(name):
            raise MalformedBatch(f"Header name {_show(name)} is not an HTTP token.", where=header_where)
        if name.lower() in FRAMING_HEADERS:
            raise MalformedBatch(f"Header {name} is not allowed: the gateway frames the body itself.",
                                 where=header_where)
        listed = values if lists and isinstance(values, list) else [values]
        for n, text in enumerate(listed):
            shown_where = _child(header_where, n) if listed is values else header_where
            if not isinstance(text, str):
                raise MalformedBatch(f"Header {name} must be {expected}; got {_show(text)}.",
                                     where=shown_where)
            if _FORBIDDEN_IN_VALUES.search(text) or not is_utf8(text):
                raise MalformedBatch(f"Header {name} must not contain CR, LF, NUL or unpaired surrogates.",
                                     where=shown_where)
            pairs.append((name, text))
    if len(pairs) > limits.max_part_headers:
        raise HeadersTooLarge(f"Too many headers. Maximum number of headers is {limits.max_part_headers}.",
                              where=where, limit="limits.max_part_headers")
    size = sum(len(name) + len(text.encode("utf-8")) + 4 for name, text in pairs)
    if size > limits.max_part_header_bytes:
        raise HeadersTooLarge(f"Headers too large. Maximum size is {limits.max_part_header_bytes} bytes.",
                              where=where, limit="limits.max_part_header_bytes")
    return tuple(pairs)


@dataclass(frozen=True, slots=True)
class GroupFailure:
    """An atomic group that did not commit: the member that failed it (None: the group failed as
    a whole, e.g. at commit) and a sentence saying why."""

    culprit: str | None
    why: str


def failed_groups(batch: GraphBatch, result: GraphResult) -> dict[str, GroupFailure]:
    """Every atomic group of the batch that did not commit, by name.

    A group failed when a member failed on its own (an error status, no answer, not sent), when
    its outcome is not `committed`, or when a member was rolled back or skipped."""
    outcomes = dict(result.groups)
    by_id = dict(result.items)
    members: dict[str, list[str]] = {}
    for item in batch.items:
        if item.group is not None:
            members.setdefault(item.group, []).append(item.id)
    failed: dict[str, GroupFailure] = {}
    for group, ids in members.items():
        culprit = next((m for m in ids if _failed_itself(by_id.get(m))), None)
        outcome = outcomes.get(group)
        if culprit is None and outcome in (None, BatchOutcome.COMMITTED) and not any(
            _undone(by_id.get(m)) for m in ids
        ):
            continue
        why = f"{culprit!r} failed" if culprit is not None else "the group did not commit"
        if outcome is BatchOutcome.ROLLBACK_INCOMPLETE:
            why += "; the rollback is incomplete"
        failed[group] = GroupFailure(culprit, why)
    return failed


def _failed_itself(outcome: ItemResult | Unmet | None) -> bool:
    if isinstance(outcome, ItemResult):
        return outcome.failed
    return isinstance(outcome, Unmet)


def _undone(outcome: ItemResult | Unmet | None) -> bool:
    return isinstance(outcome, ItemResult) and (
        isinstance(outcome.outcome, Skipped)
        or outcome.rollback in (RollbackStatus.ROLLED_BACK, RollbackStatus.ROLLBACK_FAILED)
    )


def member_status(outcome: ItemResult | Unmet) -> tuple[RollbackStatus, str]:
    """What became of a member of a failed group that did not fail it, and that in words."""
    if isinstance(outcome, Unmet):
        status = RollbackStatus.SKIPPED
        detail = None
    else:
        status = outcome.rollback or (
            RollbackStatus.SKIPPED if isinstance(outcome.outcome, Skipped) else RollbackStatus.ROLLED_BACK
        )
        detail = outcome.rollback_detail
    words = {
        RollbackStatus.ROLLED_BACK: "its change was rolled back",
        RollbackStatus.ROLLBACK_FAILED: "its change could NOT be rolled back",
        RollbackStatus.SKIPPED: "it was not executed",
        RollbackStatus.EXECUTED: "it changed nothing",
    }.get(status, "it did not take effect")
    return status, f"{words} ({detail})" if detail else words


def rollback_note(result: ItemResult) -> str | None:
    """The X-Batch-Item-Status value of an item that answers for itself, when it did not stay."""
    if result.rollback is None or result.rollback is RollbackStatus.EXECUTED:
        return None
    return str(result.rollback.value)


def joined_headers(headers: Headers) -> dict[str, str]:
    """Name (as the upstream spelled it first) -> value, repeats joined by ", "; without hop-by-hop
    headers and Content-Length (the batch answer frames itself)."""
    names: dict[str, str] = {}
    values: dict[str, list[str]] = {}
    for name, value in without_hop_by_hop(headers):
        key = name.lower()
        if key == "content-length":
            continue
        names.setdefault(key, name)
        values.setdefault(key, []).append(value)
    return {names[key]: ", ".join(found) for key, found in values.items()}


def json_or(body: bytes, headers: Headers, other: str) -> object:
    """An upstream body for a JSON answer: None when empty; the parsed value when the media type is
    JSON (or absent) and it parses strictly; else `other`: `base64` (standard alphabet) or `text`
    (UTF-8 text as a string, anything else base64). Base64 comes as a Base64Body (see iter_answer)."""
    if not body:
        return None
    media_type, charset = _content_type(headers)
    if media_type is None or _is_json_type(media_type):
        value = _json_body(body)
        if value is not _MISSING:
            return value
    if other == "text" and charset in (None, "utf-8", "utf8", "us-ascii", "ascii"):
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return Base64Body(body)


@dataclass(frozen=True, slots=True)
class Base64Body:
    """An upstream body that an answer carries as a base64 JSON string (`urlsafe`: base64url
    without padding). `iter_answer` encodes it 48 KiB at a time as it writes the answer, so the
    encoded text never exists whole beside the bytes."""

    data: bytes
    urlsafe: bool = False

    def text(self) -> str:
        """The whole string (for tests and small bodies)."""
        return "".join(self.pieces())

    def pieces(self) -> Iterator[str]:
        view = memoryview(self.data)
        encode = base64.urlsafe_b64encode if self.urlsafe else base64.b64encode
        for start in range(0, len(view), _BASE64_SLICE):  # slices of 3n bytes: pieces join exactly
            piece = encode(view[start:start + _BASE64_SLICE]).decode("ascii")
            yield piece.rstrip("=") if self.urlsafe else piece


_BASE64_SLICE = 48 * 1024


def iter_answer(key: str, responses: Iterable[dict[str, object]]) -> Iterator[bytes]:
    """`{"<key>": [<responses>]}` as `dump` writes it, in ~64 KiB chunks, rendering one response
    at a time (pass a generator: a response's parsed JSON body then exists only while it is
    written) and each Base64Body in slices."""
    return chunked(_answer_pieces(key, responses))


def _answer_pieces(key: str, responses: Iterable[dict[str, object]]) -> Iterator[str]:
    yield "{" + _dumps(key) + ":["
    for n, response in enumerate(responses):
        if n:
            yield ","
        if not any(isinstance(value, Base64Body) for value in response.values()):
            yield _dumps(response)
            continue
        for m, (name, value) in enumerate(response.items()):
            yield ("," if m else "{") + _dumps(name) + ":"
            if isinstance(value, Base64Body):
                yield '"'
                yield from value.pieces()
                yield '"'
            else:
                yield _dumps(value)
        yield "}"
    yield "]}"


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def base64_bytes(text: str) -> bytes | None:
    """Standard or URL-safe base64, padding optional; None when it is not base64."""
    cleaned = text.translate(str.maketrans("-_", "+/"))
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def compact_json(value: object) -> bytes | None:
    """Compact UTF-8 JSON; None when the value holds an unpaired surrogate (no UTF-8 form)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def dump(document: object) -> bytes:
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from an upstream: U+FFFD, as _json_results does
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode("utf-8")
