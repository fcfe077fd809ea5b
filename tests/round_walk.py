"""Which of medfed's modules one federated round runs, counted by tracing a real run.

docs/architecture.md walks a plain and a secure round module by module; the
walks are counted here, not estimated. A federation of three synthetic
hospitals runs in this process: the coordinator's real ServerApp
(`federated_run.run`) against the hospitals' real ClientApp (`client.app.app`),
every message and reply copied through Flower's wire format as a SuperLink
would carry them. A profile hook notes each medfed module whose code runs
during round 2 of 3 (the steady state: it trains, validates round 1's model
and is recorded; the last round adds the final evaluation and the model's
export), the coordinator's side and the hospitals' apart.

A module is core unless it only names things or holds settings, writes the
records every process writes (audit lines, Prometheus metrics, files written
whole), or is the hospital's data layer behind its loader: the rule
docs/architecture.md counts by. `python -m tests.round_walk [--secure]` prints
the walk as that page shows it (tests/test_round_walk.py checks the page).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto

import medfed
from medfed.client.app import app as client_app
from medfed.client.synthetic import generate_federation
from medfed.server.run import federated_run, round_loop
from medfed.shared_models.protocol import NodeConfig
from tests.in_process_grid import RUN_ID, act_as_coordinator

PACKAGE = Path(medfed.__path__[0]).resolve()
TRACED_ROUND = 2
SETTINGS = {
    "num-server-rounds": 3, "local-epochs": 1, "image-size": 32, "model-width": 4,
    "model-depth": 2, "batch-size": 8, "min-nodes": 3, "federated-stats": False,
    "cross-site": "off", "stats-min-count": 1,
}  # fmt: skip


# What a module is when it is not core, by path (a folder ends in "/").
NOT_CORE = {
    "shared_models/config.py": "settings", "shared_models/protocol.py": "names",
    "shared_models/task_descriptions.py": "names", "client/settings.py": "settings",
    "shared_models/audit.py": "writer", "shared_models/atomic_files.py": "writer",
    "server/run/coordinator_metrics.py": "writer", "client/node_metrics.py": "writer",
    "client/data/": "data layer",
}  # fmt: skip


def kind(module: str) -> str:
    """'core', or what the module is instead (NOT_CORE)."""
    for path, what in NOT_CORE.items():
        if module == path or (path.endswith("/") and module.startswith(path)):
            return what
    return "core"


def core(modules: Iterable[str]) -> list[str]:
    return sorted(m for m in modules if kind(m) == "core")


def described(walked: dict[str, list[str]]) -> str:
    """The walk as docs/architecture.md lists it: each side's modules with their kind, and
    the counts of the round as a whole (a module both sides run counts once)."""
    lines = []
    for side, modules in walked.items():
        lines.append(f"{side}: {len(modules)} modules run, {len(core(modules))} core")
        lines += [f"  {module:<44} {kind(module)}" for module in modules]
    every = sorted({m for modules in walked.values() for m in modules})
    lines.append(f"the round: {len(every)} modules run, {len(core(every))} core")
    return "\n".join(lines)


def _wire(message: Message) -> Message:
    """`message` as the other side receives it: serialised and read back (Flower's proto)."""
    return message_from_proto(message_to_proto(message))


class Walk:
    """The medfed modules seen running, by side, while `tracing`."""

    def __init__(self) -> None:
        self.side = "coordinator"
        self.tracing = False
        self.seen: dict[str, set[str]] = {"coordinator": set(), "hospital": set()}

    def profile(self, frame: FrameType, event: str, _arg: Any) -> None:
        if event != "call" or not self.tracing:
            return
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(PACKAGE):
            self.seen[self.side].add(path.relative_to(PACKAGE).as_posix())


class LocalGrid:
    """Flower's Grid for a federation in this process: each message handled at once by the
    hospital's ClientApp, its reply waiting to be pulled."""

    def __init__(self, contexts: dict[int, Context], walk: Walk) -> None:
        self.contexts, self.walk = contexts, walk
        self.outbox: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(message.metadata.message_id)
            context = self.contexts[message.metadata.dst_node_id]
            self.walk.side = "hospital"
            try:
                reply = client_app(_wire(message), context)
            finally:
                self.walk.side = "coordinator"
            self.outbox.append(_wire(reply))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        ready = [m for m in self.outbox if m.metadata.reply_to_message_id in wanted]
        self.outbox = [m for m in self.outbox if m not in ready]
        return ready


def federation(work: Path, **settings: Any) -> tuple[LocalGrid, Context, Walk]:
    """Three synthetic hospitals under `work` behind a LocalGrid, and the coordinator's
    context, for a run with SETTINGS and `settings` (run-config keys, `_` for `-`)."""
    sites = generate_federation("segmentation", 3, work / "data", seed=0, images_per_site=12)
    values = {**SETTINGS, "out-dir": str(work / "run")}
    values.update({key.replace("_", "-"): value for key, value in settings.items()})
    contexts = {
        node: Context(RUN_ID, node, {NodeConfig.DATA_PATH: str(site),
                                     NodeConfig.CACHE_DIR: str(work / f"cache-{node}"),
                                     NodeConfig.MIN_COUNT: 1}, RecordDict(), dict(values))
        for node, site in zip((11, 12, 13), sites, strict=True)
    }  # fmt: skip
    walk = Walk()
    act_as_coordinator()
    return LocalGrid(contexts, walk), Context(RUN_ID, 1, {}, RecordDict(), values), walk


def walk_round(work: Path, secure: bool = False) -> dict[str, list[str]]:
    """The medfed modules round 2 runs, by side, in a 3-hospital federation under `work`."""
    grid, context, walk = federation(work, secure_aggregation=secure)
    train_round = round_loop.RoundLoop._train_round

    def traced(loop: round_loop.RoundLoop, server_round: int, arrays: Any) -> Any:
        walk.tracing = server_round == TRACED_ROUND
        try:
            return train_round(loop, server_round, arrays)
        finally:
            walk.tracing = False

    round_loop.RoundLoop._train_round = traced  # type: ignore[method-assign]
    sys.setprofile(walk.profile)
    try:
        federated_run.run(grid, context)
    finally:
        sys.setprofile(None)
        round_loop.RoundLoop._train_round = train_round  # type: ignore[method-assign]
    return {side: sorted(modules) for side, modules in walk.seen.items()}


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secure", action="store_true", help="a SecAgg+ round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        walked = walk_round(Path(work), args.secure)
    print(described(walked))


if __name__ == "__main__":
    main()
