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
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from medfed.client.approval import AppNotApproved, check

CHECKED: set[str] = set()  # hashes of the packages approved in this process


def _checked_install(install: Callable[..., Any]) -> Callable[..., Any]:
    def install_approved(content: bytes, *args: Any, **kwargs: Any) -> Any:
        CHECKED.add(check(content))  # raises AppNotApproved before a byte is written
        return install(content, *args, **kwargs)

    return install_approved


def _checked_loader(make_loader: Callable[..., Any]) -> Callable[..., Any]:
    def make_checked_loader(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        load = make_loader(*args, **kwargs)

        def load_checked(fab_id: str, fab_version: str, fab_hash: str) -> Any:
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


def main() -> None:
    """Run Flower's `flwr-clientapp` with the approval check in place."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    hook_approval()
    flwr_clientapp()


if __name__ == "__main__":
    main()
