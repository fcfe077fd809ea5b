"""The coordinator's front door, with a real nginx: each API reaches only its role, and
every request stays within its bounds.

A stand-in SuperLink (TLS on loopback, with the coordinator's certificate)
answers "superlink" to whatever reaches it, so a request either got through
(200) or was stopped by the proxy (403, 404, or a refused handshake). Paths
are sent byte for byte (http.client), as an attacker would send them.
"""

from __future__ import annotations

import datetime
import http.client
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.server import cli
from medfed.server.coordinator import certificates as certs
from medfed.server.coordinator import proxy
from medfed.shared_models.supervision import free_port


class StandIn(BaseHTTPRequestHandler):
    """Reads the whole body and answers how many bytes reached it."""

    def do_POST(self) -> None:
        got = len(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(f"superlink {got}".encode())

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
def consortium(tmp_path_factory):
    """The consortium's certificates, tricky client certificates, and the stand-in."""
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
    try:
        yield {"folder": folder, "upstream": upstream.server_address[1], "clients": clients}
    finally:
        upstream.shutdown()


@contextmanager
def _nginx(consortium, limits: proxy.Limits) -> Iterator[dict]:
    """nginx with the coordinator's configuration and `limits` in front of the stand-in."""
    folder, port = consortium["folder"], free_port()
    state = Path(tempfile.mkdtemp(dir=folder, prefix="nginx-"))
    door = proxy.FrontDoor(
        ("127.0.0.1", port),
        (folder / "coordinator.pem", folder / "coordinator.key", folder / "ca.pem"),
        proxy.Upstream(consortium["upstream"], folder / "ca.pem"),
        state,
        limits,
    )
    conf = state / "nginx.conf"
    conf.write_text(proxy.nginx_conf(door, proxy.worker_user(state)))
    log = state / "nginx.log"
    nginx = subprocess.Popen(
        proxy.nginx_command(conf), stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    try:
        door = {"port": port, "ca": folder / "ca.pem", "clients": consortium["clients"]}
        deadline = time.monotonic() + 30
        while _status(door, "/health") != 200:
            assert time.monotonic() < deadline and nginx.poll() is None, log.read_text()
            time.sleep(0.2)
        yield door
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)


@pytest.fixture(scope="module")
def front_door(consortium):
    """The coordinator's front door with its default limits."""
    with _nginx(consortium, proxy.Limits()) as door:
        yield door


def _post(
    door, path: str, client: str | None = None, host: str | None = None, **sent
) -> tuple[int, bytes]:
    """POST `path` (sent as is): the status and body; status 0 when the TLS handshake is
    refused or the connection closed. `sent`: `body` (bytes, or an iterable of chunks,
    sent chunked) and `source`, the client's own address."""
    context = ssl.create_default_context(cafile=str(door["ca"]))
    if client is not None:
        context.load_cert_chain(*door["clients"][client])
    source = (sent["source"], 0) if "source" in sent else None
    connection = http.client.HTTPSConnection(
        "127.0.0.1", door["port"], context=context, timeout=30, source_address=source
    )
    try:
        body = sent.get("body", b"")
        headers = {"Host": host} if host else {}
        connection.request("POST", path, body=body, headers=headers,
                           encode_chunked=not isinstance(body, bytes))  # fmt: skip
        response = connection.getresponse()
        return response.status, response.read()
    except (ssl.SSLError, ConnectionError):
        return 0, b""
    finally:
        connection.close()


def _status(door, path: str, client: str | None = None, host: str | None = None) -> int:
    """The status of an empty POST `path` (see `_post`)."""
    return _post(door, path, client, host)[0]


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


@pytest.mark.parametrize(
    "path",
    [
        *CONTROL_TRICKS[1:],
        "/v1/control/../fleet/pull-messages",
        "/v1/fleet/./pull-messages",
        "/v1/fleet//pull-messages",
        "/v1/fleet/pull%2Dmessages",
        "/v1/fleet/pull-messages?x=1",
        "/health/",
    ],
)
def test_only_plain_endpoint_paths_are_forwarded(front_door, path):
    """nginx routes on the normalised path but forwards the raw one, which the SuperLink
    decodes on its own terms: a raw path that is not plain never reaches it, whoever asks."""
    assert _status(front_door, path, client="operator") == 404
    assert _status(front_door, path) in (403, 404)


@pytest.mark.parametrize("client", ["cn-trick", "foreign", "server-cert"])
def test_only_an_operators_certificate_opens_control(front_door, client):
    assert _status(front_door, "/v1/control/list-runs", client="operator") == 200
    # 400: nginx refuses a certificate that does not verify against the consortium CA as
    # a client's (another CA's, the server's own); 403: it verifies, but is no operator's
    assert _status(front_door, "/v1/control/list-runs", client=client) in (0, 400, 403)


@pytest.mark.parametrize(
    "path", ["/v1/runtime/flwr.proto.Runtime/GetRun", "/v1/serverappio/x", "/docs", "/"]
)
def test_the_runtime_api_and_everything_else_stay_inside(front_door, path):
    assert _status(front_door, path) == 404
    assert _status(front_door, path, client="operator") == 404


def test_hospitals_reach_the_fleet_api(front_door):
    assert _status(front_door, "/v1/fleet/pull-messages") == 200
    assert _status(front_door, "/health") == 200


MIB = 1024 * 1024
TIGHT = proxy.Limits(fleet_body_mib=1, control_body_mib=2)


@pytest.fixture(scope="module")
def tight_door(consortium):
    """The front door with 1 MiB Fleet and 2 MiB Control bodies."""
    with _nginx(consortium, TIGHT) as door:
        yield door


def _chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    while total > 0:
        yield b"x" * min(size, total)
        total -= size


@pytest.mark.parametrize(
    ("path", "client", "limit"),
    [
        ("/v1/fleet/push-object", None, TIGHT.fleet_body_mib * MIB),
        ("/v1/control/start-run", "operator", TIGHT.control_body_mib * MIB),
    ],
)
def test_each_route_takes_bodies_up_to_its_own_limit(tight_door, path, client, limit):
    """A body at its route's limit reaches the SuperLink whole; one byte more is refused
    (413) whether its size is declared or only counted as it streams in."""
    whole = (200, f"superlink {limit}".encode())
    assert _post(tight_door, path, client, body=b"x" * limit) == whole
    assert _post(tight_door, path, client, body=b"x" * (limit + 1))[0] == 413
    assert _post(tight_door, path, client, body=_chunks(limit + 1))[0] == 413
    assert _post(tight_door, path, client, body=_chunks(limit))[0] == 200


def test_control_is_bounded_too_and_larger_than_fleet(tight_door):
    """Control takes an app package larger than any Fleet body, but not without bound; a
    Fleet route never takes a Control-sized body."""
    between = (TIGHT.fleet_body_mib + TIGHT.control_body_mib) * MIB // 2
    assert _post(tight_door, "/v1/control/start-run", "operator", body=b"x" * between)[0] == 200
    assert _post(tight_door, "/v1/fleet/push-messages", body=b"x" * between)[0] == 413
    assert _post(tight_door, "/health", body=b"x" * between)[0] == 413


def _held_request(door, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A Fleet request whose body never comes: nginx holds it open, counted against its
    client address (its "100 Continue" says nginx took it past the connection limit)."""
    context = ssl.create_default_context(cafile=str(door["ca"]))
    raw = socket.create_connection(("127.0.0.1", door["port"]), 10, (source, 0))
    held = context.wrap_socket(raw, server_hostname="127.0.0.1")
    held.sendall(
        b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
    )
    assert held.recv(64).startswith(b"HTTP/1.1 100 Continue")
    return held


def test_one_client_address_gets_its_share_of_connections(consortium):
    limits = proxy.Limits(connections_per_client=4, requests_per_second=1000)
    with _nginx(consortium, limits) as door:
        held = [_held_request(door) for _ in range(limits.connections_per_client)]
        try:
            assert _status(door, "/v1/fleet/pull-messages") == 503
            assert _post(door, "/v1/fleet/pull-messages", source="127.0.0.2")[0] == 200
        finally:
            for request in held:
                request.close()


def test_one_client_address_gets_its_share_of_the_request_rate(consortium):
    limits = proxy.Limits(requests_per_second=1)  # a burst of 2 passes at once
    with _nginx(consortium, limits) as door:
        statuses = [_status(door, "/v1/fleet/pull-messages") for _ in range(20)]
        assert statuses[0] == 200 and set(statuses) == {200, 503}
        assert _post(door, "/v1/fleet/pull-messages", source="127.0.0.2")[0] == 200


def test_a_coordinator_without_nginx_stops_with_one_line(consortium, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(proxy, "NGINX_DIRS", ())
    state = tmp_path / "state"
    code = cli.main(["coordinator", "start", "--certs", str(consortium["folder"]),
                     "--port", str(free_port()), "--state", str(state)])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error, error
    assert "nginx not found" in error and "apt-get install nginx" in error
    assert not (state / "audit.jsonl").exists(), "nothing started"


@pytest.mark.skipif(os.geteuid() != 0, reason="nginx picks its workers' user only as root")
def test_as_root_the_workers_run_as_the_state_folders_owner(tmp_path):
    """They write request bodies under it; an owner without a name is one clear error."""
    assert proxy.worker_user(tmp_path) == "root root"
    os.chown(tmp_path, 54321, 54321)  # no such user here
    with pytest.raises(RuntimeError, match=f"{tmp_path}: its owner \\(uid 54321"):
        proxy.worker_user(tmp_path)
