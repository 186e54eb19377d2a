"""The atomicity plan: for every call, a transaction, an undo (declared or inferred), or nothing (safe).

Decided before any call; a non-safe call with neither is rejected with 422 naming the sub-request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from gateway.atomicity.templates import TemplateError, match_path, render_path
from gateway.config import CompensationRule, GatewayConfig, Upstream
from gateway.errors import MixedCredentials, Uncompensable
from gateway.planning import BatchPlan, PlannedCall

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Strategy(str, Enum):
    SAFE = "safe"
    TRANSACTION = "transaction"
    COMPENSATION = "compensation"


class UndoKind(str, Enum):
    RULE = "rule"
    DELETE_CREATED = "delete_created"
    RESTORE = "restore"
    RECREATE = "recreate"


@dataclass(frozen=True, slots=True)
class UndoSpec:
    """How to undo one call; plain data so the journal can store it and recovery rebuild the call."""

    kind: UndoKind
    snapshot_path: str | None = None
    undo_method: str | None = None
    undo_path: str | None = None
    undo_body: Any = None
    recreate_with: str = "PUT"
    path_params: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UndoSpec:
        return cls(**{**data, "kind": UndoKind(data["kind"])})


@dataclass(frozen=True, slots=True)
class AtomicStep:
    strategy: Strategy
    undo: UndoSpec | None = None


def plan_atomicity(plan: BatchPlan, config: GatewayConfig) -> dict[int, AtomicStep]:
    """A step per call position; raises Uncompensable for the first call that cannot be undone,
    MixedCredentials when one upstream transaction would carry calls of different identities."""
    steps = {call.position: _step(call, config.upstreams[call.upstream]) for call in plan.calls}
    _check_credentials(plan.calls, config)
    return steps


def atomic_step(call: PlannedCall, config: GatewayConfig, earlier: Iterable[PlannedCall]) -> AtomicStep:
    """The step of one call planned late (a graph batch's resolved reference), by the same rules
    as plan_atomicity, its credentials checked against the batch's `earlier` calls."""
    step = _step(call, config.upstreams[call.upstream])
    _check_credentials((*earlier, call), config)
    return step


def credentials(call: PlannedCall, sensitive: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """The call's credentials: its sensitive headers (Authorization, Cookie, configured ones)."""
    return tuple(sorted((k.lower(), v) for k, v in call.call.headers if k.lower() in sensitive))


def _check_credentials(calls: Iterable[PlannedCall], config: GatewayConfig) -> None:
    """One transaction per upstream is begun and committed with its first call's credentials, so
    every call inside it must carry the same ones (a batch cannot borrow another identity's)."""
    first: dict[str, tuple[PlannedCall, tuple[tuple[str, str], ...]]] = {}
    for call in calls:
        if config.upstreams[call.upstream].transactions is None:
            continue
        creds = credentials(call, config.journal.sensitive)
        earlier = first.setdefault(call.upstream, (call, creds))
        if earlier[1] != creds:
            names = sorted({k for k, _ in creds} | {k for k, _ in earlier[1]})
            raise MixedCredentials(
                f"its credentials ({', '.join(names)}) differ from those of {earlier[0].where}; "
                f"calls to the transactional upstream {call.upstream!r} share one transaction, so an "
                "atomic batch must send them all with the same credentials",
                where=call.where,
            )


def _step(call: PlannedCall, upstream: Upstream) -> AtomicStep:
    if upstream.transactions is not None:
        return AtomicStep(Strategy.TRANSACTION)
    method = call.call.method.upper()
    undo = _rule_undo(call, upstream.compensations)
    if undo is None and upstream.infer_compensations:
        undo = _inferred_undo(method, call.upstream_path, upstream)
    if undo is not None:
        return AtomicStep(Strategy.COMPENSATION, undo)
    if method in SAFE_METHODS:
        return AtomicStep(Strategy.SAFE)
    raise Uncompensable(
        f"{method} {call.request.target[:200]!r} on upstream {call.upstream!r} has no upstream "
        "transaction and no compensation (declare one under upstreams."
        f"{call.upstream}.compensations, or send the batch with X-Batch-Atomic: false)",
        where=call.where,
    )


def _rule_undo(call: PlannedCall, rules: tuple[CompensationRule, ...]) -> UndoSpec | None:
    for rule in rules:
        params = match_path(rule.path, call.upstream_path)
        if rule.method != call.call.method.upper() or params is None:
            continue
        try:
            snapshot = None if rule.snapshot is None else render_path(rule.snapshot.path, {"path": params})
        except TemplateError as exc:
            raise Uncompensable(f"compensation rule snapshot: {exc}", where=call.where) from None
        return UndoSpec(
            kind=UndoKind.RULE,
            snapshot_path=snapshot,
            undo_method=rule.undo.method,
            undo_path=rule.undo.path,
            undo_body=rule.undo.body,
            path_params=params,
        )
    return None


def _inferred_undo(method: str, path: str, upstream: Upstream) -> UndoSpec | None:
    if method == "POST":
        return UndoSpec(kind=UndoKind.DELETE_CREATED)
    if method in ("PUT", "PATCH"):
        return UndoSpec(kind=UndoKind.RESTORE, snapshot_path=path)
    if method == "DELETE":
        return UndoSpec(
            kind=UndoKind.RECREATE, snapshot_path=path, recreate_with=upstream.recreate_deleted_with
        )
    return None
