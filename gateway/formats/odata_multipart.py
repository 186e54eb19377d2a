"""The OData multipart `$batch` (protocol §11.7.7; V2 as pyodata speaks it): change sets, Content-IDs,
`$<Content-ID>` references, versions; MIME framing from `multipart_batch`, each request via `_http1`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from gateway.errors import ClientError, MalformedBatch, PayloadTooLarge, UnsupportedMediaType
from gateway.formats._http1 import HeadLimits, header_block, one_line, parse_request, response_pieces
from gateway.formats._json_results import _json_body
from gateway.formats._odata import (
    ETAG_HEADERS,
    ServiceRoot,
    error_code,
    error_document,
    gateway_target,
    reference_of,
    resolve_references,
)
from gateway.formats._strict_json import _MISSING
from gateway.formats.multipart_batch import (
    _boundary_of,
    _single,
    _split_part_headers,
    _split_parts,
)
from gateway.graph_model import FailurePolicy, GraphBatch, GraphItem, GraphResult, Unmet
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

__all__ = ["MEDIA_TYPE", "ODataMultipartBatch", "ODataMultipartCodec", "odata_version"]

MEDIA_TYPE = "multipart/mixed"
DEFAULT_LIMITS = BatchLimits(max_items=100)
_BATCH = "body"
_UNDONE = (RollbackStatus.ROLLED_BACK, RollbackStatus.ROLLBACK_FAILED)
_TRANSFER_ENCODINGS = frozenset({"binary", "7bit", "8bit"})
_DROPPED_REQUEST_HEADERS = frozenset({"host", "content-id"})
"""The embedded request's Host names the service (the gateway routes by path); a Content-ID there
(where V2/V3 clients sometimes put it) is the part's, not a header to forward."""

Part = tuple[bytes, ...]
"""A part of the answer as pieces whose concatenation is its bytes (an upstream body one of them)."""


def odata_version(
    odata: str | None, odata_max: str | None, data_service: str | None, max_data_service: str | None
) -> int:
    """4 when the request says OData-Version 4.x (or only OData-MaxVersion 4.x and no V2 header),
    else 2: pyodata and other V2 clients send DataServiceVersion / MaxDataServiceVersion."""
    if odata is not None and odata.strip().startswith("4"):
        return 4
    if data_service is None and max_data_service is None and (odata_max or "").strip().startswith("4"):
        return 4
    return 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One top-level part of the request: a single request, or a change set of several."""

    ids: tuple[str, ...]
    content_ids: tuple[str | None, ...]
    """The request parts' Content-ID values as sent, echoed on their answers."""
    changeset: str | None = None
    """The atomic group name of a change set (None: a single request)."""


@dataclass(frozen=True, slots=True)
class ODataMultipartBatch:
    """A decoded multipart batch: the graph to run, the part structure to answer in, the version."""

    graph: GraphBatch
    entries: tuple[Entry, ...]
    version: int
    continue_on_error: bool


