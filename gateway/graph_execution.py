"""The dependency-graph engine under the dialects of issue 17 (Graph, OData, Salesforce Composite).

It validates and plans a GraphBatch, runs each item (or atomic group) once its dependencies succeeded.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from yarl import URL

from gateway.atomicity.coordinator import AtomicRun, Prepare
from gateway.atomicity.journal import Journal
from gateway.atomicity.plan import AtomicStep, Strategy, atomic_step, plan_atomicity
from gateway.atomicity.untrusted import MAX_LOCATION_CHARS
from gateway.budget import ByteBudget
from gateway.config import GatewayConfig
from gateway.errors import (
    BatchLost,
    ClientError,
    JournalUnavailable,
    MalformedBatch,
    PayloadTooLarge,
    Uncompensable,
)
from gateway.execution import CallRunner, Deadline
from gateway.graph_model import (
    AnsweredItem,
    FailurePolicy,
    GraphBatch,
    GraphItem,
    GraphResult,
    ReferenceUnresolved,
    Unmet,
)
from gateway.metrics import GatewayMetrics
from gateway.model import (
    BatchOutcome,
    BatchReport,
    BatchResult,
    CallFailure,
    ExecutionMode,
    ItemResult,
    RollbackStatus,
    SubResponse,
)
from gateway.planning import BatchPlan, BoundPlanner, PlannedBatch, PlannedCall
from gateway.routing import RouteTable, Target, parse_target
from gateway.upstream import UpstreamCall, UpstreamPool

Shielded = Callable[[AtomicRun], Awaitable[BatchReport]]
"""Runs an atomic group as a task of its own that a client disconnect does not cancel."""

_UNSAFE_LOCATION = re.compile(r"[\x00-\x20\x7f\\#]")


# --- validation --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Need:
    """A dependency of a unit: an item id (`group` False) or an atomic group's name."""

    name: str
    group: bool


@dataclass(frozen=True, slots=True)
class Unit:
    """What is scheduled as one: a single item, or the members of an atomic group in order."""

    members: tuple[tuple[int, GraphItem], ...]
    """(client index, item) of each member."""
    group: str | None
    needs: tuple[Need, ...]
    """The ids and groups outside the unit that it waits for, in the order first named."""

    @property
    def name(self) -> str:
        return self.group if self.group is not None else self.members[0][1].id


def where_of(item: GraphItem) -> str:
    return item.request.where or f"item {item.id!r}"


def validate_graph(batch: GraphBatch, max_items: int) -> tuple[Unit, ...]:
    """The batch's units in client order; raises MalformedBatch (naming the item) for a duplicate
    id, a dependency that is not an earlier id or an earlier (closed) group, or group members that
    are not adjacent, and PayloadTooLarge above `max_items`. Backward-only dependencies make cycles
    impossible. A name that is both an earlier id and a group means the id."""
    if len(batch.items) > max_items:
        raise PayloadTooLarge(
            f"Too many items. Maximum number of items is {max_items}.",
            where=batch.where or "/", limit="limits.max_items",
        )
    ids = {item.id for item in batch.items}
    groups = {item.group for item in batch.items if item.group is not None}
    seen: set[str] = set()
    closed: set[str] = set()
    units: list[tuple[list[tuple[int, GraphItem]], str | None, dict[Need, None]]] = []
    for index, item in enumerate(batch.items):
        if item.id in seen:
            raise MalformedBatch(f"duplicate id {item.id[:100]!r}; ids are unique within a batch",
                                 where=where_of(item))
        open_group = units[-1][1] if units else None
        if item.group is None or item.group != open_group:
            if open_group is not None:
                closed.add(open_group)
            if item.group in closed:
                raise MalformedBatch(
                    f"the members of atomic group {item.group!r} must be adjacent; this one follows "
                    "other items after the group ended", where=where_of(item),
                )
            units.append(([], item.group, {}))
        members, _, needs = units[-1]
        inside = {member.id for _, member in members}
        for name in item.depends_on:
            need = _check_dependency(item, name, seen, closed, ids, groups)
            if need.group or need.name not in inside:
                needs[need] = None
        members.append((index, item))
        seen.add(item.id)
    return tuple(Unit(tuple(members), group, tuple(needs)) for members, group, needs in units)


def _check_dependency(
    item: GraphItem, name: str, seen: set[str], closed: set[str], ids: set[str], groups: set[str]
) -> Need:
    if name in seen:
        return Need(name, group=False)
    if name in closed and name != item.group:
        return Need(name, group=True)
    if name == item.id:
        problem = "depends on itself"
    elif name == item.group:
        problem = f"depends on its own atomic group {name!r}"
    elif name in ids or name in groups:
        problem = f"depends on {name[:100]!r}, which comes later (dependencies point backwards only)"
    else:
        problem = f"depends on {name[:100]!r}, which is no id or atomic group of the batch"
    raise MalformedBatch(problem, where=where_of(item))


