"""Proxies and private CAs (issue 10): a real CONNECT proxy on 127.0.0.1 in front of the
stand-in served over TLS with a test CA generated here. Everything is loopback and bounded."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import select
import socket
import ssl
import threading
import typing as t
from pathlib import Path

import pytest

cryptography = pytest.importorskip("cryptography")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from fake_orb import FakeOrb  # noqa: E402
from tests.conftest import (  # noqa: E402
    API_KEY,
    assert_no_secret,
    base_config,
    run_target,
    singer_lines,
    track,
)

ENV_NAMES = (
    "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
NETRC_PASSWORD = "netrc-password-never-sent"


def _write_test_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "target-orb test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "test-ca.pem"
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
    )
    return ca_path, cert_path, key_path


class ConnectProxy:
    """A small HTTP proxy on 127.0.0.1: CONNECT tunnels to loopback only; logs what it sees.

    `log` holds every request head it received in clear (what a real proxy could log).
    A plain (forwarding) request is logged and answered 502. Stops itself on `stop()`.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log: list[str] = []
        self.tunnels = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accept = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ConnectProxy:
        self._accept.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._accept.join(5)
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._socks.append(conn)
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with contextlib.suppress(OSError), conn:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            text = head.decode("latin-1")
            with self._lock:
                self.log.append(text + ("\n[body] " + rest.decode("latin-1") if rest else ""))
            method, target = [*text.split(" "), "", ""][:2]
            if method != "CONNECT":
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            host, _, port = target.rpartition(":")
            if host not in ("127.0.0.1", "localhost"):
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            upstream = socket.create_connection((host, int(port)), timeout=10)
            with self._lock:
                self._socks.append(upstream)
                self.tunnels += 1
            with upstream:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self._relay(conn, upstream)

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self._stop.is_set():
            ready, _, _ = select.select([a, b], [], [], 0.2)
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                peers[sock].sendall(data)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No proxy/CA variable from the machine; HOME holds a .netrc with other credentials."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text(
        f"machine 127.0.0.1\n  login netrc-user\n  password {NETRC_PASSWORD}\n"
        f"default\n  login netrc-user\n  password {NETRC_PASSWORD}\n"
    )
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[Path, Path, Path]:
    return _write_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_orb(pki) -> t.Iterator[FakeOrb]:
    """The stand-in Orb served over TLS with the test CA's certificate."""
    _, cert, key = pki
    fake = FakeOrb(api_key=API_KEY)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    fake._server.socket = context.wrap_socket(fake._server.socket, server_side=True)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def https_config(orb: FakeOrb, tmp_path: Path, **overrides: t.Any) -> dict[str, t.Any]:
    return base_config(orb, tmp_path, api_url=f"https://127.0.0.1:{orb.port}/v1", **overrides)


def assert_all_landed(orb: FakeOrb, n: int) -> None:
    assert sorted(e["idempotency_key"] for e in orb.events()) == sorted(
        f"m{i}" for i in range(1, n + 1)
    )
    assert orb.requests and all(r["authorization_ok"] for r in orb.requests)


def test_https_proxy_and_private_ca_are_used_and_netrc_is_not(clean_env, pki, tls_orb, tmp_path):
    ca, _, _ = pki
    with ConnectProxy() as proxy:
        clean_env.setenv("HTTPS_PROXY", proxy.url)
        clean_env.setenv("REQUESTS_CA_BUNDLE", str(ca))
        result = run_target(
            https_config(tls_orb, tmp_path), singer_lines([track(n) for n in range(1, 6)]),
            tmp_path, timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert_all_landed(tls_orb, 5)
    assert result.states == [{"bookmarks": {"tracks": {"seq": 5}}}]
    assert proxy.tunnels >= 1
    assert any(head.startswith(f"CONNECT 127.0.0.1:{tls_orb.port} ") for head in proxy.log)
    proxy_log = "\n".join(proxy.log)
    assert_no_secret(proxy_log, result.stderr)
    assert NETRC_PASSWORD not in proxy_log
    assert "netrc-user" not in proxy_log


def test_ssl_cert_file_is_honoured_like_orbs_own_sdk(clean_env, pki, tls_orb, tmp_path):
    ca, _, _ = pki
    clean_env.setenv("SSL_CERT_FILE", str(ca))
    result = run_target(https_config(tls_orb, tmp_path), singer_lines([track(1)]), tmp_path)
    assert result.returncode == 0, result.stderr
    assert_all_landed(tls_orb, 1)


def test_tls_is_verified_without_the_private_ca(clean_env, tls_orb, tmp_path):
    result = run_target(https_config(tls_orb, tmp_path), singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr
    assert "REQUESTS_CA_BUNDLE" in result.stderr  # says what to do
    assert "Traceback" not in result.stderr
    assert tls_orb.events() == []
    assert result.stdout == ""


def test_no_proxy_bypasses_the_proxy(clean_env, pki, tls_orb, tmp_path):
    ca, _, _ = pki
    with ConnectProxy() as proxy:
        clean_env.setenv("HTTPS_PROXY", proxy.url)
        clean_env.setenv("NO_PROXY", "localhost,127.0.0.1")
        clean_env.setenv("REQUESTS_CA_BUNDLE", str(ca))
        result = run_target(https_config(tls_orb, tmp_path), singer_lines([track(1)]), tmp_path)
    assert result.returncode == 0, result.stderr
    assert_all_landed(tls_orb, 1)
    assert proxy.log == []


def test_plain_http_to_a_loopback_stand_in_never_crosses_a_proxy(clean_env, orb, tmp_path):
    with ConnectProxy() as proxy:
        clean_env.setenv("HTTP_PROXY", proxy.url)
        clean_env.setenv("ALL_PROXY", proxy.url)
        result = run_target(base_config(orb, tmp_path), singer_lines([track(1)]), tmp_path)
    assert result.returncode == 0, result.stderr
    assert_all_landed(orb, 1)
    assert proxy.log == []  # the key would cross a proxy in clear over plain http


def test_unreachable_proxy_fails_clearly_without_its_credentials(clean_env, pki, tls_orb,
                                                                 tmp_path):
    ca, _, _ = pki
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]
    clean_env.setenv("HTTPS_PROXY", f"http://proxyuser:proxy-pass-123@127.0.0.1:{dead_port}")
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(ca))
    result = run_target(https_config(tls_orb, tmp_path), singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    assert "proxy" in result.stderr
    assert f"127.0.0.1:{dead_port}" in result.stderr
    assert "proxy-pass-123" not in result.stderr
    assert "HTTPS_PROXY" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_secret(result.stderr)


@pytest.mark.parametrize("name", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_missing_ca_bundle_file_is_named(clean_env, tls_orb, tmp_path, name):
    clean_env.setenv(name, str(tmp_path / "nope.pem"))
    result = run_target(https_config(tls_orb, tmp_path), singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    assert f"{name} is set to" in result.stderr
    assert "Traceback" not in result.stderr


def test_socks_proxy_is_refused_with_a_clear_message(clean_env, pki, tls_orb, tmp_path):
    ca, _, _ = pki
    clean_env.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(ca))
    result = run_target(https_config(tls_orb, tmp_path), singer_lines([track(1)]), tmp_path)
    assert result.returncode == 1
    assert "socks5://" in result.stderr and "does not support" in result.stderr
    assert "Traceback" not in result.stderr