class ODataMultipartCodec:
    """Decode an OData multipart `$batch` into the graph model and encode its results back."""

    def __init__(self, limits: BatchLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._head_limits = HeadLimits(limits.max_part_headers, limits.max_part_header_bytes)

    def decode(
        self,
        body: bytes,
        content_type: str,
        root: ServiceRoot,
        *,
        version: int = 4,
        continue_on_error: bool | None = None,
    ) -> ODataMultipartBatch:
        """Parse a whole batch strictly; any problem raises a ClientError naming the part.

        V4: processing stops at the first error unless `continue_on_error`; every request of a
        change set has a Content-ID, unique in the batch. V2: every part is answered (a failed
        one stops only what refers to it) and Content-IDs are optional, unique per change set.
        """
        boundary = _boundary_of(content_type)
        if len(body) > self.limits.max_body_bytes:
            raise PayloadTooLarge(
                f"The batch is {len(body)} bytes. Maximum body size is {self.limits.max_body_bytes} bytes.",
                where=_BATCH, limit="limits.max_body_bytes",
            )
        reader = _Reader(self, root, version)
        for n, part in enumerate(_split_parts(body, boundary, self.limits.max_items), 1):
            reader.part(part, n)
        keep_going = continue_on_error if version == 4 and continue_on_error is not None else version == 2
        graph = GraphBatch(
            items=tuple(reader.items),
            sequential=True,
            on_failure=FailurePolicy.DEPENDENTS if keep_going else FailurePolicy.STOP,
            resolver=resolve_references,
            where=_BATCH,
        )
        return ODataMultipartBatch(graph, tuple(reader.entries), version, keep_going)

    def encode(self, batch: ODataMultipartBatch, result: GraphResult) -> tuple[bytes, str]:
        """The multipart/mixed answer and its Content-Type: one part per request part, in order; a
        change set as a nested multipart, or as ONE error part when it failed. V4 without
        continue-on-error ends with the part that failed (what was not processed is left out)."""
        chunks, content_type = self.encode_chunks(batch, result)
        return b"".join(chunks), content_type

    def encode_chunks(
        self, batch: ODataMultipartBatch, result: GraphResult
    ) -> tuple[Iterator[bytes], str]:
        """`encode` in ~64 KiB chunks: every part is made of pieces that refer to the upstream
        bodies (never copied), the boundary is checked against all of them, then they are framed."""
        by_id = dict(result.items)
        outcomes = dict(result.groups)
        v2 = batch.version == 2
        parts: list[Part] = []
        for entry in batch.entries:
            if all(_not_processed(by_id.get(item_id)) for item_id in entry.ids):
                break
            if entry.changeset is None:
                part, failed = _single_part(entry, by_id, v2)
            else:
                part, failed = _changeset_part(entry, by_id, outcomes.get(entry.changeset), v2)
            parts.append(part)
            if failed and not batch.continue_on_error:
                break
        boundary = _boundary_for(parts, "batchresponse_")
        return _coalesced(_framed(parts, boundary)), f"multipart/mixed; boundary={boundary}"


# --- decoding ----------------------------------------------------------------------------------


@dataclass
class _Reader:
    """Reads the parts in order, numbering items and resolving Content-ID references."""

    codec: ODataMultipartCodec
    root: ServiceRoot
    version: int
    items: list[GraphItem] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    used_ids: set[str] = field(default_factory=set)
    content_ids: dict[str, str] = field(default_factory=dict)
    """Content-ID -> item id, of every earlier request (the latest of a repeated V2 Content-ID)."""

    def part(self, data: bytes, n: int) -> None:
        where = f"part {n}"
        fields, rest = _split_part_headers(data, self.codec.limits, where)
        media, content_type = _media_type(fields, where)
        if media == "multipart/mixed":
            self._changeset(fields, content_type, rest, n)
            return
        item, content_id = self._request(fields, rest, where, f"part{n}", group=None, local={})
        self.entries.append(Entry((item.id,), (content_id,)))

    def _changeset(self, fields: list[tuple[str, str]], content_type: str, data: bytes, n: int) -> None:
        where = f"part {n}"
        _check_transfer_encoding(fields, where)
        try:
            boundary = _boundary_of(content_type)
        except ClientError as exc:
            raise MalformedBatch(f"change set: {exc.detail}", where=f"{where} Content-Type") from None
        room = self.codec.limits.max_items - len(self.items)
        try:
            inner = _split_parts(data, boundary, max(room, 0))
        except PayloadTooLarge:
            raise PayloadTooLarge(
                f"Too many requests. Maximum number of requests is {self.codec.limits.max_items}.",
                where=where, limit="batch.odata.max_items",
            ) from None
        except ClientError as exc:
            raise MalformedBatch(f"change set: {exc.detail}", where=where) from None
        group = f"changeset-{n}"
        local: dict[str, str] = {}
        ids: list[str] = []
        content_ids: list[str | None] = []
        for m, part in enumerate(inner, 1):
            part_where = f"part {n}.{m}"
            part_fields, rest = _split_part_headers(part, self.codec.limits, part_where)
            media, _ = _media_type(part_fields, part_where)
            if media == "multipart/mixed":
                raise MalformedBatch("change sets cannot be nested in change sets", where=part_where)
            item, content_id = self._request(part_fields, rest, part_where, f"part{n}.{m}", group, local)
            ids.append(item.id)
            content_ids.append(content_id)
        self.entries.append(Entry(tuple(ids), tuple(content_ids), group))

    def _request(
        self,
        fields: list[tuple[str, str]],
        data: bytes,
        where: str,
        fallback_id: str,
        group: str | None,
        local: dict[str, str],
    ) -> tuple[GraphItem, str | None]:
        if len(self.items) >= self.codec.limits.max_items:
            raise PayloadTooLarge(
                f"Too many requests. Maximum number of requests is {self.codec.limits.max_items}.",
                where=where, limit="batch.odata.max_items",
            )
        _check_transfer_encoding(fields, where)
        method, raw_target, headers, body = _parse_http(data, self.codec, where)
        content_id = _single(fields, "content-id", where) or _header_value(headers, "content-id", where)
        bare = _bare(content_id, where) if content_id is not None else None
        if bare is None and group is not None and self.version == 4:
            raise MalformedBatch("a request in a change set needs a Content-ID (OData 4.0)", where=where)
        self._check_unique(bare, local, where)
        depends_on: list[str] = []
        target = self._target(raw_target, local, depends_on, where)
        headers = tuple(
            self._etag(name, value, local, depends_on, where)
            for name, value in headers
            if name.lower() not in _DROPPED_REQUEST_HEADERS
        )
        item_id = self._new_id(bare, fallback_id)
        payload = body if body.strip(b"\r\n") else None
        request = SubRequest(method, target, headers, payload, where=where, content_id=bare)
        item = GraphItem(item_id, request, tuple(dict.fromkeys(depends_on)), group, bool(depends_on))
        self.items.append(item)
        if bare is not None:
            self.content_ids[bare] = item_id
            if group is not None:
                local[bare] = item_id
        return item, content_id

    def _check_unique(self, bare: str | None, local: dict[str, str], where: str) -> None:
        if bare is None:
            return
        if bare in local or (self.version == 4 and bare in self.content_ids):
            scope = "the change set" if self.version == 2 else "the batch"
            raise MalformedBatch(f"Content-ID {bare!r} is used twice in {scope}", where=where)

    def _new_id(self, bare: str | None, fallback: str) -> str:
        item_id = bare if bare is not None and bare not in self.used_ids else fallback
        while item_id in self.used_ids:
            item_id += "_"
        self.used_ids.add(item_id)
        return item_id

    def _referenced(self, name: str, local: dict[str, str], where: str) -> str:
        item_id = local.get(name, self.content_ids.get(name))
        if item_id is None:
            raise MalformedBatch(
                f"${name} refers to no earlier request (no earlier part has Content-ID {name!r})",
                where=where,
            )
        return item_id

    def _target(self, raw: str, local: dict[str, str], depends_on: list[str], where: str) -> str:
        reference = reference_of(raw)
        if reference is None:
            return gateway_target(raw, self.root, where)
        name, rest = reference
        item_id = self._referenced(name, local, where)
        depends_on.append(item_id)
        return f"${item_id}{rest}"

    def _etag(
        self, name: str, value: str, local: dict[str, str], depends_on: list[str], where: str
    ) -> tuple[str, str]:
        if name.lower() not in ETAG_HEADERS or not value.strip().startswith("$"):
            return name, value
        item_id = self._referenced(value.strip()[1:], local, where)
        depends_on.append(item_id)
        return name, f"${item_id}"


def _media_type(fields: list[tuple[str, str]], where: str) -> tuple[str, str]:
    content_type = _single(fields, "content-type", where)
    if content_type is None:
        raise MalformedBatch("the part has no Content-Type (application/http or multipart/mixed)",
                             where=where)
    media = content_type.partition(";")[0].strip().lower()
    if media not in ("application/http", "multipart/mixed"):
        raise UnsupportedMediaType(
            f"a part must be application/http (a request) or multipart/mixed (a change set), "
            f"not {media!r}",
            where=where,
        )
    return media, content_type


def _check_transfer_encoding(fields: list[tuple[str, str]], where: str) -> None:
    encoding = _single(fields, "content-transfer-encoding", where)
    if encoding is not None and encoding.strip().lower() not in _TRANSFER_ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Transfer-Encoding {encoding[:40]!r} is not supported (binary only)", where=where
        )


