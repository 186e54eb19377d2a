"""The PostgreSQL journal's schema: versioned migrations, applied at start-up under an advisory lock.

Several replicas starting at once serialise on the lock; each applies only what is missing.
"""

from __future__ import annotations

import hashlib
from typing import Any

SCHEMA_VERSION = 1
"""The newest schema this gateway writes; a journal with a higher `schema_version` is refused."""

MIGRATIONS: dict[int, str] = {
    1: """
CREATE SEQUENCE IF NOT EXISTS epochs;
CREATE TABLE IF NOT EXISTS instances (
    epoch BIGINT PRIMARY KEY, name TEXT NOT NULL,
    started TIMESTAMPTZ NOT NULL DEFAULT now(), lease_until TIMESTAMPTZ NOT NULL);
CREATE INDEX IF NOT EXISTS instances_name ON instances (name);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY, state TEXT NOT NULL, detail TEXT,
    created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,
    headers TEXT, resolution TEXT, instance TEXT, owner TEXT, request_id TEXT,
    epoch BIGINT);
CREATE INDEX IF NOT EXISTS batches_open ON batches (epoch)
    WHERE state NOT IN ('committed', 'rolled_back', 'rollback_incomplete', 'resolved');
CREATE INDEX IF NOT EXISTS batches_request ON batches (request_id);
CREATE INDEX IF NOT EXISTS batches_updated ON batches (updated);
CREATE TABLE IF NOT EXISTS transactions (
    batch_id TEXT NOT NULL, upstream TEXT NOT NULL, state TEXT NOT NULL, token TEXT,
    headers TEXT, updated DOUBLE PRECISION NOT NULL, PRIMARY KEY (batch_id, upstream));
CREATE TABLE IF NOT EXISTS steps (
    batch_id TEXT NOT NULL, position INTEGER NOT NULL, state TEXT NOT NULL,
    intent TEXT NOT NULL, outcome TEXT, seq INTEGER, undo_state TEXT, undo_detail TEXT,
    updated DOUBLE PRECISION NOT NULL, PRIMARY KEY (batch_id, position));
CREATE TABLE IF NOT EXISTS secrets (
    batch_id TEXT NOT NULL, ref TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (batch_id, ref));
CREATE OR REPLACE FUNCTION fence(writer BIGINT, batch TEXT, margin DOUBLE PRECISION, creating BOOLEAN)
RETURNS DOUBLE PRECISION LANGUAGE plpgsql AS $fence$
DECLARE
    lease_left DOUBLE PRECISION;
    known BOOLEAN;
    holder BIGINT;
BEGIN
    SELECT EXTRACT(EPOCH FROM lease_until - now()) INTO lease_left
        FROM instances WHERE epoch = writer FOR SHARE;
    IF lease_left IS NULL OR lease_left <= margin THEN
        RAISE EXCEPTION 'the writer''s lease lapsed' USING ERRCODE = 'GW001';
    END IF;
    SELECT true, epoch INTO known, holder FROM batches WHERE batch_id = batch FOR UPDATE;
    IF known IS NULL AND NOT creating THEN
        RAISE EXCEPTION 'no such batch' USING ERRCODE = 'GW002';
    ELSIF known AND holder IS NULL THEN
        RAISE EXCEPTION 'the batch is parked' USING ERRCODE = 'GW004';
    ELSIF known AND holder <> writer THEN
        RAISE EXCEPTION 'another instance owns the batch' USING ERRCODE = 'GW003';
    END IF;
    RETURN lease_left;
END
$fence$;
""",
}
"""Version -> DDL that brings the previous version to it (run in one transaction)."""


def lock_key(schema: str, purpose: str) -> int:
    """A stable signed 64-bit advisory lock key for (schema, purpose)."""
    digest = hashlib.sha256(f"batch-gateway:{schema}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def migrate(conn: Any, schema: str) -> int:
    """Create or upgrade the schema; returns the version found before. Raises RuntimeError for a
    journal written by a newer gateway (the caller turns it into JournalUnavailable)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(schema, "migrate"))
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)'
        )
        found = await conn.fetchval(f"SELECT value FROM \"{schema}\".meta WHERE name='schema_version'")
        before = int(found or 0)
        if before > SCHEMA_VERSION:
            raise RuntimeError(
                f"the journal schema {schema!r} is version {before}, written by a newer gateway "
                f"(this one knows up to {SCHEMA_VERSION})"
            )
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        for version in range(before + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[version])
        if before < SCHEMA_VERSION:
            await conn.execute(
                "INSERT INTO meta (name, value) VALUES ('schema_version', $1) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                str(SCHEMA_VERSION),
            )
        return before
