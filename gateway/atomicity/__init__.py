"""Atomic batches: the state machine, the atomicity plan, transactions, compensations and the journal.

`AtomicCoordinator` runs a planned batch all-or-nothing; `recover_once` rolls back what a crash left.
"""
