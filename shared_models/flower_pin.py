"""Changes medfed makes to Flower's code inside its own processes, pinned to the
Flower version they were verified on.

Flower 1.42 has fixed waits on the deployed message path that no flag or
variable sets (docs/benchmarks.md, "Deployed round latency"). medfed shortens
some of them inside its own processes only: the SuperNode and SuperExec
(client/supernode_runner.py), the ClientApp process (client/app_runner.py) and
the deployed ServerApp (server/run/federated_run.py). Each change replaces a name
in one of Flower's modules, so it is pinned: on any other Flower version, or
when a function that uses the replaced name changed, the process refuses to
start rather than run Flower code medfed has not read.

Object pulls: a message travels as objects, and Flower's `pull_objects`
retries an object that is not there yet after 1 s, doubling to 10 s
(`flwr/supercore/constant.py`). A reader is often there before the writer
finished: the warm ClientApp pulls while its SuperNode still downloads the
message, the coordinator pulls a reply while the SuperNode still uploads it.
Each such message waited about 1 s for objects that arrived milliseconds
later. Here the first retry comes after PULL_FIRST_RETRY seconds, doubling to
PULL_RETRY_CAP; the number of tries and the overall limit stay Flower's.
FLOWER_PULLS_ENV=1 in a process's environment keeps Flower's retries (a node
started with `--flower-waits` sets it; tests/bench/deployed_round.py compares).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from collections.abc import Mapping
from typing import Any

VERIFIED_FLOWER = "1.42.0"
PULL_FIRST_RETRY = 0.1
PULL_RETRY_CAP = 1.0
FLOWER_PULLS_ENV = "MEDFED_FLOWER_PULLS"


class UnverifiedFlower(RuntimeError):
    """This Flower is not the one whose code medfed verified."""


def source_digest(function: Any) -> str:
    """SHA-256 of a function's source text."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def check_flower(owner: Any, version: str, sources: Mapping[str, str]) -> None:
    """Refuse any Flower but the verified one, and any change to the functions of module
    `owner` (names, dotted for a method) whose waits medfed changes or that call a name
    it replaces."""
    if version != VERIFIED_FLOWER:
        raise UnverifiedFlower(
            f"flwr {version} is installed; medfed verified its changes to Flower's waits on "
            f"flwr {VERIFIED_FLOWER} only: install flwr=={VERIFIED_FLOWER}"
        )
    for name, expected in sources.items():
        found = source_digest(functools.reduce(getattr, name.split("."), owner))
        if found != expected:
            raise UnverifiedFlower(
                f"flwr's {owner.__name__}.{name} is not the verified source "
                f"(sha256 {found[:12]}…, expected {expected[:12]}…): refusing to start"
            )


def shorten_object_pulls(module: Any, name: str, callers: Mapping[str, str]) -> None:
    """Replace `module.name` (Flower's `pull_objects` or a function that passes its
    back-off on to it) with one whose retries start after PULL_FIRST_RETRY seconds;
    `callers` are the digests of the functions in `module` that call it."""
    from flwr import __version__

    pull = getattr(module, name)
    if isinstance(pull, functools.partial) or os.environ.get(FLOWER_PULLS_ENV) == "1":
        return  # already shortened in this process, or Flower's retries asked for
    check_flower(module, __version__, callers)
    setattr(
        module,
        name,
        functools.partial(pull, initial_backoff=PULL_FIRST_RETRY, backoff_cap=PULL_RETRY_CAP),
    )
