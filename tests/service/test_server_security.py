"""Mutual TLS, bearer tokens, override policy and safe defaults, with certificates made by
openssl in the test and the real client."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vaegan.service.client import OutlierClient, OutlierClientError
from vaegan.service.runtime import Runtime
from vaegan.service.server.auth import TokenSet, hash_token
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.testing import ServerThread, sample_sum

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
IMAGE = np.full((32, 32, 3), 120, np.uint8)
TOKEN = "s3cret-token-for-tests"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "1", "-subj", f"/CN={name}", cwd=d)


def _signed(d: Path, name: str, ca: str, san: str | None = None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=d)
    extra: list[str] = []
    if san:
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "1", *extra, cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _signed(d, "server", "ca", san="DNS:localhost,IP:127.0.0.1")
    _signed(d, "client", "ca")
    _signed(d, "rogue", "rogue-ca")
    return d


@pytest.fixture(scope="module")
def rt(tiny_bundle: Path) -> Runtime:
    return Runtime.load(tiny_bundle, providers="cpu")


def _client(srv: ServerThread, pki: Path | None = None, cert: str | None = None, **kw) -> OutlierClient:
    if pki is None:
        return OutlierClient(srv.target, timeout=10, retries=0, **kw)
    key = (pki / f"{cert}.key").read_bytes() if cert else None
    chain = (pki / f"{cert}.pem").read_bytes() if cert else None
    return OutlierClient(srv.target, timeout=10, retries=0, root_certificates=(pki / "ca.pem").read_bytes(),
                         private_key=key, certificate_chain=chain, **kw)


@pytest.fixture(scope="module")
def mtls_server(tiny_bundle: Path, rt: Runtime, pki: Path) -> Iterator[ServerThread]:
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1, tls_cert_file=pki / "server.pem",
                        tls_key_file=pki / "server.key", tls_client_ca_file=pki / "ca.pem")
    with ServerThread(cfg, rt) as srv:
        yield srv


def test_mtls_admits_only_clients_with_a_certificate_from_the_ca(mtls_server: ServerThread, pki: Path) -> None:
    with _client(mtls_server, pki, "client") as c:
        assert len(c.score(IMAGE[None])) == 1
    for cert in (None, "rogue"):  # no client certificate; one from another CA
        with _client(mtls_server, pki, cert) as c, pytest.raises(OutlierClientError) as err:
            c.score(IMAGE[None])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, cert


@pytest.fixture(scope="module")
def token_server(tiny_bundle: Path, rt: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    d = tmp_path_factory.mktemp("tokens")
    (d / "tokens.txt").write_text(f"# accepted tokens\nci: {hash_token(TOKEN)}\n{hash_token('another')}\n")
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=-1,
                        auth_tokens_file=d / "tokens.txt", allow_overrides=False)
    with ServerThread(cfg, rt) as srv:
        yield srv


def test_tokens_are_required_for_the_service_but_not_for_health(token_server: ServerThread, caplog) -> None:
    for token in (None, "wrong"):
        with _client(token_server, token=token) as c, pytest.raises(OutlierClientError) as err:
            c.score(IMAGE[None])
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with _client(token_server, token=TOKEN) as c:
        assert len(c.score(IMAGE[None])) == 1
        assert c.model_info().name  # every vaegan.v1 method is covered
    with grpc.insecure_channel(token_server.target) as ch:  # probes carry no token
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    registry = token_server.server.metrics.registry
    assert sample_sum(registry, "vaegan_requests_total", {"method": "Score", "code": "UNAUTHENTICATED"}) == 2
    assert TOKEN not in caplog.text and "wrong" not in caplog.text


def test_overrides_can_be_forbidden(token_server: ServerThread) -> None:
    with _client(token_server, token=TOKEN) as c:
        for kw in ({"weights": {"disc": 0.0}}, {"threshold": 1.0}):
            with pytest.raises(OutlierClientError) as err:
                c.score(IMAGE[None], **kw)
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "--allow-overrides" in err.value.details


def test_tokens_file_format_is_checked(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("not-a-digest\n")
    with pytest.raises(ValueError, match="line 1 is not a SHA-256 hex digest"):
        TokenSet.load(tmp_path / "t.txt")
    (tmp_path / "e.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no token digests"):
        TokenSet.load(tmp_path / "e.txt")


def test_safe_defaults_and_settings_checks(tmp_path: Path) -> None:
    d = ServiceConfig(model=Path("m"))
    assert d.metrics_host == "127.0.0.1" and d.max_concurrent_rpcs > 0 and d.allow_overrides
    with pytest.raises(ValueError, match="needs tls_cert_file"):
        ServiceConfig(model=Path("m"), tls_client_ca_file=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="auth_tokens_file .*: no such file"):
        ServiceConfig(model=Path("m"), auth_tokens_file=tmp_path / "missing.txt")


def test_a_tls_key_that_does_not_match_its_certificate_is_named(pki: Path) -> None:
    """gRPC reported this as a failure to bind the port."""
    with pytest.raises(ValueError, match="tls_key_file .*client.key does not match tls_cert_file"):
        ServiceConfig(model=Path("m"), tls_cert_file=pki / "server.pem", tls_key_file=pki / "client.key")


def _scrape(url: str, ctx=None, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    import base64
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url)
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def metrics_server(tiny_bundle: Path, rt: Runtime, pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    users = tmp_path_factory.mktemp("auth") / "metrics-users.txt"
    users.write_text(f"# scrapers\nprometheus:{hash_token('scrape-pass')}\n")
    cfg = ServiceConfig(model=tiny_bundle, host="127.0.0.1", port=0, metrics_port=0,
                        metrics_tls_cert_file=pki / "server.pem", metrics_tls_key_file=pki / "server.key",
                        metrics_tls_client_ca_file=pki / "ca.pem", metrics_basic_auth_file=users)
    with ServerThread(cfg, rt) as srv:
        yield srv


def test_metrics_over_mutual_tls_with_basic_auth(metrics_server: ServerThread, pki: Path) -> None:
    import ssl
    import urllib.error

    port = metrics_server.metrics_port
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(pki / "client.pem", pki / "client.key")
    url = f"https://127.0.0.1:{port}/metrics"
    status, body = _scrape(url, ctx, ("prometheus", "scrape-pass"))
    assert status == 200 and "vaegan_requests_total" in body and "vaegan_inflight_pixels" in body
    assert _scrape(url, ctx)[0] == 401  # no credentials
    assert _scrape(url, ctx, ("prometheus", "wrong"))[0] == 401
    assert _scrape(url, ctx, ("someone", "scrape-pass"))[0] == 401
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):  # plain HTTP is not served
        _scrape(f"http://127.0.0.1:{port}/metrics")
    rogue = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    rogue.load_cert_chain(pki / "rogue.pem", pki / "rogue.key")
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):  # a client cert from another CA
        _scrape(url, rogue, ("prometheus", "scrape-pass"))
    # a silent client that never starts its handshake does not hold up the next scrape
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5):
        assert _scrape(url, ctx, ("prometheus", "scrape-pass"))[0] == 200


def test_metrics_security_settings_are_checked(tmp_path: Path, pki: Path, tiny_bundle: Path) -> None:
    from vaegan.service.server.auth import BasicAuth

    with pytest.raises(ValueError, match="go together"):
        ServiceConfig(model=tiny_bundle, metrics_tls_cert_file=pki / "server.pem")
    with pytest.raises(ValueError, match="metrics_tls_key_file .* does not match"):
        ServiceConfig(model=tiny_bundle, metrics_tls_cert_file=pki / "server.pem", metrics_tls_key_file=pki / "client.key")
    bad = tmp_path / "users.txt"
    bad.write_text("prometheus:not-a-digest\n")
    with pytest.raises(ValueError, match="line 1 is not 'user:<SHA-256 hex"):
        BasicAuth.load(bad)
    bad.write_text("a:b:" + hash_token("pw") + "\n")  # basic auth cannot carry a user name with a colon
    with pytest.raises(ValueError, match="line 1"):
        BasicAuth.load(bad)
    import base64

    ok = BasicAuth({"a": hash_token("b:pw")})  # the password may hold colons
    assert ok.check("Basic " + base64.b64encode(b"a:b:pw").decode()) is True
    assert ok.check("Basic !!!") is False and ok.check(None) is False and ok.check("Bearer x") is False
