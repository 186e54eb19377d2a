"""Target validation and routing: a client never names a host and never escapes its route.

Property tests fuzz one rule: parse_target accepts or raises ForbiddenTarget, and what it accepts
routes to a URL on a configured upstream whose decoded path has no dot segments.
"""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.errors import ForbiddenTarget, RouteNotFound
from gateway.routing import RouteTable, parse_target

CONFIG = parse_config(
    {
        "upstreams": {
            "api": {"url": "http://127.0.0.1:9001/base"},
            "legacy": {"url": "http://127.0.0.1:9002"},
        },
        "routes": [
            {"prefix": "/", "upstream": "legacy"},
            {"prefix": "/api", "upstream": "api", "strip_prefix": True},
            {"prefix": "/api/v2", "upstream": "api", "add_prefix": "/two", "strip_prefix": True},
            {"prefix": "/api/ro", "upstream": "legacy", "methods": ["GET"]},
        ],
        "journal": {"path": ":memory:"},
    }
)
TABLE = RouteTable(CONFIG)
HOSTS = {("127.0.0.1", 9001), ("127.0.0.1", 9002)}


@pytest.mark.parametrize(
    ("method", "target", "url"),
    [
        ("GET", "/api/x?q=1", "http://127.0.0.1:9001/base/x?q=1"),
        ("GET", "/api", "http://127.0.0.1:9001/base/"),
        ("GET", "/api/v2/x", "http://127.0.0.1:9001/base/two/x"),
        ("GET", "/apix", "http://127.0.0.1:9002/apix"),
        ("GET", "/api/ro/y", "http://127.0.0.1:9002/api/ro/y"),
        ("POST", "/api/ro/y", "http://127.0.0.1:9001/base/ro/y"),
        ("GET", "/a%20b/%E2%82%AC", "http://127.0.0.1:9002/a%20b/%E2%82%AC"),
    ],
)
def test_longest_prefix_wins_and_the_url_is_built_on_the_upstream(
    method: str, target: str, url: str
) -> None:
    assert str(TABLE.route(method, parse_target(target)).url) == url


@pytest.mark.parametrize(
    "target",
    [
        "http://evil.example/x", "//evil.example/x", "evil.example/x", "", "*",
        "/a/../b", "/a/%2e%2e/b", "/a/%2E%2e/b", "/a/./b", "/a\\b", "/a%5cb", "/a/..%2fb",
        "/a b", "/a\r\nX-Injected: 1", "/a%00b", "/a%0d%0ab",
    ],
)
def test_targets_that_could_leave_the_route_are_forbidden(target: str) -> None:
    with pytest.raises(ForbiddenTarget):
        parse_target(target, where="/SingleItem/operation")


def test_no_route_is_404_for_the_proxy_and_400_in_a_batch() -> None:
    table = RouteTable(
        parse_config(
            {
                "upstreams": {"a": {"url": "http://127.0.0.1:1"}},
                "routes": [{"prefix": "/only", "upstream": "a"}],
                "journal": {"path": ":memory:"},
            }
        )
    )
    with pytest.raises(RouteNotFound):
        table.route("GET", parse_target("/other"))
    with pytest.raises(ForbiddenTarget) as caught:
        table.route("GET", parse_target("/other"), where="part 2")
    assert caught.value.where == "part 2"


SEGMENTS = [
    "a", "api", "v2", "ro", "", "~", ".", "..", "%2e", "%2E%2e", ".%2e", "%2e.", "..%2f", "%2f..",
    "a%2f..", "%5c..", "..%5c", "...", "a..b", "%252e%252e",
]
PATHS = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6).map(lambda s: "/" + "/".join(s))
JUNK = st.text(alphabet="/.%2eE5cC\\?#:@a \t\r\n\x00", max_size=20)
TARGETS = st.one_of(PATHS, PATHS.map(lambda p: p + "?x=../y"), JUNK, st.builds(str.__add__, JUNK, PATHS))


@settings(max_examples=1000)
@given(TARGETS, st.sampled_from(["GET", "POST", "DELETE"]))
def test_any_target_is_accepted_safely_or_refused(target: str, method: str) -> None:
    try:
        routed = TABLE.route(method, parse_target(target, where="x"))
    except ForbiddenTarget:
        return
    assert (routed.url.host, routed.url.port) in HOSTS
    segments = unquote(routed.url.raw_path).split("/")
    assert "." not in segments and ".." not in segments
    assert routed.url.raw_path.startswith("/base/") or routed.upstream == "legacy"
