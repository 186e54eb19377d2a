"""Fair sharing of an upstream between batches (issue 10 finding 4), and the slot scheduler itself.

A 1,000-item batch to a slow endpoint once made another client's one-item batch wait 29.7 s: the
upstream's `concurrency` slots were first come, first served. Now a waiting batch that was served
least recently gets the next free slot.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.fair_slots import FairSlots
from tests.conftest import MakeGateway, state_of


def batch_of(count: int, operation: str, mode: str = "Unordered") -> dict[str, Any]:
    items = [{"SingleItem": {"method": "GET", "operation": operation}} for _ in range(count)]
    return {"Batch": {"batch_execution_type": mode, "items": items}}


async def test_a_single_call_is_not_stuck_behind_another_batch_s_backlog(
    make_gateway: MakeGateway, legacy: Any
) -> None:
    """500 calls of 200 ms fill every slot for ~2 s (50 slots); a one-item batch sent meanwhile
    starts within about one call duration."""
    client = await make_gateway()
    big = asyncio.create_task(client.post("/batch/v1", json=batch_of(500, "/echo/slow?delay_ms=200")))
    for _ in range(200):  # until the big batch holds every slot (polled: a loaded machine is slow)
        await asyncio.sleep(0.025)
        if state_of(legacy).max_in_flight == 50:
            break
    assert state_of(legacy).max_in_flight == 50 and len(state_of(legacy).calls) < 400

    arrived_before = len(state_of(legacy).calls)
    async with client.post("/batch/v1", json=batch_of(1, "/echo/quick")) as response:
        answer = await response.json()

    assert answer["Batch"]["items"][0]["SingleItem"]["Result"]["status"] == 200
    paths = [call["path"] for call in state_of(legacy).calls]
    # counted in calls, not seconds (a loaded machine must not fail it): the quick call takes one
    # of the next slots freed, not a place behind the big batch's backlog of hundreds
    position = paths.index("/echo/quick")
    assert position < arrived_before + 50, f"{position - arrived_before} big calls went first"
    assert position < 400, "it was served while the big batch still had a backlog"
    async with await big as response:
        assert response.status == 200
        assert len((await response.json())["Batch"]["items"]) == 500
    assert state_of(legacy).max_in_flight <= 50


async def test_the_least_recently_served_waiting_batch_gets_the_next_slot() -> None:
    slots = FairSlots(2)
    order: list[str] = []
    release = asyncio.Event()

    async def call(batch: str, label: str) -> None:
        async with slots.slot(batch):
            order.append(label)
            await release.wait()

    big = [asyncio.create_task(call("big", f"big{n}")) for n in range(6)]
    await asyncio.sleep(0)
    small = asyncio.create_task(call("small", "small"))
    await asyncio.sleep(0)
    assert order == ["big0", "big1"] and slots.in_use == 2
    release.set()  # every holder finishes; slots go: small first (never served), then big
    await asyncio.gather(*big, small)
    assert order[2] == "small"
    assert slots.in_use == 0


async def test_a_waiter_cancelled_in_the_queue_gives_up_its_turn() -> None:
    slots = FairSlots(1)
    gate = asyncio.Event()
    got: list[str] = []

    async def call(batch: str) -> None:
        async with slots.slot(batch):
            got.append(batch)
            await gate.wait()

    holder = asyncio.create_task(call("a"))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(call("b"))
    later = asyncio.create_task(call("c"))
    await asyncio.sleep(0)
    waiter.cancel()
    gate.set()
    await asyncio.gather(holder, later)
    assert got == ["a", "c"] and slots.in_use == 0
