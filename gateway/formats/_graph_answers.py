"""What the Graph and Salesforce Composite codecs share when they answer: which items stand for
themselves and which for a failed atomic group, header maps and body renderings; pure, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from gateway.formats._json_results import _content_type, _is_json_type, _json_body
from gateway.formats._strict_json import _MISSING
from gateway.graph_model import GraphBatch, GraphResult, Unmet
from gateway.headers import without_hop_by_hop
from gateway.model import BatchOutcome, Headers, ItemResult, RollbackStatus, Skipped

ITEM_STATUS_HEADER = "X-Batch-Item-Status"
"""Set on an item's answer in an atomic batch when its change did not stay: `rolled_back`,
`rollback_failed`, `skipped` or `failed` (the values of RollbackStatus)."""
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


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
    (UTF-8 text as a string, anything else base64)."""
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
    return base64.b64encode(body).decode("ascii")


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
