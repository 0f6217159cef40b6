"""Certificates: a private CA and the gateway's server certificate, made with ``cryptography``.

Theory of operation
-------------------
Legacy clients need *some* certificate they can be told to trust. When neither ``tls.cert_file``
nor ``tls.key_file`` exists, :func:`ensure_certificate` makes:

* an EC P-256 CA (``mailgate-ca.pem`` beside the certificate, its key ``mailgate-ca.key``):
  BasicConstraints CA critical, KeyUsage keyCertSign/cRLSign critical, SubjectKeyIdentifier;
* a server certificate signed by it, SANs = the configured hostname, ``localhost``,
  ``127.0.0.1`` and ``::1``; serverAuth EKU, AuthorityKeyIdentifier, digitalSignature KeyUsage.

Both pass OpenSSL's ``VERIFY_X509_STRICT``. Private keys are written with mode 0600 (created with
that mode, never chmod-ed after the fact) and atomically (temp file + rename). Users install the
CA certificate on their clients, or pin the server certificate's SHA-256 fingerprint, which
``mailgate certs`` prints.

If only one of the two files exists, nothing is generated: that is an admin's half-finished
set-up, and overwriting it would be wrong. :func:`ensure_certificate` says so instead.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=825)  # the longest lifetime Apple clients accept


@dataclass(frozen=True)
class CertificateInfo:
    cert_file: Path
    key_file: Path
    ca_file: Path | None  # None when the admin brought their own certificate
    sha256_fingerprint: str  # of the server certificate, AA:BB:... form
    created: bool


def fingerprint(cert: x509.Certificate) -> str:
    digest = cert.fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # in case the umask narrowed or widened it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    """A KeyUsage with only the named bits set: ``cert_sign`` is keyCertSign and cRLSign (the CA),
    ``digital_signature`` the server certificate's one use."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(common_name: str = "mailgate private CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    hostname: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys([hostname, "localhost"]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    for ip in ("127.0.0.1", "::1"):
        if x509.IPAddress(ipaddress.ip_address(ip)) not in sans:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def ca_paths(cert_file: Path) -> tuple[Path, Path]:
    return cert_file.with_name("mailgate-ca.pem"), cert_file.with_name("mailgate-ca.key")


def ensure_certificate(cert_file: Path, key_file: Path, hostname: str) -> CertificateInfo:
    """Create the CA and server certificate if both files are missing; describe what is there."""
    cert_exists, key_exists = cert_file.exists(), key_file.exists()
    ca_cert_file, ca_key_file = ca_paths(cert_file)
    created = False
    if not cert_exists and not key_exists:
        ca_cert, ca_key = make_ca()
        leaf, leaf_key = make_leaf(hostname, ca_cert, ca_key)
        _write_atomic(ca_key_file, _key_pem(ca_key), 0o600)
        _write_atomic(ca_cert_file, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write_atomic(key_file, _key_pem(leaf_key), 0o600)
        # The chain file holds the leaf then the CA, so clients get the whole chain.
        chain = leaf.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
            serialization.Encoding.PEM
        )
        _write_atomic(cert_file, chain, 0o644)
        created = True
    elif cert_exists != key_exists:
        missing, present = (key_file, cert_file) if cert_exists else (cert_file, key_file)
        raise ConfigError(
            f"tls: {present} exists but {missing} does not; provide both, or remove {present} "
            "to have mailgate generate a certificate"
        )
    try:
        leaf = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    except (ValueError, OSError) as exc:
        raise ConfigError(f"tls.cert_file: {cert_file} is not a PEM certificate ({exc})") from None
    return CertificateInfo(
        cert_file=cert_file,
        key_file=key_file,
        ca_file=ca_cert_file if ca_cert_file.exists() else None,
        sha256_fingerprint=fingerprint(leaf),
        created=created,
    )
