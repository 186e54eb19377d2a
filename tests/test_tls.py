"""TLS: to https upstreams (private CA, client certificate, SNI name, verify: false) and on the listener.

Certificates are made at test time by trustme; every upstream is a real aiohttp server on loopback
serving HTTPS, reached by the gateway both as a plain proxy and as a JSON batch item.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.config import GatewayConfig, parse_config
from gateway.errors import ConfigError
from gateway.tls import listener_context

Client = TestClient[web.Request, web.Application]
BATCH = {"Batch": {"batch_execution_type": "Serial", "items": [
    {"SingleItem": {"method": "GET", "operation": "/hello"}},
]}}


@dataclass
class Certs:
    """PEM files of one trustme CA: a server cert for 127.0.0.1, one for upstream.internal only,
    and a client cert; `other_ca` is a CA that signed none of them."""

    ca: trustme.CA
    ca_file: Path
    other_ca_file: Path
    files: dict[str, tuple[Path, Path]]
    leaves: dict[str, trustme.LeafCert]


def _write_leaf(directory: Path, name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    leaves = {
        "ip": ca.issue_cert("127.0.0.1"),
        "named": ca.issue_cert("upstream.internal"),
        "client": ca.issue_cert("gateway-client"),
    }
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(directory / "other-ca.pem"))
    files = {name: _write_leaf(directory, name, leaf) for name, leaf in leaves.items()}
    return Certs(ca, directory / "ca.pem", directory / "other-ca.pem", files, leaves)


@dataclass
class Upstream:
    server: TestServer
    sni: list[str | None] = field(default_factory=list)
    """The SNI name of every handshake."""
    peers: list[Any] = field(default_factory=list)
    """The client certificate (ssl's dict, or None) of every request."""
    protos: list[str | None] = field(default_factory=list)
    """X-Forwarded-Proto of every request."""
    hosts: list[str] = field(default_factory=list)
    """Host of every request."""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"


MakeUpstream = Callable[..., Awaitable[Upstream]]


@pytest.fixture
def make_upstream(aiohttp_server: Any, certs: Certs) -> MakeUpstream:
    """An HTTPS upstream answering GET /hello, with the `ip` or `named` certificate; with
    `client_auth`, it requires a client certificate signed by the CA."""

    async def make(cert: str = "ip", *, client_auth: bool = False) -> Upstream:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certs.leaves[cert].configure_cert(context)
        if client_auth:
            certs.ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        upstream: Upstream

        def on_sni(_sock: Any, name: str | None, _context: Any) -> None:
            upstream.sni.append(name)

        context.sni_callback = on_sni

        async def hello(request: web.Request) -> web.Response:
            assert request.transport is not None
            upstream.peers.append(request.transport.get_extra_info("peercert"))
            upstream.protos.append(request.headers.get("X-Forwarded-Proto"))
            upstream.hosts.append(request.host)
            return web.json_response({"hello": "tls"})

        app = web.Application()
        app.router.add_get("/hello", hello)
        upstream = Upstream(await aiohttp_server(app, ssl=context))
        return upstream

    return make


def gateway_config(tmp_path: Path, url: str, tls: dict[str, Any] | None, **extra: Any) -> GatewayConfig:
    upstream: dict[str, Any] = {"url": url}
    if tls is not None:
        upstream["tls"] = tls
    return parse_config({
        "upstreams": {"secure": upstream},
        "routes": [{"prefix": "/hello", "upstream": "secure"}],
        "journal": {"path": str(tmp_path / "journal.sqlite3")},
        **extra,
    }, "<test>")


MakeGateway = Callable[..., Awaitable[Client]]


@pytest.fixture
def make_gateway(aiohttp_client: Any, tmp_path: Path) -> MakeGateway:
    async def make(url: str, tls: dict[str, Any] | None) -> Client:
        client: Client = await aiohttp_client(create_app(gateway_config(tmp_path, url, tls)))
        return client

    return make


async def proxied_and_batched(client: Client) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """GET /hello through the proxy and as a batch item: (proxy status, its body, the item's Result)."""
    async with client.get("/hello") as response:
        proxied = (response.status, await response.json(content_type=None))
    async with client.post("/batch/v1", json=BATCH) as response:
        assert response.status == 200, await response.text()
        result = (await response.json())["Batch"]["items"][0]["SingleItem"]["Result"]
    return proxied[0], proxied[1], result


async def assert_ok(client: Client) -> None:
    status, body, result = await proxied_and_batched(client)
    assert (status, body) == (200, {"hello": "tls"})
    assert (result["status"], result["body"]) == (200, {"hello": "tls"})


async def assert_bad_gateway(client: Client, reason: str) -> None:
    """502 naming the upstream and `reason`, as the proxy's problem detail and the item's error."""
    status, problem, result = await proxied_and_batched(client)
    assert status == 502
    assert "upstream 'secure'" in problem["detail"] and reason in problem["detail"], problem
    assert result["status"] == 502 and result["gateway_error"] is True
    assert "upstream 'secure'" in result["body"]["error"] and reason in result["body"]["error"]


# --- verification: private CA, system store, verify: false ------------------------------------------


async def test_an_upstream_signed_by_a_private_ca_is_reached_with_ca_file(
    make_upstream: MakeUpstream, make_gateway: MakeGateway, certs: Certs
) -> None:
    upstream = await make_upstream()
    await assert_ok(await make_gateway(upstream.url, {"ca_file": str(certs.ca_file)}))
    assert upstream.peers == [None, None]  # no client certificate was asked for or sent


async def test_without_ca_file_the_system_store_refuses_a_private_ca(
    make_upstream: MakeUpstream, make_gateway: MakeGateway
) -> None:
    upstream = await make_upstream()
    await assert_bad_gateway(await make_gateway(upstream.url, None), "TLS handshake failed")
    assert upstream.peers == []  # nothing reached the upstream's handler


async def test_a_ca_file_of_another_ca_is_refused(
    make_upstream: MakeUpstream, make_gateway: MakeGateway, certs: Certs
) -> None:
    """ca_file replaces the system store; it is not added to it."""
    upstream = await make_upstream()
    client = await make_gateway(upstream.url, {"ca_file": str(certs.other_ca_file)})
    await assert_bad_gateway(client, "TLS handshake failed")


async def test_verify_false_accepts_any_certificate_and_warns_at_start_up(
    make_upstream: MakeUpstream, make_gateway: MakeGateway
) -> None:
    upstream = await make_upstream("named")  # not even the URL's host
    with capture_logs() as logs:
        client = await make_gateway(upstream.url, {"verify": False})
    (warning,) = [entry for entry in logs if entry["event"] == "upstream_tls_unverified"]
    assert warning["upstream"] == "secure" and warning["log_level"] == "warning"
    assert "testing only" in warning["detail"]
    await assert_ok(client)


async def test_verified_upstreams_log_no_warning(
    make_upstream: MakeUpstream, make_gateway: MakeGateway, certs: Certs
) -> None:
    upstream = await make_upstream()
    with capture_logs() as logs:
        await make_gateway(upstream.url, {"ca_file": str(certs.ca_file)})
    assert not [entry for entry in logs if entry["event"] == "upstream_tls_unverified"]


# --- mTLS ------------------------------------------------------------------------------------------


async def test_mtls_with_a_client_certificate(
    make_upstream: MakeUpstream, make_gateway: MakeGateway, certs: Certs
) -> None:
    upstream = await make_upstream(client_auth=True)
    cert, key = certs.files["client"]
    tls = {"ca_file": str(certs.ca_file), "cert_file": str(cert), "key_file": str(key)}
    await assert_ok(await make_gateway(upstream.url, tls))
    assert len(upstream.peers) == 2
    assert all(peer["subjectAltName"] == (("DNS", "gateway-client"),) for peer in upstream.peers)


async def test_mtls_without_a_client_certificate_is_a_502(
    make_upstream: MakeUpstream, make_gateway: MakeGateway, certs: Certs
) -> None:
    """With TLS 1.3 the server refuses the missing certificate after the client's handshake is
    done, so the gateway sees the connection close ("connection lost"), not a handshake error."""
    upstream = await make_upstream(client_auth=True)
    await assert_bad_gateway(await make_gateway(upstream.url, {"ca_file": str(certs.ca_file)}), "failed")
    assert upstream.peers == []


# --- server_name -------------------------------------------------------------------------------------


async def test_server_name_is_sent_as_sni_and_verified(
    make_upstream: MakeUpstream, make_gateway: MakeGateway, certs: Certs
) -> None:
    upstream = await make_upstream("named")  # issued for upstream.internal; the URL says 127.0.0.1
    tls = {"ca_file": str(certs.ca_file), "server_name": "upstream.internal"}
    await assert_ok(await make_gateway(upstream.url, tls))
    assert upstream.sni and set(upstream.sni) == {"upstream.internal"}
    assert upstream.hosts == [f"127.0.0.1:{upstream.server.port}"] * 2  # only TLS uses server_name


async def test_without_server_name_the_ip_does_not_match_the_certificate(
    make_upstream: MakeUpstream, make_gateway: MakeGateway, certs: Certs
) -> None:
    upstream = await make_upstream("named")
    client = await make_gateway(upstream.url, {"ca_file": str(certs.ca_file)})
    await assert_bad_gateway(client, "TLS handshake failed")
    assert set(upstream.sni) == {None}  # no SNI for an IP address


async def test_a_server_name_the_certificate_does_not_carry_is_refused(
    make_upstream: MakeUpstream, make_gateway: MakeGateway, certs: Certs
) -> None:
    upstream = await make_upstream("named")
    tls = {"ca_file": str(certs.ca_file), "server_name": "other.internal"}
    client = await make_gateway(upstream.url, tls)
    await assert_bad_gateway(client, "TLS handshake failed")


# --- config validation ---------------------------------------------------------------------------


def _bad_tls_cases(certs: Certs, tmp: Path) -> dict[str, tuple[dict[str, Any], str, str]]:
    """id: (upstream block, key path, part of the problem)."""
    cert, key = str(certs.files["client"][0]), str(certs.files["client"][1])
    other_key = str(certs.files["ip"][1])
    missing = str(tmp / "nope.pem")
    junk = tmp / "junk.pem"
    junk.write_text("not a certificate\n")
    https = "https://127.0.0.1:9443"
    cases = [
        ("missing ca_file", {"url": https, "tls": {"ca_file": str(tmp / "nope.pem")}},
         "upstreams.secure.tls.ca_file", "cannot read"),
        ("ca_file is a directory", {"url": https, "tls": {"ca_file": str(tmp)}},
         "upstreams.secure.tls.ca_file", "cannot read"),
        ("ca_file not PEM", {"url": https, "tls": {"ca_file": str(junk)}},
         "upstreams.secure.tls.ca_file", "no PEM certificate"),
        ("missing cert_file", {"url": https, "tls": {"cert_file": missing, "key_file": key}},
         "upstreams.secure.tls.cert_file", "cannot read"),
        ("missing key_file", {"url": https, "tls": {"cert_file": cert, "key_file": missing}},
         "upstreams.secure.tls.key_file", "cannot read"),
        ("cert without key", {"url": https, "tls": {"cert_file": cert}},
         "upstreams.secure.tls.key_file", "required with cert_file"),
        ("key without cert", {"url": https, "tls": {"key_file": key}},
         "upstreams.secure.tls.key_file", "without cert_file"),
        ("key of another cert", {"url": https, "tls": {"cert_file": cert, "key_file": other_key}},
         "upstreams.secure.tls.key_file", "is not the key of cert_file"),
        ("key not PEM", {"url": https, "tls": {"cert_file": cert, "key_file": str(junk)}},
         "upstreams.secure.tls.key_file", "no unencrypted PEM private key"),
        ("tls on http", {"url": "http://127.0.0.1:9000", "tls": {"verify": False}},
         "upstreams.secure.tls", "only allowed on an https:// upstream"),
        ("bad server_name", {"url": https, "tls": {"server_name": "bad name"}},
         "upstreams.secure.tls.server_name", "must be a DNS name"),
        ("unknown tls key", {"url": https, "tls": {"verify_mode": "none"}},
         "upstreams.secure.tls.verify_mode", "unknown key"),
    ]
    return {case: (upstream, key_path, problem) for case, upstream, key_path, problem in cases}


BAD_TLS_CASES = [
    "missing ca_file", "ca_file is a directory", "ca_file not PEM", "missing cert_file", "missing key_file",
    "cert without key", "key without cert", "key of another cert", "key not PEM", "tls on http",
    "bad server_name", "unknown tls key",
]


@pytest.mark.parametrize("case", BAD_TLS_CASES)
def test_bad_upstream_tls_blocks_are_config_errors_naming_the_key(
    certs: Certs, tmp_path: Path, case: str
) -> None:
    cases = _bad_tls_cases(certs, tmp_path)
    assert sorted(cases) == sorted(BAD_TLS_CASES)
    upstream, key_path, problem = cases[case]
    data = {"upstreams": {"secure": upstream}, "routes": [{"prefix": "/", "upstream": "secure"}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "<test>")
    assert caught.value.key_path == key_path and problem in caught.value.problem, str(caught.value)


def test_good_tls_blocks_load(certs: Certs) -> None:
    cert, key = certs.files["client"]
    tls = {"ca_file": str(certs.ca_file), "cert_file": str(cert), "key_file": str(key),
           "server_name": "upstream.internal", "verify": True}
    loaded = parse_config({
        "upstreams": {"a": {"url": "HTTPS://127.0.0.1:9443", "tls": tls}, "b": {"url": "https://x.test"}},
        "routes": [{"prefix": "/", "upstream": "a"}],
        "listen": {"tls": {"cert_file": str(cert), "key_file": str(key)}},
    })
    upstream_tls = loaded.upstreams["a"].tls
    assert upstream_tls is not None and upstream_tls.server_name == "upstream.internal"
    assert loaded.upstreams["b"].tls is None
    assert loaded.listen.tls is not None and loaded.listen.tls.cert_file == str(cert)


@pytest.mark.parametrize("listen_tls, key_path, problem", [
    ({"cert_file": "/nonexistent/gateway.pem", "key_file": "/nonexistent/gateway.key"},
     "listen.tls.cert_file", "cannot read"),
    ({"key_file": "/nonexistent/gateway.key"}, "listen.tls.cert_file", "required key is missing"),
    ("cert only", "listen.tls.key_file", "required key is missing"),
    ("wrong key", "listen.tls.key_file", "is not the key of cert_file"),
])
def test_bad_listen_tls_is_a_config_error_naming_the_key(
    certs: Certs, listen_tls: Any, key_path: str, problem: str
) -> None:
    cert, _ = certs.files["ip"]
    if listen_tls == "cert only":
        listen_tls = {"cert_file": str(cert)}
    elif listen_tls == "wrong key":
        listen_tls = {"cert_file": str(cert), "key_file": str(certs.files["client"][1])}
    data = {"upstreams": {"a": {"url": "http://127.0.0.1:9000"}},
            "routes": [{"prefix": "/", "upstream": "a"}], "listen": {"tls": listen_tls}}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "<test>")
    assert caught.value.key_path == key_path and problem in caught.value.problem, str(caught.value)


def test_check_config_names_the_file_and_key_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "upstreams": {"secure": {"url": "https://127.0.0.1:9443", "tls": {"ca_file": "missing-ca.pem"}}},
        "routes": [{"prefix": "/", "upstream": "secure"}],
    }))
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"{path}: upstreams.secure.tls.ca_file: cannot read 'missing-ca.pem'" in result.stderr
    assert "Traceback" not in result.stderr


