"""Microsoft Graph JSON batching (learn.microsoft.com/graph/json-batching): `{"requests": [...]}`
bytes to a GraphBatch, a GraphResult to `{"responses": [...]}` bytes; sans-I/O, strict, with limits.

Decisions (README "Microsoft Graph JSON batching"): `url` is a gateway target (relative to the
service root, the batch path without `$batch`); an absolute `url` is accepted only on one of the
gateway's own origins under that root, which are stripped. Request bodies: a JSON value is sent as
JSON, a string is base64 (standard or URL-safe) and needs a Content-Type. Answer bodies: JSON for a
JSON upstream body, else standard base64 (the Content-Type header says which), null when empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from yarl import URL

from gateway.errors import ForbiddenTarget, MalformedBatch, PayloadTooLarge
from gateway.formats._graph_answers import (
    CONTROL,
    ITEM_STATUS_HEADER,
    SCHEME,
    GroupFailure,
    base64_bytes,
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
from gateway.formats._json_results import _content_type, _is_json_type
from gateway.formats._strict_json import MAX_JSON_DEPTH, ROOT, _child, _parse_document, _show
from gateway.formats.json_batch import TOKEN_PATTERN
from gateway.graph_model import FailurePolicy, GraphBatch, GraphItem, GraphResult, Unmet
from gateway.model import BatchLimits, CallFailure, Headers, ItemResult, Skipped, SubRequest

__all__ = ["ATOMIC_GROUP", "DEFAULT_MAX_ITEMS", "GraphBatchCodec", "GraphSite"]

DEFAULT_MAX_ITEMS = 20
"""Graph's own limit of requests per batch (`batch.graph.max_items`)."""
DEFAULT_LIMITS = BatchLimits(max_items=DEFAULT_MAX_ITEMS)
FAILED_DEPENDENCY = 424
ATOMIC_GROUP = "atomic"
"""The one atomic group of a batch sent with `X-Batch-Atomic: true` (Graph has no groups)."""
REQUEST_KEYS = ("id", "method", "url", "headers", "body", "dependsOn", "depends_on")
MAX_BODY_JSON_DEPTH = 128
MAX_ID_LENGTH = 256
_TOKEN = re.compile(TOKEN_PATTERN)


@dataclass(frozen=True, slots=True)
class GraphSite:
    """Where the batch was posted: `root` is the batch path without its last segment (`/v1.0` for
    `/v1.0/$batch`, empty for `/$batch`); `origins` are the gateway's own `scheme://host[:port]`
    (the request's Host and the configured public names), lower case, default ports omitted."""

    root: str = ""
    origins: frozenset[str] = frozenset()

    @classmethod
    def of(cls, batch_path: str, origins: Iterable[str] = ()) -> GraphSite:
        return cls(batch_path[: batch_path.rfind("/")], frozenset(filter(None, map(origin_of, origins))))


def origin_of(url: str) -> str | None:
    """`scheme://host[:port]` of an absolute URL, normalised; None when it is not one."""
    try:
        parsed = URL(url)
        if not parsed.absolute or parsed.scheme not in ("http", "https"):
            return None
        return str(parsed.origin()).lower()
    except (ValueError, TypeError):
        return None


