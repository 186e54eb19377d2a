"""The OData 4.01 JSON batch format (odata-json-format-v4.01 §19): `{"requests": [...]}` bytes to a
GraphBatch, a GraphResult to `{"responses": [...]}` bytes; sans-I/O, strict, with limits.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.errors import HeadersTooLarge, MalformedBatch, PayloadTooLarge
from gateway.formats._graph_answers import Base64Body, iter_answer
from gateway.formats._json_results import _content_type, _is_json_type, _json_body
from gateway.formats._odata import (
    ServiceRoot,
    check_request_id,
    error_code,
    etag_references,
    gateway_target,
    reference_of,
    resolve_references,
)
from gateway.formats._strict_json import _MISSING as _MISSING_BODY
from gateway.formats._strict_json import MAX_JSON_DEPTH, ROOT, _child, _parse_document, _show
from gateway.formats.json_batch import TOKEN_PATTERN
from gateway.graph_model import FailurePolicy, GraphBatch, GraphItem, GraphResult, Unmet
from gateway.headers import without_hop_by_hop
from gateway.model import (
    BatchLimits,
    BatchOutcome,
    CallFailure,
    Headers,
    ItemResult,
    RollbackStatus,
    Skipped,
    SubRequest,
    SubResponse,
)

__all__ = ["MEDIA_TYPE", "ODataJsonCodec"]

MEDIA_TYPE = "application/json"
METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")
"""What `method` may be (§19.1), in any case."""
REQUEST_KEYS = ("id", "method", "url", "atomicityGroup", "dependsOn", "headers", "body")
DEFAULT_MAX_ITEMS = 100
DEFAULT_LIMITS = BatchLimits(max_items=DEFAULT_MAX_ITEMS)
MAX_BODY_JSON_DEPTH = 128
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
_BODILESS = frozenset({"GET", "DELETE"})
_CONTROL = frozenset("\r\n\x00")
_TOKEN = re.compile(TOKEN_PATTERN)


@dataclass(frozen=True, slots=True)
class ODataJsonBatch:
    """A decoded JSON batch: the graph to run and each item's atomicity group (echoed back)."""

    graph: GraphBatch
    groups: dict[str, str]
    continue_on_error: bool