def _bare(content_id: str, where: str) -> str:
    value = content_id.strip()
    bare = value[1:-1] if value[:1] == "<" and value[-1:] == ">" else value
    if not bare.strip() or any(ch in bare for ch in " /?$\t"):
        raise MalformedBatch(f"invalid Content-ID {content_id[:60]!r}", where=where)
    return bare


def _header_value(headers: Headers, name: str, where: str) -> str | None:
    values = [value for key, value in headers if key.lower() == name]
    if len(values) > 1:
        raise MalformedBatch(f"the request has more than one {name} header", where=where)
    return values[0] if values else None


def _parse_http(data: bytes, codec: ODataMultipartCodec, where: str) -> tuple[str, str, Headers, bytes]:
    """Method, request URL as written, headers and body of one embedded request.

    The request line is read here (an OData URL may be relative, `Customers(1)`, or a reference,
    `$1/Orders`; the spec's own example leaves out the HTTP version); the rest goes through h11
    with the URL set aside.
    """
    stripped = data.lstrip(b"\r\n")
    line_end = stripped.find(b"\n")
    line = (stripped if line_end == -1 else stripped[:line_end]).removesuffix(b"\r")
    rest = b"" if line_end == -1 else stripped[line_end + 1 :]
    words = line.split(b" ")
    if len(words) == 2:  # `GET /service/Customers('ALFKI')`: HTTP/1.1 is meant
        words.append(b"HTTP/1.1")
    if len(words) != 3 or not all(words):
        raise MalformedBatch(
            f"invalid request line {line[:80].decode('latin-1')!r}: expected METHOD URL HTTP/1.1",
            where=where,
        )
    method, target, version = words
    try:
        url = target.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedBatch("the request URL must be ASCII (percent-encode the rest)", where=where) from None
    parsed = parse_request(method + b" / " + version + b"\r\n" + rest, codec._head_limits, where)
    return parsed.method, url, parsed.headers, parsed.body