class GraphBatchCodec:
    """Decode a Graph JSON batch into the graph model and encode its results as the answer."""

    media_type = "application/json"

    def __init__(self, limits: BatchLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits

    def decode(self, body: bytes, site: GraphSite = GraphSite(), *, atomic: bool = False) -> GraphBatch:
        """Parse and check a whole batch; a ClientError names what is wrong and where (JSON pointer).

        `atomic`: every request joins one atomic group (`X-Batch-Atomic: true`), run in order and
        all-or-nothing; otherwise requests run as soon as their `dependsOn` succeeded."""
        if len(body) > self.limits.max_body_bytes:
            raise PayloadTooLarge(
                f"Body too large. Maximum body size is {self.limits.max_body_bytes} bytes.",
                where=ROOT, limit="limits.max_body_bytes",
            )
        if not body.strip():
            raise MalformedBatch('Body is empty. Expected {"requests": [...]}.', where=ROOT)
        document = _parse_document(body, min(MAX_BODY_JSON_DEPTH + 4, MAX_JSON_DEPTH))
        requests = _requests(document, self.limits.max_items)
        reader = _Reader(self.limits, site, requests)
        items = tuple(
            reader.item(value, _child("/requests", n), ATOMIC_GROUP if atomic else None)
            for n, value in enumerate(requests)
        )
        return GraphBatch(items=items, sequential=False, on_failure=FailurePolicy.DEPENDENTS, where=ROOT)

    def encode(self, batch: GraphBatch, result: GraphResult) -> bytes:
        """`{"responses": [...]}` in the request's order, each with id, status, headers and body."""
        return b"".join(self.encode_chunks(batch, result))

    def encode_chunks(self, batch: GraphBatch, result: GraphResult) -> Iterator[bytes]:
        """The same bytes as `encode`, one response at a time, in ~64 KiB chunks."""
        groups = failed_groups(batch, result)
        group_of = {item.id: item.group for item in batch.items}
        return iter_answer("responses", (
            _response(item_id, outcome, group_of.get(item_id), groups) for item_id, outcome in result.items
        ))


# --- decoding ----------------------------------------------------------------------------------


def _requests(document: object, max_items: int) -> list[object]:
    if not isinstance(document, dict):
        raise MalformedBatch(f'A JSON batch must be an object {{"requests": [...]}}; got {_show(document)}.',
                             where=ROOT)
    unknown = next((key for key in document if key != "requests"), None)
    if unknown is not None:
        raise MalformedBatch(f'Unknown key {_show(unknown)}: a JSON batch takes "requests" only.',
                             where=_child(ROOT, unknown))
    requests = document.get("requests")
    if not isinstance(requests, list):
        shown = "nothing" if requests is None else _show(requests)
        raise MalformedBatch(f'"requests" must be an array of request objects; got {shown}.',
                             where="/requests")
    if not requests:
        raise MalformedBatch('"requests" is empty: a batch needs at least one request.', where="/requests")
    if len(requests) > max_items:
        raise PayloadTooLarge(
            f"Too many requests: {len(requests)}. Maximum number of requests is {max_items}.",
            where=_child("/requests", max_items), limit="batch.graph.max_items",
        )
    return requests


class _Reader:
    """Reads request objects in order, checking ids and dependencies against the earlier ones."""

    def __init__(self, limits: BatchLimits, site: GraphSite, requests: list[object]) -> None:
        self.limits = limits
        self.site = site
        self.earlier: dict[str, str] = {}
        """Case-folded id -> the id as the client spelled it, for the requests read so far."""
        self.everywhere = {
            value["id"].casefold()
            for value in requests
            if isinstance(value, dict) and isinstance(value.get("id"), str)
        }

    def item(self, value: object, where: str, group: str | None) -> GraphItem:
        if not isinstance(value, dict):
            raise MalformedBatch(f"A request must be an object; got {_show(value)}.", where=where)
        unknown = next((key for key in value if key not in REQUEST_KEYS), None)
        if unknown is not None:
            raise MalformedBatch(
                f"Unknown key {_show(unknown)}: a request takes "
                + ", ".join(f'"{key}"' for key in REQUEST_KEYS[:-1]) + ' (or "depends_on").',
                where=_child(where, unknown),
            )
        item_id = self._id(value.get("id"), _child(where, "id"))
        depends_on = self._depends_on(value, item_id, where)
        method = _method(value.get("method"), _child(where, "method"))
        target = _target(value.get("url"), self.site, _child(where, "url"))
        headers = read_headers(
            value.get("headers"), _child(where, "headers"), self.limits, key="headers", lists=True
        )
        body, headers = _body(value.get("body"), headers, _child(where, "body"))
        self.earlier[item_id.casefold()] = item_id
        request = SubRequest(method, target, headers, body, where=where, content_id=item_id)
        return GraphItem(item_id, request, depends_on, group)

    def _id(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise MalformedBatch(f'"id" must be a non-empty string; got {_shown(value)}.', where=where)
        if len(value) > MAX_ID_LENGTH or CONTROL.search(value) or not is_utf8(value):
            raise MalformedBatch(
                f'"id" must be at most {MAX_ID_LENGTH} characters, without control characters.',
                where=where,
            )
        other = self.earlier.get(value.casefold())
        if other is not None:
            same = "" if other == value else f" (as {_show(other)}: ids are compared case-insensitively)"
            raise MalformedBatch(f'Duplicate "id" {_show(value)}{same}; ids are unique within a batch.',
                                 where=where)
        return value

    def _depends_on(self, value: dict[str, object], item_id: str, where: str) -> tuple[str, ...]:
        if "dependsOn" in value and "depends_on" in value:
            raise MalformedBatch('Give "dependsOn" or its alias "depends_on", not both.',
                                 where=_child(where, "depends_on"))
        key = "depends_on" if "depends_on" in value else "dependsOn"
        names = value.get(key)
        where = _child(where, key)
        if names is None:
            return ()
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise MalformedBatch(f'"{key}" must be an array of request ids; got {_show(names)}.', where=where)
        found: list[str] = []
        for n, name in enumerate(names):
            found.append(self._dependency(name, item_id, _child(where, n)))
        return tuple(dict.fromkeys(found))

    def _dependency(self, name: str, item_id: str, where: str) -> str:
        known = self.earlier.get(name.casefold())
        if known is not None:
            return known
        if name.casefold() == item_id.casefold():
            raise MalformedBatch(f"Request {_show(item_id)} cannot depend on itself.", where=where)
        if name.casefold() in self.everywhere:
            raise MalformedBatch(
                f"dependsOn names {_show(name)}, a later request: a request may depend only on "
                "requests before it (this also rules out cycles).",
                where=where,
            )
        raise MalformedBatch(f"dependsOn names {_show(name)}, which is no request id of this batch.",
                             where=where)


def _shown(value: object) -> str:
    return "nothing" if value is None else _show(value)


def _method(value: object, where: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise MalformedBatch(f'"method" must be an HTTP method such as "GET" or "POST"; got {_shown(value)}.',
                             where=where)
    return value.upper()


def _target(value: object, site: GraphSite, where: str) -> str:
    """The request's `url` as a gateway target (origin-form path and query).

    Relative (`/orders/1`, `orders/1`): as it is, with a leading slash. Absolute: only on one of the
    gateway's own origins and under the service root, both stripped. Anything else is refused;
    whether the target is routed and allowed is the planner's question."""
    if not isinstance(value, str) or not value:
        raise MalformedBatch(f'"url" must be a non-empty string; got {_shown(value)}.', where=where)
    if CONTROL.search(value) or not is_utf8(value):
        raise MalformedBatch('"url" holds a control character; percent-encode it.', where=where)
    value = value.replace(" ", "%20")  # the Graph docs' own examples hold spaces (`city eq null`)
    if "#" in value:
        raise MalformedBatch(f'"url" must not hold a fragment: {_show(value)}.', where=where)
    if value.startswith("//"):
        raise ForbiddenTarget(f'"url" must not be scheme-relative: {_show(value)}.', where=where)
    if value.startswith("/"):
        return value
    if SCHEME.match(value) and "://" in value:
        return _own_absolute(value, site, where)
    if SCHEME.match(value.split("/", 1)[0]):
        raise ForbiddenTarget(
            f'"url" {_show(value)} reads as a URI with a scheme; send a path such as "/orders/1".',
            where=where,
        )
    return "/" + value


def _own_absolute(url: str, site: GraphSite, where: str) -> str:
    origin = origin_of(url)
    try:
        parsed = URL(url, encoded=True)
    except (ValueError, TypeError):
        raise ForbiddenTarget(f'"url" {_show(url)} is not a valid URL.', where=where) from None
    if origin is None or parsed.user is not None or origin not in site.origins:
        raise ForbiddenTarget(
            f'The absolute "url" {_show(url)} does not point at this gateway; send a relative URL '
            'such as "/orders/1".',
            where=where,
        )
    path = parsed.raw_path or "/"
    if site.root and path != site.root and not path.startswith(site.root + "/"):
        raise ForbiddenTarget(
            f'The absolute "url" {_show(url)} is not under this batch\'s service root {site.root}/.',
            where=where,
        )
    path = path[len(site.root):] or "/"
    return path + (f"?{parsed.raw_query_string}" if parsed.raw_query_string else "")


def _body(value: object, headers: Headers, where: str) -> tuple[bytes | None, Headers]:
    """A JSON value is sent as JSON (Content-Type application/json unless the request gives a JSON
    type); a string is base64 of the bytes to send, under the request's own Content-Type."""
    if value is None:
        return None, headers
    media_type, _ = _content_type(headers)
    if isinstance(value, str):
        if media_type is None:
            raise MalformedBatch(
                'A string "body" is base64 and needs a Content-Type header saying what it holds '
                '(send JSON as an object or array).',
                where=where,
            )
        data = base64_bytes(value)
        if data is None:
            raise MalformedBatch('A string "body" must be base64 (standard or URL-safe alphabet).',
                                 where=where)
        return data, headers
    if media_type is not None and not _is_json_type(media_type):
        raise MalformedBatch(
            f'A JSON "body" needs a JSON Content-Type, not {_show(media_type)} (send other media '
            "types as a base64 string).",
            where=where,
        )
    data = compact_json(value)
    if data is None:
        raise MalformedBatch('"body" holds an unpaired UTF-16 surrogate escape.', where=where)
    if media_type is None:
        headers += (("Content-Type", "application/json"),)
    return data, headers


# --- encoding ----------------------------------------------------------------------------------


def _response(
    item_id: str, outcome: ItemResult | Unmet, group: str | None, groups: dict[str, GroupFailure]
) -> dict[str, object]:
    failure = groups.get(group) if group is not None else None
    if failure is not None and failure.culprit != item_id:
        status, words = member_status(outcome)
        message = f"The atomic batch failed ({failure.why}): {words}."
        return _error(item_id, FAILED_DEPENDENCY, "failed-dependency", message, status.value)
    if isinstance(outcome, Unmet):
        return _error(item_id, FAILED_DEPENDENCY, "failed-dependency", outcome.reason, None)
    note = rollback_note(outcome)
    answer = outcome.outcome
    if isinstance(answer, Skipped):
        return _error(item_id, FAILED_DEPENDENCY, "failed-dependency", answer.reason, note)
    if isinstance(answer, CallFailure):
        code = "upstream-timeout" if answer.status == 504 else "upstream-unavailable"
        return _error(item_id, answer.status, code, answer.reason, note)
    headers = joined_headers(answer.headers)
    if note is not None:
        headers[ITEM_STATUS_HEADER] = note
    return {"id": item_id, "status": answer.status, "headers": headers,
            "body": json_or(answer.body, answer.headers, "base64")}


def _error(item_id: str, status: int, code: str, message: str, note: str | None) -> dict[str, object]:
    headers = {"Content-Type": "application/json"}
    if note is not None:
        headers[ITEM_STATUS_HEADER] = note
    return {"id": item_id, "status": status, "headers": headers,
            "body": {"error": {"code": code, "message": message}}}


def error_document(code: str, message: str, inner: dict[str, str]) -> bytes:
    """A refused batch in Graph's error shape: `{"error": {"code", "message", "innerError"}}`."""
    return dump({"error": {"code": code, "message": message, "innerError": inner}})
