"""Salesforce Composite (`POST .../composite`): `{"allOrNone", "compositeRequest": [...]}` bytes to a
GraphBatch with `@{ref.field}` references, a GraphResult to `{"compositeResponse": [...]}` bytes.

Sans-I/O and strict. `resolve_references` is the pure ReferenceResolver the engine calls just
before a subrequest that holds references runs. Decisions: README "Salesforce Composite".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from urllib.parse import quote

from gateway.errors import ForbiddenTarget, MalformedBatch, PayloadTooLarge
from gateway.formats._graph_answers import (
    CONTROL,
    ITEM_STATUS_HEADER,
    SCHEME,
    GroupFailure,
    compact_json,
    dump,
    failed_groups,
    is_utf8,
    iter_answer,
    joined_headers,
    json_or,
    member_status,
    read_headers,
    rollback_note,
)
from gateway.formats._json_results import _content_type, _is_json_type, _json_body
from gateway.formats._strict_json import _MISSING, MAX_JSON_DEPTH, ROOT, _child, _parse_document, _show
from gateway.formats.json_batch import TOKEN_PATTERN
from gateway.graph_model import (
    AnsweredItem,
    FailurePolicy,
    GraphBatch,
    GraphItem,
    GraphResult,
    ReferenceUnresolved,
    Unmet,
)
from gateway.model import BatchLimits, CallFailure, Headers, ItemResult, Skipped, SubRequest

__all__ = [
    "ALL_OR_NONE_GROUP", "CompositeBatch", "CompositeBatchCodec", "api_prefix", "resolve_references",
]

DEFAULT_MAX_ITEMS = 25
"""Salesforce's own limit of subrequests per composite request (`batch.composite.max_items`)."""
DEFAULT_LIMITS = BatchLimits(max_items=DEFAULT_MAX_ITEMS)
ALL_OR_NONE_GROUP = "allOrNone"
"""The one atomic group of an `allOrNone` (or `X-Batch-Atomic: true`) request."""
HALTED_STATUS = 400
HALTED = "PROCESSING_HALTED"
ROLLED_BACK_MESSAGE = (
    "The transaction was rolled back since another operation in the same transaction failed."
)
TOP_KEYS = ("allOrNone", "collateSubrequests", "compositeRequest")
REQUEST_KEYS = ("method", "url", "referenceId", "body", "httpHeaders")
REFERENCE_ID = re.compile(r"[A-Za-z0-9_]+")
REFERENCE = re.compile(r"@\{([^{}]*)\}")
"""A reference as it appears in a `url` or a string of a `body`: `@{refId.field[0].Sub}`."""
_PATH = re.compile(r"([A-Za-z0-9_]+)((?:\.[^.\[\]{}\s]+|\[[0-9]{1,9}\])+)")
_STEP = re.compile(r"\.([^.\[\]{}\s]+)|\[([0-9]+)\]")
_API_PREFIX = re.compile(r"/services/data/v[0-9]+\.[0-9]+")
_TOKEN = re.compile(TOKEN_PATTERN)
MAX_BODY_JSON_DEPTH = 128


def api_prefix(composite_path: str) -> str:
    """The `/services/data/vXX.X` that subrequest URLs start with, when the composite endpoint is
    configured under one (`/services/data/v59.0/composite`); empty otherwise (nothing stripped)."""
    match = _API_PREFIX.match(composite_path)
    return match.group(0) if match and composite_path[match.end():].startswith("/") else ""


@dataclass(frozen=True, slots=True)
class CompositeBatch:
    """A decoded composite request: the graph to run and whether it is all-or-nothing."""

    graph: GraphBatch
    all_or_none: bool


