"""Consortium credentials: what TLS clients and Flower's node authentication need."""

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from medfed.server.certs import add_hospital, init_consortium
from medfed.shared_models.runtime import CredentialsError


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
    add_hospital(tmp_path, "hospital-a")
    with pytest.raises(CredentialsError, match=r"hospital-a\.key already exists"):
        add_hospital(tmp_path, "hospital-a")
    assert (tmp_path / "ca.key").read_bytes() == before


def test_hospital_folder_holds_only_ca_and_its_own_keys(tmp_path):
    init_consortium(tmp_path, ["a"])
    folder = add_hospital(tmp_path, "hospital-b")
    assert sorted(p.name for p in folder.iterdir()) == [
        "ca.pem",
        "hospital-b.key",
        "hospital-b.pub",
    ]
    key = load_ssh_private_key((folder / "hospital-b.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    public = load_ssh_public_key((folder / "hospital-b.pub").read_bytes())
    assert public.public_numbers() == key.public_key().public_numbers()
    assert _mode(folder / "hospital-b.key") == 0o600
    with pytest.raises(CredentialsError, match="lower-case letters"):
        add_hospital(tmp_path, "../escape")
