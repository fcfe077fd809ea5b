"""A hospital makes its own key pair: the private key is written at the site only."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from medfed.client.keys import generate_key_pair
from medfed.shared_models.credentials import CredentialsError


def test_keygen_writes_a_0600_private_key_and_its_public_half(tmp_path):
    private, public = generate_key_pair(tmp_path, "hospital-b")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == (
        key.public_key().public_numbers()
    )
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(CredentialsError, match=r"hospital-b\.key already exists"):
        generate_key_pair(tmp_path, "hospital-b")
    with pytest.raises(CredentialsError, match="lower-case letters"):
        generate_key_pair(tmp_path, "../escape")


def test_the_command_tells_the_hospital_what_to_send(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "node", "keygen", "site-a",
         "--out", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "send site-a.pub to the consortium operator" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-a.key", "site-a.pub"]
