"""The throwaway PKI a loopback control plane needs: one CA, a few leaves, an SA key."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=7)
# The in-cluster names clients use for the API server, plus the first service IP.
_APISERVER_DNS = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """PEM files on disk, named the way the components' flags want them."""

    cert: Path
    key: Path

    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    def key_pem(self) -> bytes:
        return self.key.read_bytes()


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: KeyPair
    apiserver: KeyPair
    admin: KeyPair
    kubelet_client: KeyPair
    service_account_key: Path
    service_account_pub: Path


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(parts)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(directory: Path, stem: str, cert: x509.Certificate, key_pem: bytes) -> KeyPair:
    pair = KeyPair(cert=directory / f"{stem}.crt", key=directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key_pem)
    pair.key.chmod(0o600)
    return pair


def _leaf(
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> tuple[x509.Certificate, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), _key_pem(key)


def _load_ca(ca: KeyPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert_pem())
    key = serialization.load_pem_private_key(ca.key_pem(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def client_cert(ca: KeyPair, directory: Path, *, stem: str, user: str, group: str) -> KeyPair:
    """A client certificate from the cluster's CA, e.g. a node's (system:node:<name>)."""
    ca_cert, ca_key = _load_ca(ca)
    cert, key = _leaf(
        ca_cert=ca_cert,
        ca_key=ca_key,
        subject=_name(user, group),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[],
    )
    directory.mkdir(parents=True, exist_ok=True)
    return _write(directory, stem, cert, key)


def generate(directory: Path, *, service_ip: str, address: str = "127.0.0.1") -> Pki:
    """Write CA, API server serving cert, admin and kubelet-client certs, SA signing key."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("smtprelay-test-ca"))
        .issuer_name(_name("smtprelay-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca = _write(directory, "ca", ca_cert, _key_pem(ca_key))

    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in _APISERVER_DNS]
    ips = sorted({"127.0.0.1", service_ip, address})
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    serving = _leaf(
        ca_cert=ca_cert,
        ca_key=ca_key,
        subject=_name("kube-apiserver"),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
    )
    # system:masters is what the controller manager, scheduler and kwok run as too:
    # this cluster exists for one test session, per-component identities buy nothing.
    admin = _leaf(
        ca_cert=ca_cert,
        ca_key=ca_key,
        subject=_name("smtprelay-admin", "system:masters"),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[],
    )

    # What the API server shows kubelets for logs/exec/port-forward (the kubelet authorizes
    # it through the API server's webhook, so it needs a group RBAC lets do that).
    kubelet_client = _leaf(
        ca_cert=ca_cert,
        ca_key=ca_key,
        subject=_name("kube-apiserver-kubelet-client", "system:masters"),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[],
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_key_path = directory / "sa.key"
    sa_key_path.write_bytes(_key_pem(sa_key))
    sa_key_path.chmod(0o600)
    sa_pub_path = directory / "sa.pub"
    sa_pub_path.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Pki(
        ca=ca,
        apiserver=_write(directory, "apiserver", *serving),
        admin=_write(directory, "admin", *admin),
        kubelet_client=_write(directory, "kubelet-client", *kubelet_client),
        service_account_key=sa_key_path,
        service_account_pub=sa_pub_path,
    )