# --- encoding ----------------------------------------------------------------------------------


def _not_processed(outcome: ItemResult | Unmet | None) -> bool:
    """Left out of a stopped batch: never started because an earlier part failed."""
    return outcome is None or (
        isinstance(outcome, Unmet) and outcome.dependency is None and not outcome.unresolved
    )


def _failed(outcome: ItemResult | Unmet | None) -> bool:
    if isinstance(outcome, ItemResult):
        return outcome.failed or isinstance(outcome.outcome, Skipped)
    return True


def _single_part(entry: Entry, by_id: dict[str, ItemResult | Unmet], v2: bool) -> tuple[Part, bool]:
    outcome = by_id.get(entry.ids[0])
    return _part(_http_answer(outcome, v2), entry.content_ids[0]), _failed(outcome)


def _changeset_part(
    entry: Entry, by_id: dict[str, ItemResult | Unmet], outcome: BatchOutcome | None, v2: bool
) -> tuple[Part, bool]:
    results = [by_id.get(item_id) for item_id in entry.ids]
    culprit = next((n for n, result in enumerate(results) if _failed(result)), None)
    undone = any(isinstance(r, ItemResult) and r.rollback in _UNDONE for r in results)
    if culprit is None and outcome in (None, BatchOutcome.COMMITTED) and not undone:
        inner = [_part(_http_answer(r, v2), cid) for r, cid in zip(results, entry.content_ids, strict=True)]
        boundary = _boundary_for(inner, "changesetresponse_")
        head = header_block([f"Content-Type: multipart/mixed; boundary={boundary}"])
        return (head, *_framed(inner, boundary)), False
    return _changeset_error(entry, results, culprit, outcome, v2), True


