"""What the two OData `$batch` codecs share: request URLs to gateway targets, `$<id>` references,
the `continue-on-error` preference, request ids and the OData error document; pure, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from yarl import URL

from gateway.errors import ForbiddenTarget, GatewayError, MalformedBatch
from gateway.graph_model import AnsweredItem, GraphItem, ReferenceUnresolved
from gateway.model import SubRequest

SYSTEM_RESOURCES = frozenset(
    {"$batch", "$crossjoin", "$all", "$entity", "$root", "$id", "$metadata", "$count", "$value"}
)
"""`$`-segments that name an OData resource, never a request (protocol 4.01 §11.7.3.4)."""
REQUEST_ID = re.compile(r"[A-Za-z0-9._~-]+")
"""OData ABNF `request-id = 1*unreserved`: what an `id`, `atomicityGroup` or Content-ID may be."""
ETAG_HEADERS = frozenset({"if-match", "if-none-match"})
"""Headers whose whole value may be `$<id>`: the ETag of that request's answer."""
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")
_PREFERENCE = re.compile(r"\s*(?:odata\.)?continue-on-error\s*(?:=\s*\"?([A-Za-z]*)\"?)?\s*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ServiceRoot:
    """Where the batch was posted: relative request URLs resolve against `path` (the batch URL
    without its last segment), absolute ones are accepted only on one of `origins`."""

    path: str
    origins: frozenset[str] = frozenset()

    @classmethod
    def of(cls, batch_path: str, origins: Iterable[str] = ()) -> ServiceRoot:
        return cls(batch_path[: batch_path.rfind("/") + 1] or "/", frozenset(o.lower() for o in origins))


def reference_of(url: str) -> tuple[str, str] | None:
    """`($<name>, rest)` split as `name`, `rest` when the URL's first segment is a request reference
    (starts with `$` and is not a system resource); None otherwise."""
    if not url.startswith("$"):
        return None
    end = min((i for i in (url.find("/"), url.find("?")) if i != -1), default=len(url))
    if url[:end] in SYSTEM_RESOURCES:
        return None
    return url[1:end], url[end:]


def gateway_target(url: str, root: ServiceRoot, where: str) -> str:
    """A request URL that is not a reference, as a gateway target (origin-form path and query).

    Absolute URI: only on one of the service root's origins, which are stripped. Absolute path: as
    it is. Relative path: appended to the service root. Whether the target is allowed (routes, dot
    segments) is the planner's question.
    """
    if not url:
        raise MalformedBatch("the request URL is empty", where=where)
    if _UNSAFE.search(url):
        raise MalformedBatch(
            "the request URL holds a space or a control character; percent-encode it", where=where
        )
    if url.startswith("//"):
        raise ForbiddenTarget(f"the request URL must not be scheme-relative: {url[:80]!r}", where=where)
    if "#" in url:
        raise MalformedBatch(f"the request URL must not hold a fragment: {url[:80]!r}", where=where)
    if url.startswith("/"):
        return url
    if _SCHEME.match(url) and "://" in url:
        return _own_absolute(url, root, where)
    if _SCHEME.match(url.split("/", 1)[0]):  # `a:b` would read as a scheme
        raise MalformedBatch(
            f"a colon in the first segment of a relative URL must be percent-encoded: {url[:80]!r}",
            where=where,
        )
    return root.path + url


def _own_absolute(url: str, root: ServiceRoot, where: str) -> str:
    try:
        parsed = URL(url, encoded=True)
        origin = str(parsed.origin()).lower()
    except (ValueError, TypeError):
        raise ForbiddenTarget(f"the request URL {url[:80]!r} is not a valid URL", where=where) from None
    if parsed.user is not None or origin not in root.origins:
        raise ForbiddenTarget(
            f"the absolute request URL {url[:80]!r} does not point at this gateway "
            "(use a path relative to the service root)",
            where=where,
        )
    path = parsed.raw_path or "/"
    return path + (f"?{parsed.raw_query_string}" if parsed.raw_query_string else "")


def continue_on_error(prefer_values: Iterable[str]) -> bool | None:
    """The batch's `continue-on-error` preference (also spelled `odata.continue-on-error`):
    True or False when given, None when absent."""
    for value in prefer_values:
        for preference in value.split(","):
            match = _PREFERENCE.fullmatch(preference)
            if match is not None:
                return (match.group(1) or "true").lower() != "false"
    return None


def check_request_id(value: str, what: str, where: str) -> str:
    if not REQUEST_ID.fullmatch(value):
        raise MalformedBatch(
            f"{what} {value[:60]!r} must be 1 or more of the characters A-Z a-z 0-9 - . _ ~ "
            "(OData request-id)",
            where=where,
        )
    return value


# -- references ---------------------------------------------------------------------------------


def etag_references(request: SubRequest) -> list[str]:
    """The names of the requests whose ETag the request's If-Match / If-None-Match refer to."""
    return [
        value.strip()[1:]
        for name, value in request.headers
        if name.lower() in ETAG_HEADERS and value.strip().startswith("$")
    ]


def resolve_references(item: GraphItem, answered: Mapping[str, AnsweredItem]) -> SubRequest:
    """The item's request with `$<id>` replaced: as the URL's first segment by the `Location` of
    that request's answer (mapped into the gateway's routes), as a whole If-Match / If-None-Match
    value by its `ETag`. Raises ReferenceUnresolved when the answer has no such thing."""
    request = item.request
    target = request.target
    reference = reference_of(target)
    if reference is not None:
        name, rest = reference
        location = _answer(answered, name).location_target
        if location is None:
            raise ReferenceUnresolved(
                f"${name}: the answer to request {name} has no Location header that points into "
                "the gateway's routes"
            )
        target = _joined(location, rest)
    headers = tuple(_etag_resolved(name, value, answered) for name, value in request.headers)
    return replace(request, target=target, headers=headers)


def _answer(answered: Mapping[str, AnsweredItem], name: str) -> AnsweredItem:
    answer = answered.get(name)
    if answer is None:
        raise ReferenceUnresolved(f"${name}: request {name} has no answer to refer to")
    return answer


def _joined(location: str, rest: str) -> str:
    if not rest:
        return location
    path, question, query = location.partition("?")
    if rest.startswith("?"):
        return f"{path}?{query}&{rest[1:]}" if question and query else path + rest
    return path.rstrip("/") + rest + (f"?{query}" if question and query else "")


def _etag_resolved(name: str, value: str, answered: Mapping[str, AnsweredItem]) -> tuple[str, str]:
    stripped = value.strip()
    if name.lower() not in ETAG_HEADERS or not stripped.startswith("$"):
        return name, value
    reference = stripped[1:]
    etags = [v for k, v in _answer(answered, reference).response.headers if k.lower() == "etag"]
    if not etags:
        raise ReferenceUnresolved(f"{name}: ${reference}: the answer to request {reference} has no ETag")
    return name, etags[0]


# -- errors -------------------------------------------------------------------------------------

_CODES = {
    400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 408: "RequestTimeout",
    413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "UnprocessableEntity",
    424: "FailedDependency", 431: "RequestHeaderFieldsTooLarge", 500: "InternalServerError",
    502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout",
}


def error_code(status: int) -> str:
    return _CODES.get(status, "Error")


def error_document(code: str, message: str, target: str | None = None, *, v2: bool = False) -> bytes:
    """`{"error": {"code", "message", "target"}}` (OData JSON 4.01 §21); V2 spells the message
    `{"lang", "value"}`, as V2 clients read it."""
    error: dict[str, object] = {"code": code}
    error["message"] = {"lang": "en-US", "value": message} if v2 else message
    if target is not None:
        error["target"] = target
    return json.dumps({"error": error}, ensure_ascii=False).encode("utf-8", "replace")


def gateway_error_document(error: GatewayError, *, v2: bool = False) -> bytes:
    """A batch the gateway refused, in the OData error shape; the code is the problem type."""
    return error_document(error.type_suffix, error.detail, error.where, v2=v2)
