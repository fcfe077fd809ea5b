"""A real coordinator (`medfed coordinator start`: nginx in front of a real
flower-superlink) under the attack of issue 23: an outsider, with no node key and no
certificate, streams oversized bodies to the Fleet API, several at once.

Flower parses a Fleet request's whole body before it checks the node's signature,
so every byte that reached the SuperLink would be held in its memory (one 400 MiB
POST took it from 144 MiB to 945 MiB, for good). The proxy must refuse each body
before the SuperLink sees a byte of it, and the coordinator must go on serving.
"""

from __future__ import annotations

import select
import socket
import ssl
import sys
import threading
from pathlib import Path

import httpx
import pytest
from flwr.proto.control_pb2 import ListRunsRequest, ListRunsResponse

from medfed.server.coordinator.proxy import Limits
from medfed.shared_models.supervision import flower_env, free_port
from tests.deployment import answers, medfed, spawn, stop_all, tree, wait

pytestmark = pytest.mark.e2e
MIB = 1024 * 1024
STREAMS = 8
EACH = 16 * Limits().fleet_body_mib * MIB  # sixteen times the default Fleet limit: 128 MiB
BOUND = 64 * MIB  # what the SuperLink's processes may grow by: less than one such body


def _resident(pids: set[int]) -> int:
    """Resident memory of `pids` together, in bytes."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss = next((line for line in status.splitlines() if line.startswith("VmRSS:")), "")
        total += int(rss.split()[1]) * 1024 if rss else 0
    return total


def _settled(superlink: int) -> int:
    """The resident memory of `superlink`'s process tree once its start-up is over (the
    SuperExec it starts goes on importing Flower for seconds): 3 samples within 1 MiB."""
    samples: list[int] = []

    def steady() -> bool:
        samples.append(_resident(tree(superlink)))
        return len(samples) >= 3 and max(samples[-3:]) - min(samples[-3:]) < MIB

    wait(steady, 60, "the SuperLink's memory to settle")
    return samples[-1]


def _superlink(coordinator: int) -> int:
    """The pid of the flower-superlink that `coordinator` started."""
    for pid in sorted(tree(coordinator)):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flower-superlink" in command:
            return pid
    raise AssertionError("no flower-superlink under the coordinator")


def _stream(port: int, ca: Path, chunked: bool) -> str:
    """POST far more than the limit to /v1/fleet/push-messages, 1 MiB at a time, with no
    key and no certificate, until the proxy answers or closes: what it did, and how much
    was sent ("413 after 9 MiB", "closed after 12 MiB")."""
    context = ssl.create_default_context(cafile=str(ca))
    sent, answer = 0, None
    with context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="127.0.0.1"
    ) as sock:
        size = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {EACH}"
        sock.sendall(
            f"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/protobuf\r\n{size}\r\n\r\n".encode()
        )
        chunk = (b"%x\r\n" % MIB + b"\n" * MIB + b"\r\n") if chunked else b"\n" * MIB
        try:
            while sent < EACH and (answer := _answer(sock)) is None:
                sock.sendall(chunk)
                sent += MIB
            answer = answer if answer is not None else sock.recv(64)
        except OSError:
            answer = b""
    what = answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"
    return f"{what} after {sent // MIB} MiB"


def _answer(sock: ssl.SSLSocket) -> bytes | None:
    """What the proxy has answered so far (b"" when it closed), None while it says nothing:
    a TLS 1.3 session ticket makes the socket readable but is no answer."""
    if not select.select([sock], [], [], 0)[0]:
        return None
    sock.settimeout(0)
    try:
        return sock.recv(64)
    except ssl.SSLWantReadError:
        return None
    finally:
        sock.settimeout(30)


def _list_runs(port: int, certs: Path) -> httpx.Response:
    """A legitimate Control request: an operator lists the runs."""
    operator = certs / "operators" / "ops"
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.load_cert_chain(operator / "ops.pem", operator / "ops.key")
    return httpx.post(
        f"https://127.0.0.1:{port}/v1/control/list-runs",
        content=ListRunsRequest().SerializeToString(),
        headers={"content-type": "application/protobuf", "accept": "application/protobuf"},
        verify=context,
        timeout=30,
    )


def test_concurrent_oversized_bodies_never_reach_the_superlink(tmp_path):
    certs, port = tmp_path / "certs", free_port()
    assert medfed("certs", "init", "--out", str(certs), "--host", "127.0.0.1").returncode == 0
    assert medfed("certs", "add-operator", "ops", "--out", str(certs)).returncode == 0
    coordinator = spawn(
        [sys.executable, "-m", "medfed.server.cli", "coordinator", "start",
         "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port),
         "--state", str(tmp_path / "state")],
        tmp_path / "coordinator.log", flower_env(tmp_path / "flwr"),
    )  # fmt: skip
    try:
        wait(lambda: answers(f"https://127.0.0.1:{port}/health", certs / "ca.pem"), 60, "proxy")
        superlink = _superlink(coordinator.pid)
        assert _list_runs(port, certs).status_code == 200  # warm: every route has run once
        baseline = _settled(superlink)

        outcomes: list[str] = []
        peak = [baseline]
        threads = [
            threading.Thread(
                target=lambda chunked=i % 2 == 1: outcomes.append(
                    _stream(port, certs / "ca.pem", chunked)
                )
            )
            for i in range(STREAMS)
        ]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak[0] = max(peak[0], _resident(tree(superlink)))
            threads[0].join(0.05)
        for thread in threads:
            thread.join()

        grown = max(peak[0], _resident(tree(superlink))) - baseline
        assert grown < BOUND, f"the SuperLink grew by {grown // MIB} MiB: {outcomes}"
        assert len(outcomes) == STREAMS
        refused = [o for o in outcomes if o.startswith(("413 ", "closed "))]
        assert refused == outcomes, outcomes
        assert all(int(o.split()[-2]) * MIB < EACH for o in outcomes), outcomes
        listed = _list_runs(port, certs)
        assert listed.status_code == 200, listed.text
        ListRunsResponse().ParseFromString(listed.content)  # the SuperLink's own answer
        assert _superlink(coordinator.pid) == superlink, "the same SuperLink, still serving"
    finally:
        stop_all([coordinator])