class CompositeBatchCodec:
    """Decode a composite request into the graph model and encode its results as the answer."""

    media_type = "application/json"

    def __init__(self, limits: BatchLimits = DEFAULT_LIMITS, *, prefix: str = "") -> None:
        self.limits = limits
        self.prefix = prefix

    def decode(self, body: bytes, *, atomic: bool = False) -> CompositeBatch:
        """Parse and check a whole request; a ClientError names what is wrong and where.

        Subrequests run in order; one that refers to a failed (or unresolvable) one is not sent.
        `allOrNone: true`, or `atomic` (the endpoint's `X-Batch-Atomic`), makes them one atomic group."""
        if len(body) > self.limits.max_body_bytes:
            raise PayloadTooLarge(
                f"Body too large. Maximum body size is {self.limits.max_body_bytes} bytes.",
                where=ROOT, limit="limits.max_body_bytes",
            )
        if not body.strip():
            raise MalformedBatch('Body is empty. Expected {"compositeRequest": [...]}.', where=ROOT)
        document = _parse_document(body, min(MAX_BODY_JSON_DEPTH + 4, MAX_JSON_DEPTH))
        requests, all_or_none = _top(document, self.limits.max_items)
        group = ALL_OR_NONE_GROUP if all_or_none or atomic else None
        reader = _Reader(self.limits, self.prefix, requests)
        items = tuple(
            reader.item(value, _child("/compositeRequest", n), group) for n, value in enumerate(requests)
        )
        graph = GraphBatch(
            items=items, sequential=True, on_failure=FailurePolicy.DEPENDENTS,
            resolver=self._resolver, where=ROOT,
        )
        return CompositeBatch(graph, all_or_none)

    def _resolver(self, item: GraphItem, answered: Mapping[str, AnsweredItem]) -> SubRequest:
        """resolve_references within this endpoint's body limit."""
        return resolve_references(item, answered, max_body_bytes=self.limits.max_body_bytes)

    def encode(self, batch: CompositeBatch, result: GraphResult) -> bytes:
        """`{"compositeResponse": [...]}` in the request's order."""
        return b"".join(self.encode_chunks(batch, result))

    def encode_chunks(self, batch: CompositeBatch, result: GraphResult) -> Iterator[bytes]:
        """The same bytes as `encode`, one response at a time, in ~64 KiB chunks."""
        groups = failed_groups(batch.graph, result)
        group_of = {item.id: item.group for item in batch.graph.items}
        return iter_answer("compositeResponse", (
            _response(ref, outcome, group_of.get(ref), groups) for ref, outcome in result.items
        ))


# --- decoding ----------------------------------------------------------------------------------


def _top(document: object, max_items: int) -> tuple[list[object], bool]:
    if not isinstance(document, dict):
        raise MalformedBatch(
            f'A composite request must be an object {{"compositeRequest": [...]}}; got {_show(document)}.',
            where=ROOT,
        )
    unknown = next((key for key in document if key not in TOP_KEYS), None)
    if unknown is not None:
        raise MalformedBatch(f"Unknown key {_show(unknown)}: a composite request takes "
                             + ", ".join(f'"{k}"' for k in TOP_KEYS) + ".", where=_child(ROOT, unknown))
    for key in ("allOrNone", "collateSubrequests"):
        if key in document and not isinstance(document[key], bool):
            raise MalformedBatch(f'"{key}" must be true or false; got {_show(document[key])}.',
                                 where=_child(ROOT, key))
    requests = document.get("compositeRequest")
    if not isinstance(requests, list):
        shown = "nothing" if requests is None else _show(requests)
        raise MalformedBatch(f'"compositeRequest" must be an array of subrequests; got {shown}.',
                             where="/compositeRequest")
    if not requests:
        raise MalformedBatch('"compositeRequest" is empty: send at least one subrequest.',
                             where="/compositeRequest")
    if len(requests) > max_items:
        raise PayloadTooLarge(
            f"Too many subrequests: {len(requests)}. Maximum number of subrequests is {max_items}.",
            where=_child("/compositeRequest", max_items), limit="batch.composite.max_items",
        )
    return requests, document.get("allOrNone") is True


