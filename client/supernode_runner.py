"""medfed's SuperNode and SuperExec processes: Flower's own, with their fixed waits
shortened while a run is active.

Flower 1.42's SuperNode sleeps 3 s whenever it asks for a message and finds
none, and checks for a reply every 0.5 s (literals in
`flwr/supernode/start_client_internal.py`; no flag or variable sets them).
Right after a reply the coordinator is still waiting on the other
hospitals, so the next message of the round was picked up 0-3 s late, at
every hospital, every message (docs/benchmarks.md, "Deployed round
latency"). Its SuperExec looks for a ClientApp task to start every
`FLWR_SUPEREXEC_TASK_POLL_INTERVAL` seconds, one fixed value: short costs an
idle node CPU (3 % of a core at 0.1 s), long costs every message.

Here each process's module-level `time` is replaced by `ActiveWaits`, whose
`sleep` shortens the chosen waits for ACTIVE_SECONDS after the node last
handled a message (the SuperNode: 0.25 s instead of 3 s, 0.05 s instead of
0.5 s; the SuperExec: ACTIVE_TASK_POLL_SECONDS instead of its interval), and
keeps them otherwise: an idle node polls as Flower does. The SuperNode's pulls
of a message's objects retry after 0.1 s, not 1 s (shared_models/flower_pin.py).

Written by hand because Flower offers no setting for it (its issue #3670
asks for a resident ClientApp). It changes Flower's code inside medfed's own
processes only, so it is pinned: on any other Flower version, or if a
function that holds these waits changed, the process refuses to start.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from medfed.shared_models.flower_pin import UnverifiedFlower, check_flower, shorten_object_pulls

# SHA-256 of the source of each function whose waits are replaced, as verified.
SUPERNODE_SOURCES = {
    "start_client_internal": "9e89a6eb68fbec6821e817cd2c09f7894fc7b0f5725c2365b19a7122307f11f3",
    "_push_messages": "00bb86faffdec114db87e7f716af2acd901d12284e44f51f5c2a84704db05f64",
}
# The function that pulls a message's objects from the SuperLink (`pull_objects`).
SUPERNODE_PULLERS = {
    "_pull_and_store_message": "eaf5d0e36dc34e4cf46a490511d077ac55cc8edbbcdbe938c1f6dbcb758628be",
}
SUPEREXEC_SOURCES = {
    "run_superexec": "91e7a33c5b898f33249c29d2058c57637ca7668a14c27296d2506dc98ac84f9b",
}
IDLE_POLL_SECONDS = 3  # the SuperNode's literal: an idle node keeps it
REPLY_CHECK_LITERAL = 0.5
ACTIVE_POLL_SECONDS = 0.25
REPLY_CHECK_SECONDS = 0.05
# What the SuperExec polls at while active; idle, it keeps its configured interval.
ACTIVE_TASK_POLL_SECONDS = 0.1
ACTIVE_SECONDS = 60.0


class ActiveWaits:
    """Stands in for the `time` module inside one of Flower's loops: each wait in
    `shortened` takes its shorter value while the node is active (it handled a message
    less than ACTIVE_SECONDS ago); a wait in `marks` itself means a message is in hand."""

    def __init__(
        self,
        shortened: Mapping[float, float],
        marks: frozenset[float] = frozenset(),
        clock: Any = time,
    ) -> None:
        self.shortened, self.marks, self._clock = dict(shortened), marks, clock
        self.last_active = float("-inf")

    def active(self) -> None:
        """The node handles a message now."""
        self.last_active = self._clock.monotonic()

    def sleep(self, seconds: float) -> None:
        """Flower's wait, shortened while active if it is one of the chosen ones."""
        if seconds in self.marks:
            self.active()
        recent = self._clock.monotonic() - self.last_active < ACTIVE_SECONDS
        if recent and seconds in self.shortened:
            seconds = self.shortened[seconds]
        self._clock.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clock, name)


def patch_supernode() -> ActiveWaits:
    """The SuperNode loop's waits, after checking it is the verified code."""
    from flwr import __version__
    from flwr.supernode import start_client_internal as loop

    check_flower(loop, __version__, SUPERNODE_SOURCES)
    shorten_object_pulls(loop, "pull_objects", SUPERNODE_PULLERS)
    waits = ActiveWaits(
        {IDLE_POLL_SECONDS: ACTIVE_POLL_SECONDS, REPLY_CHECK_LITERAL: REPLY_CHECK_SECONDS},
        marks=frozenset({REPLY_CHECK_LITERAL}),  # waiting for a reply: a message in hand
    )
    loop.time = waits  # type: ignore[assignment]
    return waits


def patch_superexec() -> ActiveWaits:
    """The SuperExec loop's task poll, after checking it is the verified code; a task it
    launches marks the node active."""
    from flwr import __version__
    from flwr.supercore.superexec import run_superexec as loop

    check_flower(loop, __version__, SUPEREXEC_SOURCES)
    interval = loop._get_task_poll_interval()
    waits = ActiveWaits({interval: min(interval, ACTIVE_TASK_POLL_SECONDS)})
    handle: Callable[..., Any] = loop._handle_launch_result

    def launched(*args: Any, **kwargs: Any) -> Any:
        waits.active()
        return handle(*args, **kwargs)

    loop._handle_launch_result = launched  # type: ignore[assignment]
    loop.time = waits  # type: ignore[assignment]
    return waits


def _run(patch: Callable[[], ActiveWaits], program: str, main: Callable[[], None]) -> None:
    try:
        patch()
    except UnverifiedFlower as error:
        sys.exit(f"medfed: {error}")
    sys.argv[0] = program
    main()


def supernode_main() -> None:
    """`python -m medfed.client.supernode_runner ARGS`: `flower-supernode ARGS`."""
    from flwr.supernode.cli.flower_supernode import flower_supernode

    _run(patch_supernode, "flower-supernode", flower_supernode)


def superexec_main() -> None:
    """medfed's `flower-superexec` (first on the SuperNode's PATH): Flower's, task poll
    shortened while active."""
    from flwr.supercore.cli.flower_superexec import flower_superexec

    _run(patch_superexec, "flower-superexec", flower_superexec)


if __name__ == "__main__":
    supernode_main()