class ODataJsonCodec:
    """Decode an OData JSON batch into the graph model and encode its results as the answer."""

    media_type = MEDIA_TYPE

    def __init__(self, limits: BatchLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits

    def decode(
        self, body: bytes, root: ServiceRoot, *, continue_on_error: bool | None = None
    ) -> ODataJsonBatch:
        """Parse and check a whole batch; a ClientError names what is wrong and where.

        `continue_on_error` is the batch's `Prefer` (§19.4): absent or true, every request runs
        that its dependencies allow; false, nothing more starts after the first failure.
        """
        if len(body) > self.limits.max_body_bytes:
            raise PayloadTooLarge(
                f"Body too large. Maximum body size is {self.limits.max_body_bytes} bytes.",
                where=ROOT, limit="limits.max_body_bytes",
            )
        if not body.strip():
            raise MalformedBatch('Body is empty. Expected {"requests": [...]}.', where=ROOT)
        document = _parse_document(body, min(MAX_BODY_JSON_DEPTH + 4, MAX_JSON_DEPTH))
        requests = _requests(document)
        reader = _Reader(self.limits, root)
        items = tuple(reader.item(value, _child("/requests", n)) for n, value in enumerate(requests))
        keep_going = continue_on_error is not False
        graph = GraphBatch(
            items=items,
            sequential=False,
            on_failure=FailurePolicy.DEPENDENTS if keep_going else FailurePolicy.STOP,
            resolver=resolve_references,
            where=ROOT,
        )
        return ODataJsonBatch(graph, dict(reader.group_of), keep_going)

    def encode(self, batch: ODataJsonBatch, result: GraphResult) -> bytes:
        """`{"responses": [...]}` in the request's order, each with id, status, lower-case headers,
        body and (for members of an atomicity group) `atomicityGroup`."""
        return b"".join(self.encode_chunks(batch, result))

    def encode_chunks(self, batch: ODataJsonBatch, result: GraphResult) -> Iterator[bytes]:
        """The same bytes as `encode`, one response at a time, in ~64 KiB chunks."""
        failed_groups = _failed_groups(batch, result)
        return iter_answer("responses", (
            _response(item_id, outcome, batch.groups.get(item_id), failed_groups)
            for item_id, outcome in result.items
        ))


# --- decoding ----------------------------------------------------------------------------------


def _requests(document: object) -> list[object]:
    if not isinstance(document, dict):
        raise MalformedBatch(f'A JSON batch must be an object {{"requests": [...]}}; got {_show(document)}.',
                             where=ROOT)
    for key in document:
        if key != "requests" and not key.startswith("@"):  # annotations are allowed, and ignored
            raise MalformedBatch(f'Unknown key {_show(key)}: a JSON batch takes "requests" and '
                                 "annotations only.", where=_child(ROOT, key))
    requests = document.get("requests")
    if not isinstance(requests, list):
        shown = "nothing" if requests is None else _show(requests)
        raise MalformedBatch(f'"requests" must be an array of request objects; got {shown}.',
                             where="/requests")
    if not requests:
        raise MalformedBatch('"requests" is empty: a batch needs at least one request.', where="/requests")
    return requests


class _Reader:
    """Reads request objects in order, checking ids, groups and dependencies against the earlier ones."""

    def __init__(self, limits: BatchLimits, root: ServiceRoot) -> None:
        self.limits = limits
        self.root = root
        self.ids: set[str] = set()
        self.group_of: dict[str, str] = {}
        self.members: dict[str, list[str]] = {}
        self.closed_groups: set[str] = set()
        self.last_group: str | None = None

    def item(self, value: object, where: str) -> GraphItem:
        if len(self.ids) >= self.limits.max_items:
            raise PayloadTooLarge(
                f"Too many requests. Maximum number of requests is {self.limits.max_items}.",
                where=where, limit="batch.odata.max_items",
            )
        if not isinstance(value, dict):
            raise MalformedBatch(f"A request must be an object; got {_show(value)}.", where=where)
        unknown = next((key for key in value if key not in REQUEST_KEYS), None)
        if unknown is not None:
            hint = ' (conditions, "if", are not supported)' if unknown == "if" else ""
            raise MalformedBatch(
                f"Unknown key {_show(unknown)}{hint}: a request takes "
                + ", ".join(f'"{key}"' for key in REQUEST_KEYS) + ".",
                where=_child(where, unknown),
            )
        item_id = self._id(value.get("id"), _child(where, "id"))
        group = self._group(value.get("atomicityGroup"), item_id, _child(where, "atomicityGroup"))
        depends_on = self._depends_on(value.get("dependsOn"), group, _child(where, "dependsOn"))
        request = self._request(value, item_id, where)
        has_references = self._check_references(request, depends_on, where)
        self.ids.add(item_id)
        if group is not None:
            self.group_of[item_id] = group
            self.members.setdefault(group, []).append(item_id)
        return GraphItem(item_id, request, tuple(depends_on), group, has_references)

    def _id(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise MalformedBatch(f'"id" must be a string; got {_shown(value)}.', where=where)
        check_request_id(value, '"id"', where)
        if value in self.ids:
            detail = f'Duplicate "id" {_show(value)}: ids are unique within a batch.'
            raise MalformedBatch(detail, where=where)
        if value in self.members:
            detail = f'"id" {_show(value)} is already the name of an atomicityGroup.'
            raise MalformedBatch(detail, where=where)
        return value

    def _group(self, value: object, item_id: str, where: str) -> str | None:
        if value is None:
            self._leave_group()
            return None
        if not isinstance(value, str):
            raise MalformedBatch(f'"atomicityGroup" must be a string; got {_show(value)}.', where=where)
        check_request_id(value, '"atomicityGroup"', where)
        if value in self.ids or value == item_id:
            detail = f'"atomicityGroup" {_show(value)} is already the id of a request.'
            raise MalformedBatch(detail, where=where)
        if value != self.last_group:
            self._leave_group()
        if value in self.closed_groups:
            raise MalformedBatch(
                f'The members of atomicityGroup {_show(value)} must be adjacent in "requests"; '
                f"this one follows other requests after its group ended.",
                where=where,
            )
        self.last_group = value
        return value

    def _leave_group(self) -> None:
        if self.last_group is not None:
            self.closed_groups.add(self.last_group)
        self.last_group = None

    def _depends_on(self, value: object, group: str | None, where: str) -> list[str]:
        """The earlier ids this request waits for (a group stands for all its members)."""
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            raise MalformedBatch(f'"dependsOn" must be an array of ids or atomicityGroup names; '
                                 f"got {_show(value)}.", where=where)
        ids: list[str] = []
        for n, name in enumerate(value):
            ids += self._dependency(name, group, _child(where, n))
        return list(dict.fromkeys(ids))

    def _dependency(self, name: str, group: str | None, where: str) -> list[str]:
        if name in self.members and name != group:
            return list(self.members[name])
        if name in self.ids:
            other = self.group_of.get(name)
            if other is not None and other != group:
                raise MalformedBatch(
                    f'Request {_show(name)} belongs to atomicityGroup {_show(other)}: a request '
                    f'outside that group must name the group in "dependsOn" (§19.1).',
                    where=where,
                )
            return [name]
        if name == group:
            raise MalformedBatch(f'A request cannot depend on its own atomicityGroup {_show(name)}.',
                                 where=where)
        raise MalformedBatch(
            f'"dependsOn" names {_show(name)}, which is no earlier request id or atomicityGroup '
            "(forward references are not allowed).",
            where=where,
        )

    def _request(self, value: dict[str, object], item_id: str, where: str) -> SubRequest:
        method = _method(value.get("method"), _child(where, "method"))
        url = value.get("url")
        if not isinstance(url, str):
            raise MalformedBatch(f'"url" must be a string; got {_shown(url)}.', where=_child(where, "url"))
        headers = _headers(value.get("headers"), _child(where, "headers"), self.limits)
        body, headers = _body(value.get("body"), method, headers, _child(where, "body"))
        target = self._target(url, _child(where, "url"))
        return SubRequest(method, target, headers, body, where=where, content_id=item_id)

    def _target(self, url: str, where: str) -> str:
        reference = reference_of(url)
        if reference is None:
            return gateway_target(url, self.root, where)
        name, rest = reference
        if name not in self.ids:
            raise MalformedBatch(f"The URL refers to ${name}, which is no earlier request id.", where=where)
        if any(ch in rest for ch in " \r\n\x00#"):
            raise MalformedBatch("the request URL holds a space, a control character or a fragment",
                                 where=where)
        return url

    def _check_references(self, request: SubRequest, depends_on: list[str], where: str) -> bool:
        names = etag_references(request)
        reference = reference_of(request.target)
        if reference is not None:
            names.append(reference[0])
        for name in names:
            if name not in depends_on:
                raise MalformedBatch(
                    f'${name} refers to request {_show(name)}, which is not in "dependsOn" '
                    "(directly or through its atomicityGroup).",
                    where=where,
                )
        return bool(names)


def _method(value: object, where: str) -> str:
    if not isinstance(value, str) or value.upper() not in METHODS:
        detail = f'"method" must be one of delete, get, patch, post, put; got {_shown(value)}.'
        raise MalformedBatch(detail, where=where)
    return value.upper()


def _headers(value: object, where: str, limits: BatchLimits) -> Headers:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise MalformedBatch(f'"headers" must be an object of header name to string; got {_show(value)}.',
                             where=where)
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for name, text in value.items():
        pairs.append(_header(name, text, seen, _child(where, name)))
    if len(pairs) > limits.max_part_headers:
        raise HeadersTooLarge(f"Too many headers. Maximum number of headers is {limits.max_part_headers}.",
                              where=where, limit="limits.max_part_headers")
    size = sum(len(name) + len(text.encode("utf-8", "replace")) + 4 for name, text in pairs)
    if size > limits.max_part_header_bytes:
        raise HeadersTooLarge(f"Headers too large. Maximum size is {limits.max_part_header_bytes} bytes.",
                              where=where, limit="limits.max_part_header_bytes")
    return tuple(pairs)


def _header(name: str, value: object, seen: set[str], where: str) -> tuple[str, str]:
    if not _TOKEN.fullmatch(name):
        raise MalformedBatch(f"Header name {_show(name)} is not an HTTP token.", where=where)
    if name.lower() in seen:
        raise MalformedBatch(f"Header {name} appears twice (names are case-insensitive).", where=where)
    seen.add(name.lower())
    if name.lower() in _FRAMING_HEADERS:
        detail = f"Header {name} is not allowed: the gateway frames the body itself."
        raise MalformedBatch(detail, where=where)
    if not isinstance(value, str):
        raise MalformedBatch(f"Header {name} must be a string; got {_show(value)}.", where=where)
    if any(ch in _CONTROL for ch in value) or not _is_utf8(value):
        raise MalformedBatch(f"Header {name} must not contain CR, LF, NUL or unpaired surrogates.",
                             where=where)
    return name, value


def _body(value: object, method: str, headers: Headers, where: str) -> tuple[bytes | None, Headers]:
    """The body bytes by the request's Content-Type (§19.1): JSON for JSON types, a string for
    text/*, base64url for anything else; no Content-Type means JSON."""
    if value is None:
        return None, headers
    if method in _BODILESS:
        raise MalformedBatch(f'A {method.lower()} request must not have a "body".', where=where)
    media_type, _ = _content_type(headers)
    if media_type is None:
        headers += (("Content-Type", "application/json"),)
        media_type = "application/json"
    if _is_json_type(media_type):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if not _is_utf8(text):
            raise MalformedBatch("body holds an unpaired UTF-16 surrogate escape.", where=where)
        return text.encode("utf-8"), headers
    if not isinstance(value, str):
        raise MalformedBatch(f'For Content-Type {media_type} "body" must be a string '
                             f"({'text' if media_type.startswith('text/') else 'base64url'}); "
                             f"got {_show(value)}.", where=where)
    if media_type.startswith("text/"):
        if not _is_utf8(value):
            raise MalformedBatch("body holds an unpaired UTF-16 surrogate escape.", where=where)
        return value.encode("utf-8"), headers
    return _base64url(value, where), headers


def _base64url(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise MalformedBatch("body is not valid base64url (the encoding for this Content-Type).",
                             where=where) from None


def _shown(value: object) -> str:
    return "nothing" if value is None else _show(value)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- encoding ----------------------------------------------------------------------------------


def _failed_groups(batch: ODataJsonBatch, result: GraphResult) -> dict[str, tuple[str | None, str]]:
    """Group name -> (the member that failed it, why), for every atomicity group that did not
    commit; the culprit keeps its own answer, the other members answer 424."""
    outcomes = dict(result.groups)
    by_id = dict(result.items)
    failed: dict[str, tuple[str | None, str]] = {}
    for group in dict.fromkeys(batch.groups.values()):
        members = [item_id for item_id, name in batch.groups.items() if name == group]
        culprit = next((m for m in members if _culprit(by_id.get(m))), None)
        outcome = outcomes.get(group)
        if culprit is None and outcome in (None, BatchOutcome.COMMITTED) and not any(
            _undone(by_id.get(m)) for m in members
        ):
            continue
        why = f"request {culprit} failed" if culprit is not None else "the group did not commit"
        if outcome is BatchOutcome.ROLLBACK_INCOMPLETE:
            why += "; its rollback is incomplete"
        failed[group] = (culprit, why)
    return failed


def _culprit(outcome: ItemResult | Unmet | None) -> bool:
    """Did this member fail on its own (an error status, no answer, not sent)?"""
    if isinstance(outcome, ItemResult):
        return outcome.failed
    return outcome is not None


def _undone(outcome: ItemResult | Unmet | None) -> bool:
    return isinstance(outcome, ItemResult) and (
        isinstance(outcome.outcome, Skipped)
        or outcome.rollback in (RollbackStatus.ROLLED_BACK, RollbackStatus.ROLLBACK_FAILED)
    )


def _response(
    item_id: str,
    outcome: ItemResult | Unmet,
    group: str | None,
    failed_groups: dict[str, tuple[str | None, str]],
) -> dict[str, object]:
    failure = failed_groups.get(group) if group is not None else None
    if failure is not None and failure[0] != item_id:
        fields = _group_member(outcome, str(group), failure[1])
    elif isinstance(outcome, Unmet):
        fields = _unmet(outcome)
    else:
        fields = _result(outcome)
    answer: dict[str, object] = {"id": item_id, **fields}
    if group is not None:
        answer["atomicityGroup"] = group
    return answer


def _group_member(outcome: ItemResult | Unmet, group: str, why: str) -> dict[str, object]:
    """A member of a failed group that did not fail it: 424, and what became of it."""
    if isinstance(outcome, Unmet):
        status, detail = RollbackStatus.SKIPPED, None
    else:
        status = outcome.rollback or (
            RollbackStatus.SKIPPED if isinstance(outcome.outcome, Skipped) else RollbackStatus.ROLLED_BACK
        )
        detail = outcome.rollback_detail
    done = {
        RollbackStatus.ROLLED_BACK: "its change was rolled back",
        RollbackStatus.ROLLBACK_FAILED: "its change could NOT be rolled back",
        RollbackStatus.SKIPPED: "it was not executed",
    }.get(status, "it did not take effect")
    message = f"atomicityGroup {group} failed ({why}): {done}"
    if detail:
        message += f" ({detail})"
    return _error(424, message, status.value)


def _unmet(unmet: Unmet) -> dict[str, object]:
    if unmet.unresolved:
        return _error(400, unmet.reason, None, code="UnresolvedReference")
    return _error(424, unmet.reason, None)


def _result(result: ItemResult) -> dict[str, object]:
    outcome = result.outcome
    rollback = result.rollback.value if result.rollback not in (None, RollbackStatus.EXECUTED) else None
    if isinstance(outcome, CallFailure):
        return _error(outcome.status, outcome.reason, rollback)
    if isinstance(outcome, Skipped):
        return _error(424, outcome.reason, rollback)
    fields = _response_fields(outcome)
    if rollback is not None:
        fields["headers"] = {**_lower_headers(outcome.headers), "x-batch-item-status": rollback}
    return fields


def _response_fields(response: SubResponse) -> dict[str, object]:
    headers = _lower_headers(response.headers)
    fields: dict[str, object] = {"status": response.status, "headers": headers}
    if response.body:
        fields["body"] = _encoded_body(response.body, response.headers)
    return fields


def _lower_headers(headers: Headers) -> dict[str, str]:
    """Lower-case name -> value (§19.5); a repeated header's values joined by ", "."""
    grouped: dict[str, list[str]] = {}
    for name, value in without_hop_by_hop(headers):
        if name.lower() != "content-length":
            grouped.setdefault(name.lower(), []).append(value)
    return {name: ", ".join(values) for name, values in grouped.items()}


def _encoded_body(body: bytes, headers: Headers) -> object:
    """JSON for a JSON media type whose bytes parse; a string for text/*; else base64url."""
    media_type, charset = _content_type(headers)
    if media_type is None or _is_json_type(media_type):
        value = _json_body(body)
        if value is not _MISSING_BODY:
            return value
    textual = media_type is None or media_type.startswith("text/")
    if textual and charset in (None, "utf-8", "utf8", "us-ascii"):
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return Base64Body(body, urlsafe=True)


def _error(
    status: int, message: str, item_status: str | None, *, code: str | None = None
) -> dict[str, object]:
    headers: dict[str, str] = {"content-type": "application/json"}
    if item_status is not None:
        headers["x-batch-item-status"] = item_status
    error = {"code": code or error_code(status), "message": message}
    return {"status": status, "headers": headers, "body": {"error": error}}


def _dump(document: dict[str, object]) -> bytes:
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode("utf-8")