class _Reader:
    def __init__(self, limits: BatchLimits, prefix: str, requests: list[object]) -> None:
        self.limits = limits
        self.prefix = prefix
        self.earlier: set[str] = set()
        self.everywhere = {
            value["referenceId"] for value in requests
            if isinstance(value, dict) and isinstance(value.get("referenceId"), str)
        }

    def item(self, value: object, where: str, group: str | None) -> GraphItem:
        if not isinstance(value, dict):
            raise MalformedBatch(f"A subrequest must be an object; got {_show(value)}.", where=where)
        unknown = next((key for key in value if key not in REQUEST_KEYS), None)
        if unknown is not None:
            known = ", ".join(f'"{k}"' for k in REQUEST_KEYS)
            raise MalformedBatch(f"Unknown key {_show(unknown)}: a subrequest takes {known}.",
                                 where=_child(where, unknown))
        ref = self._reference_id(value.get("referenceId"), _child(where, "referenceId"))
        method = _method(value.get("method"), _child(where, "method"))
        url = self._url(value.get("url"), _child(where, "url"))
        headers = read_headers(
            value.get("httpHeaders"), _child(where, "httpHeaders"), self.limits, key="httpHeaders",
            lists=False,
        )
        body_value = value.get("body")
        referenced = [*self._references_in(url, ref, _child(where, "url"))]
        for text, text_where in _strings(body_value, _child(where, "body")):
            referenced += self._references_in(text, ref, text_where)
        body, headers = _body(body_value, headers, _child(where, "body"))
        self.earlier.add(ref)
        request = SubRequest(method, url, headers, body, where=where, content_id=ref)
        depends_on = tuple(dict.fromkeys(referenced))
        return GraphItem(ref, request, depends_on, group, has_references=bool(depends_on))

    def _reference_id(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not REFERENCE_ID.fullmatch(value):
            raise MalformedBatch(f'"referenceId" must be a string of letters, digits and underscores; '
                                 f"got {_shown(value)}.", where=where)
        if value in self.earlier:
            raise MalformedBatch(f'Duplicate "referenceId" {_show(value)}: each subrequest needs its own.',
                                 where=where)
        return value

    def _url(self, value: object, where: str) -> str:
        """An origin-form path; the endpoint's `/services/data/vXX.X` prefix is stripped."""
        if not isinstance(value, str) or not value:
            raise MalformedBatch(f'"url" must be a non-empty string; got {_shown(value)}.', where=where)
        if CONTROL.search(value) or "#" in value or not is_utf8(value):
            raise MalformedBatch('"url" holds a control character or a fragment.', where=where)
        value = value.replace(" ", "%20")  # SOQL in a query string is often written with spaces
        if value.startswith("//") or (SCHEME.match(value) and not value.startswith("/")):
            raise ForbiddenTarget(f'"url" must be a path such as "/orders", not {_show(value)}.', where=where)
        if not value.startswith("/"):
            raise MalformedBatch(f'"url" must start with "/"; got {_show(value)}.', where=where)
        rest = value[len(self.prefix):]
        if self.prefix and value.startswith(self.prefix) and rest[:1] in ("", "/", "?"):
            return rest if rest.startswith("/") else "/" + rest
        other = _API_PREFIX.match(value)
        if other is not None and value[other.end():other.end() + 1] in ("", "/", "?"):
            served = f"; this endpoint serves {self.prefix}" if self.prefix else ""
            raise MalformedBatch(f'"url" names the API version {other.group(0)}{served}.', where=where)
        return value

    def _references_in(self, text: str, own: str, where: str) -> list[str]:
        found: list[str] = []
        for match in REFERENCE.finditer(text):
            parsed = _PATH.fullmatch(match.group(1))
            if parsed is None:
                raise MalformedBatch(
                    f"{_show(match.group(0))} is not a reference of the form @{{referenceId.field}}, "
                    "@{referenceId.records[0].Id}.",
                    where=where,
                )
            name = parsed.group(1)
            if name in self.earlier:
                found.append(name)
                continue
            if name == own:
                detail = f"{_show(match.group(0))} refers to its own subrequest."
            elif name in self.everywhere:
                detail = (f"{_show(match.group(0))} refers to {_show(name)}, a later subrequest: a "
                          "reference may name only subrequests before it.")
            else:
                detail = (f"{_show(match.group(0))} refers to {_show(name)}, which is no referenceId "
                          "of this request.")
            raise MalformedBatch(detail, where=where)
        return found


def _strings(value: object, where: str) -> Iterator[tuple[str, str]]:
    """Every string value (not key) of a JSON body, with its pointer."""
    if isinstance(value, str):
        yield value, where
    elif isinstance(value, list):
        for n, child in enumerate(value):
            yield from _strings(child, _child(where, n))
    elif isinstance(value, dict):
        for key, child in value.items():
            yield from _strings(child, _child(where, key))


def _shown(value: object) -> str:
    return "nothing" if value is None else _show(value)


def _method(value: object, where: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise MalformedBatch(f'"method" must be an HTTP method such as "GET" or "POST"; got {_shown(value)}.',
                             where=where)
    return value.upper()


def _body(value: object, headers: Headers, where: str) -> tuple[bytes | None, Headers]:
    """Any JSON value but null is sent as JSON (Salesforce bodies are JSON)."""
    if value is None:
        return None, headers
    media_type, _ = _content_type(headers)
    if media_type is not None and not _is_json_type(media_type):
        raise MalformedBatch(f'"body" is sent as JSON; httpHeaders says Content-Type {_show(media_type)}.',
                             where=where)
    data = compact_json(value)
    if data is None:
        raise MalformedBatch('"body" holds an unpaired UTF-16 surrogate escape.', where=where)
    if media_type is None:
        headers += (("Content-Type", "application/json"),)
    return data, headers


# --- references --------------------------------------------------------------------------------


MAX_RESOLVED_URL = 8192
"""Bytes a subrequest URL may have once its references are resolved (a common request-line limit)."""


def resolve_references(
    item: GraphItem, answered: Mapping[str, AnsweredItem], *,
    max_body_bytes: int = DEFAULT_LIMITS.max_body_bytes,
) -> SubRequest:
    """The item's request with every `@{ref.path}` replaced by the value at `path` in the JSON body
    of `ref`'s answer: in the URL percent-encoded as one segment (a scalar only); in the body a
    string that is exactly one reference becomes that JSON value, a reference inside other text
    its string form. Field names match exactly, else case-insensitively when that is unambiguous.

    Raises ReferenceUnresolved, also when the URL would grow past MAX_RESOLVED_URL or the body by
    more than `max_body_bytes` (`limits.max_body_bytes`): references must not amplify a request."""
    request = item.request
    lookups = _Lookups(answered, max_body_bytes)
    target = REFERENCE.sub(
        lambda m: quote(_scalar(m.group(0), lookups.value(m.group(1))), safe="", errors="replace"),
        request.target,
    )
    if len(target) > MAX_RESOLVED_URL:
        raise ReferenceUnresolved(
            f"the URL with its references resolved would be {len(target)} bytes, over {MAX_RESOLVED_URL}"
        )
    body = request.body
    if body is not None and b"@{" in body:
        body = dump(_resolved(json.loads(body), lookups))
    return replace(request, target=target, body=body)


class _Lookups:
    """The referenced answers' JSON, parsed once per item, and the bytes references add to a body."""

    def __init__(self, answered: Mapping[str, AnsweredItem], max_added: int) -> None:
        self._answered = answered
        self._bodies: dict[str, object] = {}
        self._sizes: dict[str, int] = {}
        self._added = 0
        self._max_added = max_added

    def value(self, reference: str) -> object:
        return _lookup(reference, self._answered, self._bodies)

    def add(self, reference: str, value: object) -> None:
        """Count what substituting `value` for `reference` adds to the body; over the limit: refused."""
        size = self._sizes.get(reference)
        if size is None:
            size = len(_text(value).encode("utf-8", "replace"))
            self._sizes[reference] = size
        self._added += size
        if self._added > self._max_added:
            raise ReferenceUnresolved(
                f"the body with its references resolved would be over {self._max_added} bytes "
                "(limits.max_body_bytes)"
            )


def _resolved(value: object, lookups: _Lookups) -> object:
    if isinstance(value, str):
        whole = REFERENCE.fullmatch(value)
        if whole is not None:
            found = lookups.value(whole.group(1))
            lookups.add(whole.group(1), found)
            return found
        return REFERENCE.sub(lambda m: _counted_text(m.group(1), lookups), value)
    if isinstance(value, list):
        return [_resolved(child, lookups) for child in value]
    if isinstance(value, dict):
        return {key: _resolved(child, lookups) for key, child in value.items()}
    return value


def _counted_text(reference: str, lookups: _Lookups) -> str:
    found = lookups.value(reference)
    lookups.add(reference, found)
    return _text(found)


def _lookup(reference: str, answered: Mapping[str, AnsweredItem], bodies: dict[str, object]) -> object:
    parsed = _PATH.fullmatch(reference)
    if parsed is None:
        raise ReferenceUnresolved(f"@{{{reference}}} is not a reference")
    name = parsed.group(1)
    answer = answered.get(name)
    if answer is None:
        raise ReferenceUnresolved(f"@{{{reference}}}: subrequest {name!r} has no answer to refer to")
    if name not in bodies:
        bodies[name] = _json_body(answer.response.body) if answer.response.body else _MISSING
    value = bodies[name]
    if value is _MISSING:
        raise ReferenceUnresolved(f"@{{{reference}}}: the answer to {name!r} has no JSON body")
    walked = name
    for step in _STEP.finditer(parsed.group(2)):
        field, index = step.group(1), step.group(2)
        value = _field(value, field) if field is not None else _element(value, int(index))
        walked += step.group(0)
        if value is _MISSING:
            raise ReferenceUnresolved(
                f"No value for @{{{reference}}} found in the answer to {name!r} (nothing at {walked})"
            )
    return value


def _field(value: object, name: str) -> object:
    if not isinstance(value, dict):
        return _MISSING
    if name in value:
        return value[name]
    folded = [key for key in value if key.casefold() == name.casefold()]
    return value[folded[0]] if len(folded) == 1 else _MISSING


def _element(value: object, index: int) -> object:
    if not isinstance(value, list) or index >= len(value):
        return _MISSING
    return value[index]


def _scalar(reference: str, value: object) -> str:
    if value is None or isinstance(value, (dict, list)):
        raise ReferenceUnresolved(f"{reference} in the URL is {_show(value)}, not a string or number")
    return _text(value)


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# --- encoding ----------------------------------------------------------------------------------


def _response(
    ref: str, outcome: ItemResult | Unmet, group: str | None, groups: dict[str, GroupFailure]
) -> dict[str, object]:
    failure = groups.get(group) if group is not None else None
    if failure is not None and failure.culprit != ref:
        status, words = member_status(outcome)
        message = ROLLED_BACK_MESSAGE if status.value == "rolled_back" else (
            f"The transaction failed ({failure.why}): {words}.")
        return _error(ref, HALTED_STATUS, HALTED, message, status.value)
    if isinstance(outcome, Unmet):
        message = f"Invalid reference specified. {outcome.reason}" if outcome.unresolved else outcome.reason
        return _error(ref, HALTED_STATUS, HALTED, message, None)
    note = rollback_note(outcome)
    answer = outcome.outcome
    if isinstance(answer, Skipped):
        return _error(ref, HALTED_STATUS, HALTED, answer.reason, note)
    if isinstance(answer, CallFailure):
        code = "UPSTREAM_TIMEOUT" if answer.status == 504 else "UPSTREAM_UNAVAILABLE"
        return _error(ref, answer.status, code, answer.reason, note)
    headers = joined_headers(answer.headers)
    if note is not None:
        headers[ITEM_STATUS_HEADER] = note
    return {"body": json_or(answer.body, answer.headers, "text"), "httpHeaders": headers,
            "httpStatusCode": answer.status, "referenceId": ref}


def _error(ref: str, status: int, code: str, message: str, note: str | None) -> dict[str, object]:
    headers = {ITEM_STATUS_HEADER: note} if note is not None else {}
    return {"body": [{"errorCode": code, "message": message}], "httpHeaders": headers,
            "httpStatusCode": status, "referenceId": ref}


def error_document(code: str, message: str, where: str | None) -> bytes:
    """A refused request in Salesforce's error shape: `[{"message", "errorCode", "fields"}]`."""
    error: dict[str, object] = {"message": message, "errorCode": code}
    if where is not None:
        error["fields"] = [where]
    return dump([error])
