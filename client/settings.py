"""The settings a message runs under: the node's own and the run's, each parsed once.

The node's: a SuperNode's `--node-config`, read and checked, with errors naming the key.

Flower hands the ClientApp the node config as given on the SuperNode's
command line: any TOML value under any key. A string where a count belongs,
or a device torch does not know, used to surface as a bare ValueError or a
torch RuntimeError in the middle of a round. `medfed node start` checks its
options with the same rules before it starts a SuperNode.

A value here may be a path, so these errors stay at the site: the
coordinator sees only a generic code (client/safe_errors.py, `error_report`).

The run's: the run config Flower hands every message, checked by the shared
schema (shared_models/config.py). The mods and the handler of one message
each need both; `run_config` and `node_settings` parse them once and hand
every later caller the same frozen values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.shared_models.config import ConfigError, RunConfig
from medfed.shared_models.protocol import SECAGG_MAX_PARTICIPANTS, SITE_NAME, NodeConfig

if TYPE_CHECKING:
    from flwr.app import Context

# The floor of a node started without one.
DEFAULT_FLOOR = 10
# A simulated node's own floor: the researcher holds every site's data, so the run's
# `stats-min-count` (default 10 as well) is the one that holds.
SIMULATED_FLOOR = 1
MAX_FLOOR = 1_000_000
MAX_LOADER_WORKERS = 64
MAX_PATH_CHARACTERS = 4096
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,2})?")
DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII: str.isdigit() also takes '²', which int() refuses


class NodeConfigError(ConfigError):
    """A node-config value medfed cannot use; the message names the key and the value."""


@dataclass(frozen=True)
class NodeSettings:
    """What medfed reads from a node's config (None: not given)."""

    data_path: Path | None = None
    site_name: str | None = None
    device: str | None = None
    cache_dir: Path | None = None
    loader_workers: int | None = None
    min_count: int = DEFAULT_FLOOR  # the site's floor: no smaller count of images leaves it
    require_secure_aggregation: bool = False  # the hospital's policy, not the run's
    partition: tuple[int, int] | None = None  # simulation: (partition id, partitions)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NodeSettings:
        """Read the known keys (others are Flower's or the operator's, and left alone)."""
        name = _text(values, NodeConfig.SITE_NAME)
        if name is not None and not SITE_NAME.fullmatch(name):
            _bad(NodeConfig.SITE_NAME, name, "a short label: letters, digits, '.-_', at most 64")
        device = _text(values, NodeConfig.DEVICE)
        if device is not None and not DEVICE.fullmatch(device):
            _bad(NodeConfig.DEVICE, device, "auto, cpu, cuda or cuda:N")
        min_count = _integer(values, NodeConfig.MIN_COUNT, 1, MAX_FLOOR)
        partition = _partition(values)
        if min_count is None:
            min_count = DEFAULT_FLOOR if partition is None else SIMULATED_FLOOR
        return cls(
            data_path=_path(values, NodeConfig.DATA_PATH),
            site_name=name,
            device=device,
            cache_dir=_path(values, NodeConfig.CACHE_DIR),
            loader_workers=_integer(values, NodeConfig.LOADER_WORKERS, 0, MAX_LOADER_WORKERS),
            min_count=min_count,
            require_secure_aggregation=_flag(values, NodeConfig.REQUIRE_SECURE_AGGREGATION),
            partition=partition,
        )


def _partition(values: Mapping[str, Any]) -> tuple[int, int] | None:
    """Flower's simulation sets both keys; one without the other is not a simulation."""
    if NodeConfig.PARTITION_ID not in values and NodeConfig.NUM_PARTITIONS not in values:
        return None
    count = _integer(values, NodeConfig.NUM_PARTITIONS, 1, SECAGG_MAX_PARTICIPANTS)
    if count is None:
        _bad(NodeConfig.NUM_PARTITIONS, None, f"set with '{NodeConfig.PARTITION_ID}'")
    index = _integer(values, NodeConfig.PARTITION_ID, 0, count - 1)
    if index is None:
        _bad(NodeConfig.PARTITION_ID, None, f"set with '{NodeConfig.NUM_PARTITIONS}'")
    return index, count


def _text(values: Mapping[str, Any], key: str) -> str | None:
    value = values.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        _bad(key, value, "a non-empty string")
    if len(value) > MAX_PATH_CHARACTERS:
        _bad(key, f"{value[:40]}...", f"at most {MAX_PATH_CHARACTERS} characters")
    return value.strip()


def _path(values: Mapping[str, Any], key: str) -> Path | None:
    text = _text(values, key)
    return Path(text).expanduser() if text is not None else None


def _integer(values: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = values.get(key)
    if value is None:
        return None
    number = value
    if isinstance(value, str) and DIGITS.fullmatch(value.strip()):
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        _bad(key, value, f"an integer in {low}..{high}")
    return number


def _flag(values: Mapping[str, Any], key: str) -> bool:
    """A true/false setting (TOML's booleans, or the text true/false); absent: false."""
    value = values.get(key, False)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        _bad(key, value, "true or false")
    return value


def _bad(key: str, value: Any, expected: str) -> None:
    raise NodeConfigError(f"node config key '{key}' = {value!r}: expected {expected}")


# Parsed settings by their values: a ClientApp process serves one message (forked per
# message from the warm worker; a simulation's actor serves one run), so these hold one or
# two entries; bounded all the same.
_PARSED: dict[tuple, Any] = {}
_MOST_PARSED = 16


def _key(kind: str, values: Mapping[str, Any], *extra: object) -> tuple:
    """A cache key telling apart values Python holds equal (1, 1.0 and True) by their type."""
    items = tuple(sorted((key, type(value).__name__, value) for key, value in values.items()))
    return (kind, items, *extra)


def _once(key: tuple, parse: Callable[[], Any]) -> Any:
    parsed = _PARSED.get(key)
    if parsed is None:
        parsed = parse()  # a ConfigError is raised again by the next caller: never cached
        if len(_PARSED) >= _MOST_PARSED:
            _PARSED.clear()
        _PARSED[key] = parsed
    return parsed


def run_config(context: Context, validate: bool = True) -> RunConfig:
    """The run's config this message runs under (ConfigError naming a bad key or value).

    `validate=False` skips the checks against the task (what the SecAgg+ steps read);
    a config already validated for this message is handed out as it is.
    """
    values = dict(context.run_config)
    if not validate and _key("run", values, True) in _PARSED:
        validate = True
    return _once(_key("run", values, validate), lambda: RunConfig.from_mapping(values, validate))


def node_settings(context: Context) -> NodeSettings:
    """The node's settings this message runs under (NodeConfigError naming a bad key)."""
    values = dict(context.node_config)
    return _once(_key("node", values), lambda: NodeSettings.from_mapping(values))
