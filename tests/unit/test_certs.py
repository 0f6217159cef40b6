"""Generated certificates: strict X.509 verification for every SAN, 0600 keys, fingerprints."""

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from gateway.certs import ensure_certificate
from gateway.errors import ConfigError


def _serve_once(ctx: ssl.SSLContext, sock: socket.socket) -> None:
    conn, _ = sock.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"hello")
    except (ssl.SSLError, OSError):
        pass


def test_generated_certificate_verifies_strictly_for_each_san(tmp_path: Path) -> None:
    cert, key = tmp_path / "certs/mailgate.pem", tmp_path / "certs/mailgate.key"
    info = ensure_certificate(cert, key, "mail.example.lan")
    assert info.created and info.ca_file == tmp_path / "certs/mailgate-ca.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "certs/mailgate-ca.key").stat().st_mode) == 0o600
    assert len(info.sha256_fingerprint.split(":")) == 32

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    for name, family, addr in [
        ("mail.example.lan", socket.AF_INET, "127.0.0.1"),
        ("localhost", socket.AF_INET, "127.0.0.1"),
        ("127.0.0.1", socket.AF_INET, "127.0.0.1"),
        ("::1", socket.AF_INET6, "::1"),
    ]:
        client_ctx = ssl.create_default_context(cafile=str(info.ca_file))
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        with socket.socket(family) as srv:
            srv.bind((addr, 0))
            srv.listen(1)
            t = threading.Thread(target=_serve_once, args=(server_ctx, srv))
            t.start()
            with socket.create_connection(srv.getsockname()[:2], timeout=5) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=name) as tls:
                    assert tls.recv(5) == b"hello"
            t.join(5)


def test_a_name_not_in_the_certificate_is_refused(tmp_path: Path) -> None:
    info = ensure_certificate(tmp_path / "c.pem", tmp_path / "c.key", "mail.example.lan")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(info.cert_file, info.key_file)
    client_ctx = ssl.create_default_context(cafile=str(info.ca_file))
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        t = threading.Thread(target=_serve_once, args=(server_ctx, srv))
        t.start()
        with socket.create_connection(srv.getsockname(), timeout=5) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                client_ctx.wrap_socket(raw, server_hostname="other.example.lan")
        t.join(5)


def test_existing_certificate_is_kept_and_half_pairs_are_refused(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    first = ensure_certificate(cert, key, "a.lan")
    before = cert.read_bytes()
    again = ensure_certificate(cert, key, "a.lan")
    assert not again.created and cert.read_bytes() == before
    assert again.sha256_fingerprint == first.sha256_fingerprint
    key.unlink()
    with pytest.raises(ConfigError, match="exists but .* does not"):
        ensure_certificate(cert, key, "a.lan")
