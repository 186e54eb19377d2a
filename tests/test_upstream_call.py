"""UpstreamCall.with_timeout: a copy with every field kept and its own timeout."""

from __future__ import annotations

import dataclasses

from yarl import URL

from gateway.upstream import UpstreamCall


def test_with_timeout_keeps_every_field_and_sets_the_timeout() -> None:
    call = UpstreamCall(
        upstream="ledger", method="POST", url=URL("http://127.0.0.1:9/tx/1"), headers=(("A", "b"),),
        body=b"{}", timeout=9.0, purpose="commit", item="/Batch/items/3", path_template="/tx/{token}",
    )
    # every field was given a value other than its default above: a field added to UpstreamCall
    # must be added there and passed on by with_timeout
    assert {f.name for f in dataclasses.fields(UpstreamCall)} == {
        "upstream", "method", "url", "headers", "body", "timeout", "purpose", "item", "path_template",
    }
    assert call.with_timeout(2.5) == dataclasses.replace(call, timeout=2.5)
