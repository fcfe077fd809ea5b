"""`medfed node keygen`: a hospital's own key pair, made at the hospital.

The private key never leaves the site: the hospital sends only NAME.pub to
the consortium operator, who admits it (`medfed coordinator admit NAME
--public-key NAME.pub`). No one else can then act as this hospital, and the
audit logs can attribute what its node did. Keys are ECDSA P-384 in OpenSSH
format, which Flower's SuperNode authentication reads.
"""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medfed.shared_models.credentials import CredentialsError, write_new_file

HOSPITAL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def generate_key_pair(out: Path, name: str) -> tuple[Path, Path]:
    """out/NAME.key (0600, never overwritten) and out/NAME.pub."""
    if not HOSPITAL_NAME.match(name):
        raise CredentialsError(
            f"hospital name {name!r}: use lower-case letters, digits and "
            "dashes (it becomes a file name)"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    write_new_file(private_path, private, private=True)
    write_new_file(public_path, public + f" {name}\n".encode(), private=False)
    return private_path, public_path