def _changeset_error(
    entry: Entry,
    results: list[ItemResult | Unmet | None],
    culprit: int | None,
    outcome: BatchOutcome | None,
    v2: bool,
) -> Part:
    """The ONE part a failed change set answers with: an OData error with the failing request's
    status, saying what failed and what became of the others."""
    incomplete = outcome is BatchOutcome.ROLLBACK_INCOMPLETE or any(
        isinstance(r, ItemResult) and r.rollback is RollbackStatus.ROLLBACK_FAILED for r in results
    )
    fate = "its rollback is INCOMPLETE" if incomplete else "none of its changes took effect"
    if culprit is None:
        status, what, inner = 500, "the change set did not commit", None
        content_id = None
    else:
        failing = results[culprit]
        status, what, inner = _failure_facts(failing)
        label = entry.content_ids[culprit] or f"request {culprit + 1}"
        what = f"{label} failed: {what}"
        content_id = entry.content_ids[culprit]
    message = f"change set failed ({what}); {fate}"
    document = json.loads(error_document(error_code(status), message, v2=v2))
    if inner is not None:
        document["error"]["innererror"] = inner
    body = json.dumps(document, ensure_ascii=False).encode("utf-8", "replace")
    http = response_pieces(status, "", (("Content-Type", "application/json"),), body)
    state = BatchOutcome.ROLLBACK_INCOMPLETE if incomplete else BatchOutcome.ROLLED_BACK
    return _part(http, content_id, (f"X-Batch-Outcome: {state.value}",))


def _failure_facts(failing: ItemResult | Unmet | None) -> tuple[int, str, object]:
    """Status, a short account and the upstream's own answer (for `innererror`) of the culprit."""
    if isinstance(failing, Unmet):
        return (400 if failing.unresolved else 424), failing.reason, None
    if failing is None:
        return 424, "not executed", None
    outcome = failing.outcome
    if isinstance(outcome, CallFailure):
        return outcome.status, outcome.reason, None
    if isinstance(outcome, Skipped):
        return 424, outcome.reason, None
    inner: dict[str, object] = {"status": outcome.status}
    body = _json_body(outcome.body) if outcome.body else None
    if body is not _MISSING and body is not None:
        inner["body"] = body
    elif outcome.body:
        inner["body"] = outcome.body.decode("utf-8", "replace")[:4096]
    return outcome.status, f"the upstream answered {outcome.status}", inner


def _http_answer(outcome: ItemResult | Unmet | None, v2: bool) -> Part:
    if isinstance(outcome, ItemResult):
        result = outcome.outcome
        if isinstance(result, SubResponse):
            return response_pieces(result.status, result.reason, result.headers, result.body)
        if isinstance(result, CallFailure):
            return _error_response(result.status, result.reason, v2)
        return _error_response(424, result.reason, v2)
    if isinstance(outcome, Unmet):
        if outcome.unresolved:
            return _error_response(400, outcome.reason, v2, code="UnresolvedReference")
        return _error_response(424, outcome.reason, v2)
    return _error_response(424, "not executed", v2)


def _error_response(status: int, message: str, v2: bool, *, code: str | None = None) -> Part:
    body = error_document(code or error_code(status), message, v2=v2)
    return response_pieces(status, "", (("Content-Type", "application/json"),), body)


def _part(http: Part, content_id: str | None, extra: Iterable[str] = ()) -> Part:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        lines.append(f"Content-ID: {one_line(content_id)}")
    lines += extra
    return (header_block(lines), *http)


def _boundary_for(parts: list[Part], prefix: str) -> str:
    """A boundary whose delimiter occurs in no piece (a piece of headers ends with CRLF CRLF, so
    the delimiter cannot straddle two pieces)."""
    while True:
        boundary = prefix + secrets.token_hex(16)
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in piece for part in parts for piece in part):
            return boundary


def _framed(parts: list[Part], boundary: str) -> Part:
    dash = b"--" + boundary.encode("ascii")
    framed: list[bytes] = []
    for part in parts:
        framed += (dash + b"\r\n", *part, b"\r\n")
    framed.append(dash + b"--\r\n")
    return tuple(framed)


_CHUNK = 64 * 1024


def _coalesced(pieces: Part) -> Iterator[bytes]:
    """Small pieces joined up to ~64 KiB; a big one (an upstream body) goes out on its own, uncopied."""
    pending: list[bytes] = []
    size = 0
    for piece in pieces:
        if len(piece) >= _CHUNK:
            if pending:
                yield b"".join(pending)
                pending, size = [], 0
            yield piece
            continue
        pending.append(piece)
        size += len(piece)
        if size >= _CHUNK:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)
