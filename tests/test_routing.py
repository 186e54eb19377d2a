"""Target validation and routing: a client never names a host and never escapes its route.

Property tests fuzz one rule: parse_target accepts or raises ForbiddenTarget, and what it accepts
routes to a URL on a configured upstream whose path has no dot segment however an upstream's own
decoder reads it: percent-decoded once or twice, as lenient UTF-8 (overlong forms accepted), with
compatibility characters folded (fullwidth dots and slashes, NFKC) and `;parameters` cut from each
segment (issue 11). The property is itself checked: with the old single-decode rule patched in, it
finds an unsafe target in each hostile family.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import unquote, unquote_to_bytes

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

import gateway.routing
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
SEMICOLON_PARAMS = [
    "..;", "..;x", ".;", ";", "%2e%2e;p=1", ".%2e;v", "..%3b", "%2e%2e%3bx", "..%253bx", "a;b=1",
]
DOUBLE_ENCODED = [
    "%252e%252e", "%252E.", ".%252e", "%252e", "..%252f", "%252f..", "a%252f..", "%255c..", "%252f",
    "%2541",
]
FULLWIDTH = [
    "%EF%BC%8E%EF%BC%8E", "%EF%BC%8E", ".%EF%BC%8E", "%ef%bc%8e%2e", "%E2%80%A4%E2%80%A4",
    "%EF%BC%8F..", "..%EF%BC%8F", "%25EF%25BC%258E%25EF%25BC%258E", "caf%C3%A9",
]
OVERLONG = ["%C0%AE%C0%AE", "%C0%AE", ".%C0%AE", "%c0%ae%c0%ae", "%C0%AF..", "..%C0%AF", "%C1%9C.."]
HOSTILE_FAMILIES = {
    "semicolon parameters": SEMICOLON_PARAMS,
    "double encoding": DOUBLE_ENCODED,
    "fullwidth dots": FULLWIDTH,
    "overlong UTF-8": OVERLONG,
}


def paths_of(segments: list[str]) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(segments), min_size=1, max_size=6).map(lambda s: "/" + "/".join(s))


PATHS = paths_of(SEGMENTS + SEMICOLON_PARAMS + DOUBLE_ENCODED + FULLWIDTH + OVERLONG)
JUNK = st.text(alphabet="/.%2eE5cC\\?#:;@a \t\r\n\x00", max_size=20)
TARGETS = st.one_of(PATHS, PATHS.map(lambda p: p + "?x=../y"), JUNK, st.builds(str.__add__, JUNK, PATHS))
METHODS = st.sampled_from(["GET", "POST", "DELETE"])


def lenient_utf8(data: bytes) -> str:
    """UTF-8 as a careless decoder reads it: overlong forms of any length give their code point."""
    out, i = [], 0
    while i < len(data):
        lead = data[i]
        size = 1 if lead < 0x80 else 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else (
            4 if 0xF0 <= lead < 0xF8 else 0
        )
        tail = data[i + 1 : i + size]
        if size == 0 or len(tail) != size - 1 or any(byte & 0xC0 != 0x80 for byte in tail):
            out.append("\ufffd")
            i += 1
            continue
        code = lead & (0x7F >> size) if size > 1 else lead
        for byte in tail:
            code = code << 6 | byte & 0x3F
        out.append(chr(code) if code < 0x110000 and not 0xD800 <= code < 0xE000 else "\ufffd")
        i += size
    return "".join(out)


_SEPARATORS = str.maketrans({"\\": "/", "\u2215": "/"})


def upstream_readings(raw_path: str) -> list[str]:
    """How upstream decoders could read a path: percent-decoded once or twice, lenient UTF-8,
    compatibility characters folded (NFKC: fullwidth dots and slashes), backslash as a separator."""
    once = unquote_to_bytes(raw_path)
    twice = unquote_to_bytes(once)
    return [
        unicodedata.normalize("NFKC", lenient_utf8(data)).translate(_SEPARATORS) for data in (once, twice)
    ]


def has_dot_segment(path: str) -> bool:
    return any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/"))


def unsafe_acceptance(target: str, method: str) -> str | None:
    """None when `target` is refused or routed safely, else what is wrong with the accepted route."""
    try:
        routed = TABLE.route(method, parse_target(target, where="x"))
    except ForbiddenTarget:
        return None
    url = routed.url
    if (url.host, url.port) not in HOSTS:
        return f"{target!r} leaves the configured upstreams: {url}"
    if not (url.raw_path.startswith("/base/") or routed.upstream == "legacy"):
        return f"{target!r} leaves the upstream's base path: {url}"
    for reading in upstream_readings(url.raw_path):
        if has_dot_segment(reading):
            return f"{target!r} is accepted, and {url.raw_path!r} reads as {reading!r}"
    return None


@settings(max_examples=1000)
@given(TARGETS, METHODS)
def test_any_target_is_accepted_safely_or_refused(target: str, method: str) -> None:
    assert unsafe_acceptance(target, method) is None


def single_decode_rule(path: str) -> bool:
    """parse_target's escape check before issue 11: decoded once, plain dot segments, backslashes."""
    decoded = unquote(path)
    return "\\" in decoded or any(segment in (".", "..") for segment in decoded.split("/"))


@pytest.mark.parametrize("family", list(HOSTILE_FAMILIES))
def test_the_property_catches_the_old_single_decode_rule(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the weaker check patched in, the property's generator and oracle find an unsafe target
    in every hostile family (so the property above would fail if the check regressed)."""
    monkeypatch.setattr(gateway.routing, "_escapes", single_decode_rule)
    found = find(
        paths_of(["a", "api", *HOSTILE_FAMILIES[family]]),
        lambda target: unsafe_acceptance(target, "GET") is not None,
        settings=settings(max_examples=500, database=None),
    )
    assert unsafe_acceptance(found, "GET") is not None


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/a/%E0%80%AE%E0%80%AE/b", id="3-byte overlong"),
        pytest.param("/a/%F0%80%80%AE%F0%80%80%AE/b", id="4-byte overlong"),
        pytest.param("/a/%25C0%25AE%25C0%25AE/b", id="2-byte overlong, encoded twice"),
    ],
)
def test_every_overlong_dot_segment_is_refused(target: str) -> None:
    assert unsafe_acceptance(target, "GET") is None


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/a/%E2%80%A5/b", id="two dot leader"),
        pytest.param("/a/%EF%B9%92%EF%B9%92/b", id="small full stops"),
    ],
)
def test_compatibility_dots_are_refused_like_fullwidth_ones(target: str) -> None:
    assert unsafe_acceptance(target, "GET") is None
