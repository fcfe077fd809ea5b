"""Consortium credentials: what TLS clients and Flower's node authentication need."""

import stat

import pytest
from cryptography import x509

from medfed.client.keys import generate_key_pair
from medfed.server.coordinator.certificates import init_consortium
from medfed.server.coordinator.start import admit_hospital
from medfed.shared_models.credentials import CredentialsError


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_and_coordinator_certificate(tmp_path):
    init_consortium(tmp_path, ["coordinator.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "coordinator.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"coordinator.example.org", "localhost"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {
        "10.1.2.3",
        "127.0.0.1",
    }
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(tmp_path / "ca.key") == _mode(tmp_path / "coordinator.key") == 0o600


def test_private_keys_are_never_overwritten(tmp_path):
    init_consortium(tmp_path, ["a"])
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(CredentialsError, match=r"ca\.pem already exists"):
        init_consortium(tmp_path, ["a"])
    assert (tmp_path / "ca.key").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca.key", "ca.pem", "coordinator.key", "coordinator.pem",
    ], "no hospital key is made on the coordinator's side"  # fmt: skip


def test_the_operator_refuses_a_private_key(tmp_path):
    """Admission takes the public key only: a private key handed over is refused unread."""
    private, _ = generate_key_pair(tmp_path, "site-a")
    with pytest.raises(CredentialsError, match="is a private key"):
        admit_hospital(private, "site-a", tmp_path / "state", None)
    with pytest.raises(CredentialsError, match="medfed node keygen site-b"):
        admit_hospital(tmp_path / "site-b.pub", "site-b", tmp_path / "state", None)


def test_only_operator_certificates_can_authenticate_a_client(tmp_path):
    """The proxy opens the Control API to a client certificate of the CA with OU=operators:
    an operator's certificate is exactly that; the coordinator's own is a server
    certificate only, so it cannot be presented as a client."""
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from medfed.server.coordinator.certificates import add_operator

    init_consortium(tmp_path, ["coordinator.example.org"])
    folder = add_operator(tmp_path, "alice")
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    operator = x509.load_pem_x509_certificate((folder / "alice.pem").read_bytes())
    operator.verify_directly_issued_by(ca)
    units = operator.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [u.value for u in units] == ["operators"]
    usage = operator.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _mode(folder / "alice.key") == 0o600
    assert (folder / "ca.pem").read_bytes() == (tmp_path / "ca.pem").read_bytes()
    assert not (folder / "ca.key").exists()
    server = x509.load_pem_x509_certificate((tmp_path / "coordinator.pem").read_bytes())
    server_usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(server_usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
