"""The coordinator's front door, with a real Caddy: each API reaches only its role.

A stand-in SuperLink (TLS on loopback, with the coordinator's certificate)
answers "superlink" to whatever reaches it, so a request either got through
(200) or was stopped by the proxy (403, 404, or a refused handshake). Paths
are sent byte for byte (http.client), as an attacker would send them.
"""

from __future__ import annotations

import datetime
import http.client
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.server import certs, proxy
from medfed.shared_models.runtime import free_port


class StandIn(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"superlink")

    do_GET = do_POST

    def log_message(self, *args) -> None:
        pass


def _client_cert(folder: Path, name: str, subject: x509.Name, signer) -> tuple[Path, Path]:
    """A clientAuth certificate for `subject`, signed by `signer` = (key, issuer name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(signer[1])
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(signer[0], hashes.SHA256())
    )  # fmt: skip
    pem, private = folder / f"{name}.pem", folder / f"{name}.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem, private


@pytest.fixture(scope="module")
def front_door(tmp_path_factory):
    """Caddy with the coordinator's Caddyfile in front of the stand-in; the credentials."""
    folder = tmp_path_factory.mktemp("proxy")
    certs.init_consortium(folder, ["127.0.0.1"])
    operator = certs.add_operator(folder, "alice")
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    foreign_key = ec.generate_private_key(ec.SECP256R1())
    foreign_ca = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another CA")])
    operators_ou = x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "operators")
    clients = {
        "operator": (operator / "alice.pem", operator / "alice.key"),
        # the consortium's CA, but a name that only spells ",OU=operators" inside its CN
        "cn-trick": _client_cert(
            folder, "cn-trick",
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x,OU=operators")]),
            (ca_key, ca.subject),
        ),
        # OU=operators, signed by someone else
        "foreign": _client_cert(
            folder, "foreign",
            x509.Name([operators_ou, x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]),
            (foreign_key, foreign_ca),
        ),
        # the coordinator's own certificate is for serving, not for clients
        "server-cert": (folder / "coordinator.pem", folder / "coordinator.key"),
    }  # fmt: skip
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(folder / "coordinator.pem", folder / "coordinator.key")
    upstream.socket = tls.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    caddyfile = folder / "Caddyfile"
    caddyfile.write_text(
        proxy.coordinator_caddyfile(
            ("127.0.0.1", port),
            (folder / "coordinator.pem", folder / "coordinator.key", folder / "ca.pem"),
            proxy.Upstream(upstream.server_address[1], folder / "ca.pem"),
        )
    )
    caddy = subprocess.Popen(
        proxy.caddy_command(caddyfile), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        door = {"port": port, "ca": folder / "ca.pem", "clients": clients}
        deadline = time.monotonic() + 30
        while _status(door, "/health") != 200:
            assert time.monotonic() < deadline and caddy.poll() is None, "caddy did not start"
            time.sleep(0.2)
        yield door
    finally:
        caddy.terminate()
        caddy.wait(timeout=10)
        upstream.shutdown()


def _status(door, path: str, client: str | None = None, host: str | None = None) -> int:
    """The status of POST `path` (sent as is); 0 when the TLS handshake is refused."""
    context = ssl.create_default_context(cafile=str(door["ca"]))
    if client is not None:
        context.load_cert_chain(*door["clients"][client])
    connection = http.client.HTTPSConnection("127.0.0.1", door["port"], context=context, timeout=5)
    try:
        headers = {"Host": host} if host else {}
        connection.request("POST", path, body=b"", headers=headers)
        return connection.getresponse().status
    except (ssl.SSLError, ConnectionError):
        return 0
    finally:
        connection.close()


CONTROL_TRICKS = [
    "/v1/control/list-runs",
    "//v1/control/list-runs",
    "/v1//control/list-runs",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/..%2Fcontrol/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/%63ontrol/list-runs",
    "/V1/CONTROL/list-runs",
    "/v1/control%2Flist-runs",
    "/v1/control/list-runs?x=1",
]


@pytest.mark.parametrize("path", CONTROL_TRICKS)
def test_without_an_operator_certificate_no_path_reaches_control(front_door, path):
    assert _status(front_door, path) in (403, 404)
    assert _status(front_door, path, host="evil.example") in (403, 404)


@pytest.mark.parametrize("client", ["cn-trick", "foreign", "server-cert"])
def test_only_an_operators_certificate_opens_control(front_door, client):
    assert _status(front_door, "/v1/control/list-runs", client="operator") == 200
    assert _status(front_door, "/v1/control/list-runs", client=client) in (0, 403)


@pytest.mark.parametrize(
    "path", ["/v1/runtime/flwr.proto.Runtime/GetRun", "/v1/serverappio/x", "/docs", "/"]
)
def test_the_runtime_api_and_everything_else_stay_inside(front_door, path):
    assert _status(front_door, path) == 404
    assert _status(front_door, path, client="operator") == 404


def test_hospitals_reach_the_fleet_api(front_door):
    assert _status(front_door, "/v1/fleet/pull-messages") == 200
    assert _status(front_door, "/health") == 200