# --- references: a Location back into the gateway's routes -------------------------------------


def location_target(routes: RouteTable, planned: PlannedCall, response: SubResponse) -> str | None:
    """The answer's `Location` as a gateway target, when it points into the upstream the call was
    routed to (same origin, under its base path, or an origin-relative path under the base path)
    and back through the route the call came by: that route's prefix + the rest. Anything else is
    None: a Location is untrusted upstream data, never followed elsewhere."""
    values = [value.strip() for name, value in response.headers if name.lower() == "location"]
    route = planned.route
    if len(values) != 1 or route is None:
        return None
    raw = values[0]
    if not raw or len(raw) > MAX_LOCATION_CHARS or _UNSAFE_LOCATION.search(raw) or raw.startswith("//"):
        return None
    try:
        url = URL(raw)
        if url.is_absolute():
            origin = routes.upstream_url(planned.upstream, Target(path="/", query="")).origin()
            if url.user is not None or url.password is not None or url.origin() != origin:
                return None
        elif not raw.startswith("/"):
            return None
        path, query = url.raw_path, url.raw_query_string
    except Exception:  # yarl raises ValueError, IndexError, ... on odd input: not a usable URL
        return None
    rest = _under(path, routes.base_path(planned.upstream))
    rest = None if rest is None else _under(rest, route.add_prefix.rstrip("/"))
    if rest is None:
        return None
    if route.strip_prefix and route.prefix != "/":
        target = route.prefix.rstrip("/") + ("" if rest == "/" else rest)
    else:
        target = rest
        if route.prefix != "/" and target != route.prefix and not target.startswith(route.prefix + "/"):
            return None
    target += f"?{query}" if query else ""
    try:
        parse_target(target)
    except ClientError:
        return None
    return target


def _under(path: str, base: str) -> str | None:
    """`path` relative to `base` ("/" when it is `base` itself), None when it is outside it."""
    if not base:
        return path
    if path == base:
        return "/"
    return path[len(base):] if path.startswith(base + "/") else None


# --- running -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Services:
    """What the engine uses of the batch service."""

    config: GatewayConfig
    routes: RouteTable
    pool: UpstreamPool
    journal: Journal
    metrics: GatewayMetrics
    runner: CallRunner
    shielded: Shielded
    deadline: Deadline
    budget: ByteBudget | None
    owner: str | None


