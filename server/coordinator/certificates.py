"""The consortium's credentials with `cryptography`: its CA and the coordinator's TLS
certificate.

Private keys are written 0600 and never overwritten: an existing file stops
the command with its path. Hospitals receive the CA certificate only; each
makes its own key pair at the site (`medfed node keygen`), and the operator
admits its public key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.shared_models.credentials import CredentialsError, write_new_file

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "coordinator.pem", "coordinator.key"
VALID_DAYS = 825  # the longest lifetime mainstream TLS clients still accept
OPERATOR_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def init_consortium(out: Path, hosts: list[str]) -> list[Path]:
    """CA + coordinator certificate valid for `hosts`, 127.0.0.1 and localhost."""
    names = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY]
    for name in names:
        if (out / name).exists():
            raise CredentialsError(f"{out / name} already exists; refusing to overwrite it")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert.subject, hosts)
    pem = serialization.Encoding.PEM
    write_new_file(out / CA_KEY, _pem_key(ca_key), private=True)
    write_new_file(out / CA_CERT, ca_cert.public_bytes(pem), private=False)
    write_new_file(out / SERVER_KEY, _pem_key(server_key), private=True)
    write_new_file(out / SERVER_CERT, server_cert.public_bytes(pem), private=False)
    return [out / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(
        now + dt.timedelta(days=VALID_DAYS)
    )


def _ca_certificate(ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The self-signed consortium CA: signs certificates, nothing else."""
    ca_name = _name("medfed consortium CA")
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
    )
    return _validity(builder).sign(ca_key, hashes.SHA384())


def _server_certificate(
    server_key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    hosts: list[str],
) -> x509.Certificate:
    """The coordinator's TLS server certificate, valid for `hosts`, localhost and 127.0.0.1."""
    names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    alternatives: list[x509.GeneralName] = []
    for host in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alternatives.append(x509.DNSName(host))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return _validity(builder).sign(ca_key, hashes.SHA384())


def add_operator(out: Path, name: str) -> Path:
    """operators/NAME/: an operator's client certificate and key, and the CA certificate.

    Signed by the consortium CA for client authentication only: with it, the
    operator's connection (`medfed operator connect`) reaches the Control API
    through the coordinator's proxy; without one, nothing but the Fleet API
    answers.
    """
    if not OPERATOR_NAME.match(name):
        raise CredentialsError(
            f"operator name {name!r}: use lower-case letters, digits and dashes "
            "(it becomes a file and folder name)"
        )
    for needed in (CA_CERT, CA_KEY):
        if not (out / needed).is_file():
            raise CredentialsError(f"{out / needed} not found: run `medfed certs init` first")
    ca_key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed consortium"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "operators"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    cert = _validity(builder).sign(ca_key, hashes.SHA384())
    folder = out / "operators" / name
    write_new_file(folder / f"{name}.key", _pem_key(key), private=True)
    write_new_file(folder / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), False)
    if not (folder / CA_CERT).exists():
        write_new_file(folder / CA_CERT, (out / CA_CERT).read_bytes(), private=False)
    return folder