# --- the listener ---------------------------------------------------------------------------------


def test_no_listen_tls_means_plain_http(tmp_path: Path) -> None:
    assert listener_context(gateway_config(tmp_path, "http://127.0.0.1:9000", None)) is None


async def test_the_gateway_serves_https_with_listen_tls(
    make_upstream: MakeUpstream, certs: Certs, tmp_path: Path
) -> None:
    upstream = await make_upstream()
    cert, key = certs.files["ip"]
    config = gateway_config(
        tmp_path, upstream.url, {"ca_file": str(certs.ca_file)},
        listen={"host": "127.0.0.1", "port": 0, "tls": {"cert_file": str(cert), "key_file": str(key)}},
    )
    context = listener_context(config)
    assert context is not None
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        trusting = ssl.create_default_context()
        certs.ca.configure_trust(trusting)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{port}/_gateway/healthz", ssl=trusting) as response:
                assert response.status == 200
                assert await response.json() == {"status": "ok"}
            async with session.get(f"https://127.0.0.1:{port}/hello", ssl=trusting) as response:
                assert response.status == 200
                assert await response.json() == {"hello": "tls"}
            assert upstream.protos == ["https"]  # the client's scheme, as seen by the gateway
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(f"https://127.0.0.1:{port}/_gateway/healthz")  # system CAs only
            with pytest.raises(aiohttp.ServerDisconnectedError):  # no plain HTTP on the TLS port
                await session.get(f"http://127.0.0.1:{port}/_gateway/healthz")
    finally:
        await runner.cleanup()