class GraphRun:
    """One graph batch: built (validated and planned, raising before any call), then `run`."""

    def __init__(
        self, batch: GraphBatch, planner: BoundPlanner, services: Services, *, batch_id: str,
        max_items: int,
    ) -> None:
        self.batch, self.batch_id, self._s, self._planner = batch, batch_id, services, planner
        self.units = validate_graph(batch, max_items)
        self._unit_of_id = {item.id: n for n, unit in enumerate(self.units) for _, item in unit.members}
        self._unit_of_group = {unit.group: n for n, unit in enumerate(self.units) if unit.group is not None}
        self.calls: dict[str, PlannedCall] = {
            item.id: planner.call(item.request, index)
            for unit in self.units
            for index, item in unit.members
            if not self._late(item)
        }
        """Each item's call as planned (up front, or once its references were resolved)."""
        group_units = [unit for unit in self.units if unit.group is not None]
        self.group_batches = {
            unit.name: batch_id if len(group_units) == 1 else f"{batch_id}.{n}"
            for n, unit in enumerate(group_units, 1)
        }
        self._runs = {unit.name: self._atomic_run(unit) for unit in group_units}
        self.results: dict[str, ItemResult | Unmet] = {}
        self.answered: dict[str, AnsweredItem] = {}
        self.outcomes: dict[str, BatchOutcome] = {}
        self._finished = [asyncio.Event() for _ in self.units]
        self._stopped: str | None = None

    def _late(self, item: GraphItem) -> bool:
        """Planned only once its references are resolved, just before it runs."""
        return item.has_references and self.batch.resolver is not None

    # -- atomic groups --------------------------------------------------------------------------

    def _atomic_run(self, unit: Unit) -> AtomicRun:
        """The group's AtomicRun, its known calls checked (422) and sized (413) now; members with
        references are resolved, planned and checked inside the run, just before each is sent."""
        members = [item for _, item in unit.members]
        calls = tuple(
            replace(self.calls[item.id], position=k) if item.id in self.calls else _placeholder(item, k)
            for k, item in enumerate(members)
        )
        known = tuple(call for call, item in zip(calls, members, strict=True) if item.id in self.calls)
        steps = plan_atomicity(BatchPlan(root=PlannedBatch(ExecutionMode.SERIAL, known, ""), calls=known),
                               self._s.config)
        for call in calls:  # resolved and stepped by the prepare hook
            steps.setdefault(call.position, AtomicStep(Strategy.SAFE))
        plan = BatchPlan(
            root=PlannedBatch(ExecutionMode.SERIAL, calls, where=self.batch.where),
            calls=calls, base_headers=self._planner.base_headers,
        )
        s = self._s
        return AtomicRun(
            batch_id=self.group_batches[unit.name], plan=plan, steps=steps, config=s.config,
            routes=s.routes, pool=s.pool, journal=s.journal, metrics=s.metrics, deadline=s.deadline,
            budget=s.budget, owner=s.owner,
            prepare=self._group_hook(unit, steps, {call.position: call for call in known}),
        )

    def _group_hook(self, unit: Unit, steps: dict[int, AtomicStep], calls: dict[int, PlannedCall]) -> Prepare:
        """AtomicRun's prepare hook for one group: members with references are resolved against
        the batch's answers plus the earlier members', planned and given their step. `calls`: the
        group's planned calls by position (members with references join once resolved)."""
        members = [(index, item) for index, item in unit.members]

        def prepare(
            call: PlannedCall, outcomes: Mapping[int, SubResponse | CallFailure]
        ) -> tuple[PlannedCall, AtomicStep] | CallFailure:
            index, item = members[call.position]
            if not self._late(item):
                return call, steps[call.position]
            answered = dict(self.answered)
            for position, outcome in outcomes.items():
                if isinstance(outcome, SubResponse):
                    answered[members[position][1].id] = self._answer(calls[position], outcome)
            resolved = self._resolve(item, index, answered)
            if isinstance(resolved, Unmet):
                self.results[item.id] = resolved
                return CallFailure(400, resolved.reason)
            local = replace(resolved, position=call.position)
            others = [other for position, other in calls.items() if position != call.position]
            try:
                step = atomic_step(local, self._s.config, others)
            except Uncompensable as exc:
                return CallFailure(422, f"not sent: it cannot be made atomic: {exc.detail}")
            calls[call.position] = local
            self.calls[item.id] = resolved
            return local, step

        return prepare

    async def _run_group(self, unit: Unit) -> bool:
        run = self._runs[unit.name]
        try:
            report = await self._s.shielded(run)
        except BatchLost:
            raise
        except JournalUnavailable as exc:  # before any call of the group: nothing of it was sent
            if len(unit.members) == len(self.batch.items):
                raise
            self._settle_unmet(unit, Unmet(f"not sent: the journal could not record the atomic group "
                                           f"({exc.detail})"))
            return False
        assert isinstance(report.root, BatchResult) and report.atomic_outcome is not None
        for (_, item), result in zip(unit.members, report.root.items, strict=True):
            assert isinstance(result, ItemResult)
            unresolved = self.results.get(item.id)
            if isinstance(unresolved, Unmet):  # its reference did not resolve: it was not sent
                continue
            self.results[item.id] = result
            self._remember(item, result)
        self.outcomes[unit.name] = report.atomic_outcome
        return report.atomic_outcome is BatchOutcome.COMMITTED

    # -- single items ---------------------------------------------------------------------------

    async def _run_item(self, index: int, item: GraphItem) -> bool:
        call = self.calls.get(item.id)
        if call is None:
            resolved = self._resolve(item, index, self.answered)
            if isinstance(resolved, Unmet):
                self.results[item.id] = resolved
                return False
            self.calls[item.id] = call = resolved
        result = await self._s.runner(call)
        self.results[item.id] = result
        self._remember(item, result)
        return succeeded(result)

    def _resolve(
        self, item: GraphItem, index: int, answered: Mapping[str, AnsweredItem]
    ) -> PlannedCall | Unmet:
        """The item's request with its references resolved, planned; Unmet (unresolved) when a
        reference names nothing or the resolved request cannot be planned."""
        resolver = self.batch.resolver
        assert resolver is not None
        try:
            request = resolver(item, answered)
        except ReferenceUnresolved as exc:
            return Unmet(f"not sent: {exc.detail}", unresolved=True)
        try:
            return self._planner.call(request, index)
        except ClientError as exc:
            return Unmet(f"not sent: the resolved request cannot be sent: {exc.detail}", unresolved=True)

    def _remember(self, item: GraphItem, result: ItemResult) -> None:
        call = self.calls.get(item.id)
        if isinstance(result.outcome, SubResponse) and call is not None:
            self.answered[item.id] = self._answer(call, result.outcome)

    def _answer(self, call: PlannedCall, response: SubResponse) -> AnsweredItem:
        return AnsweredItem(response, location_target(self._s.routes, call, response))

    # -- scheduling -----------------------------------------------------------------------------

    async def run(self) -> GraphResult:
        tasks = [asyncio.ensure_future(self._unit(n, unit)) for n, unit in enumerate(self.units)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        ran = [name for name in self.group_batches if name in self.outcomes]  # in client order
        return GraphResult(
            items=tuple((item.id, self.results[item.id]) for item in self.batch.items),
            groups=tuple((name, self.outcomes[name]) for name in ran),
            batch_id=self.batch_id,
            group_batches=tuple((name, self.group_batches[name]) for name in ran),
        )

    async def _unit(self, n: int, unit: Unit) -> None:
        try:
            for need in unit.needs:
                await self._finished[self._unit_index(need)].wait()
            if self.batch.sequential and n > 0:
                await self._finished[n - 1].wait()
            blocked = self._blocked(unit)
            if blocked is not None:
                self._settle_unmet(unit, blocked)
                ok = False
            elif unit.group is not None:
                ok = await self._run_group(unit)
            else:
                ok = await self._run_item(*unit.members[0])
            if not ok and self._stopped is None:
                self._stopped = f"{unit.name!r} failed"
        finally:
            self._finished[n].set()

    def _unit_index(self, need: Need) -> int:
        return self._unit_of_group[need.name] if need.group else self._unit_of_id[need.name]

    def _blocked(self, unit: Unit) -> Unmet | None:
        """Why the unit is not run: the batch stopped (STOP policy), or a dependency failed."""
        if self._stopped is not None and self.batch.on_failure is FailurePolicy.STOP:
            return Unmet(f"not sent: the batch stopped after {self._stopped}")
        for need in unit.needs:
            why = self._unmet_because(need)
            if why is not None:
                return Unmet(f"not sent: it depends on {need.name!r}, which {why}", dependency=need.name)
        return None

    def _unmet_because(self, need: Need) -> str | None:
        """None when the dependency succeeded, else what became of it in words."""
        if need.group:
            outcome = self.outcomes.get(need.name)
            if outcome is BatchOutcome.COMMITTED:
                return None
            return "was not run" if outcome is None else f"did not commit ({outcome.value})"
        result = self.results[need.name]
        if isinstance(result, Unmet):
            return "was not sent"
        if not succeeded(result):
            return describe_failure(result)
        group = self.units[self._unit_of_id[need.name]].group
        if group is not None and self.outcomes.get(group) is not BatchOutcome.COMMITTED:
            return f"did not stay: its atomic group {group!r} did not commit"
        return None

    def _settle_unmet(self, unit: Unit, unmet: Unmet) -> None:
        for _, item in unit.members:
            self.results.setdefault(item.id, unmet)


def succeeded(result: ItemResult) -> bool:
    """A dependency is met by a 2xx/3xx answer that stayed (not rolled back or skipped)."""
    outcome = result.outcome
    return (
        isinstance(outcome, SubResponse)
        and outcome.status < 400
        and result.rollback in (None, RollbackStatus.EXECUTED)
    )


def describe_failure(result: ItemResult) -> str:
    outcome = result.outcome
    if result.rollback in (RollbackStatus.ROLLED_BACK, RollbackStatus.ROLLBACK_FAILED):
        return f"was rolled back with its atomic group ({result.rollback.value})"
    if isinstance(outcome, SubResponse):
        return f"failed with status {outcome.status}"
    if isinstance(outcome, CallFailure):
        return f"got no answer ({outcome.status}: {outcome.reason})"
    return "was not executed"


def _placeholder(item: GraphItem, position: int) -> PlannedCall:
    """Stands for a member with references until the prepare hook resolves and plans it."""
    request = item.request
    call = UpstreamCall(upstream="", method=request.method, url=URL(), headers=(), item=request.where)
    return PlannedCall(position=position, request=request, call=call, upstream_path="")


def count_labels(run: GraphRun) -> Iterable[tuple[str, ItemResult | Unmet]]:
    """(upstream, result) of every item whose call was planned, for the sub-request metrics."""
    for item_id, result in run.results.items():
        call = run.calls.get(item_id)
        if call is not None:
            yield call.upstream, result
