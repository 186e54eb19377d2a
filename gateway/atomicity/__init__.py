"""Atomic batches: the state machine, the atomicity plan, transactions, compensations and the journal.

`AtomicRun` runs a planned batch all-or-nothing; `Recovery` rolls back what a crash left.
"""
