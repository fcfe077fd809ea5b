"""The hospital's `flwr-clientapp`: Flower's ClientApp process, approving the app first.

A SuperNode in subprocess isolation starts `flwr-clientapp` (found on its
PATH) for every message; `medfed node start` puts this runner first on that
PATH. It is Flower's own process with one step added: the app package the
process pulled is checked against the node's approved hashes
(`client/approval.py`) before Flower installs it, and a refused package
becomes Flower's error reply to the coordinator. Nothing of a refused package
is written to the app folder or imported.

It fails closed: if this Flower version does not install a package where the
check sits, or a ClientApp is about to load from a package that was not
checked, nothing runs.

Where the node runs a warm worker (client/warm_worker.py), this process is
only a relay: the worker forks the ClientApp process, which runs the same
`run_approved`. The relay imports nothing heavy (not even the approval
module); if the worker cannot be reached, the process runs cold, as before.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

# Where the relay finds the warm worker (set by `medfed node start` in the node's
# environment), and the worker's reply: the child's wait status, once it has ended.
SOCKET_ENV = "MEDFED_WORKER_SOCKET"
STATUS = struct.Struct("!i")

CHECKED: set[str] = set()  # hashes of the packages approved in this process


def _checked_install(install: Callable[..., Any]) -> Callable[..., Any]:
    from medfed.client.approval import check

    def install_approved(content: bytes, *args: Any, **kwargs: Any) -> Any:
        CHECKED.add(check(content))  # raises AppNotApproved before a byte is written
        return install(content, *args, **kwargs)

    return install_approved


def _checked_loader(make_loader: Callable[..., Any]) -> Callable[..., Any]:
    def make_checked_loader(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        load = make_loader(*args, **kwargs)

        def load_checked(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            from medfed.client.approval import AppNotApproved

            if fab_hash not in CHECKED:
                raise AppNotApproved(f"app package sha256 {fab_hash} was not checked: refused")
            return load(fab_id, fab_version, fab_hash)

        return load_checked

    return make_checked_loader


# The names Flower's ClientApp process calls to install a package and load its app: the
# checks replace them where that process looks them up (its module's globals).
HOOKED = ("install_from_fab", "get_load_client_app_fn")


def hook_approval() -> None:
    """Put the approval check into Flower's ClientApp process, or exit refusing.

    Flower's `run_clientapp` calls `install_from_fab` and `get_load_client_app_fn` by
    their names in its own module: those are replaced. If this Flower's process no
    longer calls them there, nothing could be checked, so nothing runs.
    """
    from flwr.supernode.runtime import run_clientapp as flower_process

    called = flower_process.run_clientapp.__code__.co_names
    for name in HOOKED:
        if not hasattr(flower_process, name) or name not in called:
            sys.exit(
                f"medfed: this Flower does not call {name}: cannot check app packages, refusing"
            )
    flower_process.install_from_fab = _checked_install(flower_process.install_from_fab)
    flower_process.get_load_client_app_fn = _checked_loader(flower_process.get_load_client_app_fn)


# The function of Flower's ClientApp process that pulls the message's objects.
PULLERS = {"pull_task_input": "5607a23e1673ee876930c1b35685b8dfdfd8b3776a436560b0467042e15fc695"}


def shorten_message_pull() -> None:
    """A ClientApp forked warm asks for its message while the SuperNode is still
    downloading it: retry after 0.1 s, not Flower's 1 s (shared_models/flower_pin.py)."""
    from flwr.supernode.runtime import run_clientapp as flower_process

    from medfed.shared_models.flower_pin import UnverifiedFlower, shorten_object_pulls

    try:
        shorten_object_pulls(flower_process, "pull_and_inflate_object_from_tree", PULLERS)
    except UnverifiedFlower as error:
        sys.exit(f"medfed: {error}")


def run_approved() -> None:
    """Run Flower's `flwr-clientapp` (arguments in sys.argv) with the approval check in place."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    hook_approval()
    shorten_message_pull()
    flwr_clientapp()


def relay(path: str) -> int | None:
    """Have the warm worker at `path` run this process's ClientApp; its exit code, or None
    when no worker answers (nothing was started then)."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = {"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}
    try:
        connection.connect(path)
        socket.send_fds(connection, [json.dumps(request).encode()], [0, 1, 2])
    except OSError:
        connection.close()
        return None
    with connection:
        status = connection.recv(STATUS.size)  # blocks while the ClientApp runs
    if len(status) != STATUS.size:  # the worker died meanwhile; its child goes on alone
        print("medfed: the warm worker ended during this task", file=sys.stderr)
        return 1
    return os.waitstatus_to_exitcode(STATUS.unpack(status)[0])


def main() -> None:
    """The SuperNode's `flwr-clientapp`: relayed to the warm worker, or run here."""
    path = os.environ.get(SOCKET_ENV)
    if path:
        code = relay(path)
        if code is not None:
            sys.exit(code)
        print("medfed: no warm worker answers; running this ClientApp cold", file=sys.stderr)
    run_approved()


if __name__ == "__main__":
    main()
