"""In-memory resource store for the demo services: a collection of JSON objects keyed by id.

A `Store` can be forked into a transaction view and merged back key by key on commit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

Record = dict[str, Any]


@dataclass
class Store:
    """Records by id, the next id, and (for a transaction view) the ids it touched."""

    records: dict[str, Record] = field(default_factory=dict)
    next_id: int = 1
    touched: set[str] = field(default_factory=set)

    def create(self, data: Record) -> Record:
        while str(self.next_id) in self.records:
            self.next_id += 1
        record = {**data, "id": str(self.next_id)}
        self.next_id += 1
        return self.put(record["id"], record)

    def put(self, key: str, data: Record) -> Record:
        record = {**data, "id": key}
        self.records[key] = record
        self.touched.add(key)
        return record

    def delete(self, key: str) -> Record | None:
        self.touched.add(key)
        return self.records.pop(key, None)

    def fork(self) -> Store:
        return Store(records=copy.deepcopy(self.records), next_id=self.next_id)

    def merge(self, view: Store) -> None:
        """Apply a transaction view's changes: its touched keys win, untouched keys stay."""
        for key in view.touched:
            if key in view.records:
                self.records[key] = view.records[key]
            else:
                self.records.pop(key, None)
        self.next_id = max(self.next_id, view.next_id)

    def snapshot(self) -> dict[str, Record]:
        return copy.deepcopy(self.records)
