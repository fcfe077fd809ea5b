"""The layout of a run folder, and rebuilding its global model.

The coordinator writes a run folder; hospitals and researchers read it (the
prediction previews, GAN augmentation and sampling, transfer learning), so
both sides take its file names from here.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.shared_models.config import RunConfig

if TYPE_CHECKING:
    from torch import nn

# Set by `medfed coordinator start`: each run writes to <runs dir>/<run id>.
RUNS_DIR_ENV = "MEDFED_RUNS_DIR"

METRICS_JSON = "metrics.json"
REPORT_MD = "report.md"
GLOBAL_MODEL = "global_model.pt"
MODEL_JSON = "model.json"
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
PREDICTIONS_PNG = "predictions.png"
CROSS_SITE_PNG = "cross-site.png"  # the cross-site evaluation heat map
PROGRESS_LOG = "progress.log"
# A task = bundle run's own copy of the files its bundle hash covers (configs/, scripts/),
# written by the coordinator when the run starts: what a hospital may approve and rebuild
# the model from, inside the run folder (the bundle path in model.json is never followed).
RUN_BUNDLE = "bundle"
# metrics.json keys of a run's continuity: how many noisy (DP) aggregates left the
# coordinator since the last checkpoint (whose privacy ledger lacks them), and the folder
# where the run was carried on (server.run.resume).
UNCHECKPOINTED_RELEASES = "releases-since-checkpoint"
CONTINUED_IN = "continued-in"


# Held (flock) by the process writing a run for as long as it lives: the kernel releases
# it when that process dies, in whatever container or pid namespace it ran.
WRITER_LOCK = ".writer.lock"


class RunFolderError(ValueError):
    """A folder is not a finished medfed run; the message names the folder."""


def checkpoint_name(server_round: int) -> str:
    """The file under checkpoints/ holding the state after `server_round`."""
    return f"round-{server_round:03d}.pt"


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json of a run folder (None when there is none yet); RunFolderError when
    it is not a run record (unreadable, or not a JSON object)."""
    path = run_dir / METRICS_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path}: not a readable run record ({err})") from err
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: not a run record (expected a JSON object)")
    return data


def read_model_config(run_dir: Path) -> RunConfig:
    """The run config of a finished run (model.json), validated; RunFolderError naming the
    file when it is missing, not JSON, or holds no valid config."""
    meta = run_dir / MODEL_JSON
    if not meta.is_file():
        raise RunFolderError(f"{run_dir}: not a finished medfed run (no {MODEL_JSON})")
    try:
        data = json.loads(meta.read_text())
        config = data.get("config") if isinstance(data, dict) else None
        if not isinstance(config, dict):
            raise ValueError("no 'config' object (the run's settings)")
        return RunConfig.from_mapping(config)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # ConfigError is a ValueError
        raise RunFolderError(f"{meta}: not a medfed model description ({err})") from None


def recorded_bundle_sha256(run_dir: Path) -> str:
    """The hash of the bundle a task = bundle run federated, as model.json records it
    (key `bundle`); RunFolderError naming the file when it records none."""
    meta = run_dir / MODEL_JSON
    try:
        data = json.loads(meta.read_text())
        digest = data["bundle"]["sha256"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        digest = None
    if not isinstance(digest, str) or not _is_sha256(digest):
        raise RunFolderError(
            f"{meta}: a task = bundle run that records no bundle sha256 (key 'bundle'), so "
            "no bundle can be checked against it"
        )
    return digest


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def local_layers_caveat(cfg: RunConfig) -> str | None:
    """What a user of a FedBN run's global model must know (None for other strategies)."""
    if not cfg.keeps_norms_local:
        return None
    return (
        f"strategy {cfg.strategy}: the normalisation layers of {GLOBAL_MODEL} hold their "
        "initial values (each hospital kept its own and never sent them), so its outputs "
        "are not those of any hospital's model"
    )


def load_global_model(run_dir: Path, bundle: Path | None = None) -> tuple[RunConfig, nn.Module]:
    """Rebuild the network described by model.json and load global_model.pt (eval mode).

    weights_only: the file may come from elsewhere, and must hold tensors, never code.
    Whatever is wrong with it is one RunFolderError naming the file. A task = bundle
    run's network is built by its bundle's configs, which are code: only from `bundle`,
    a folder the caller checked (client/run_bundle.py), never from the path model.json
    names; without one such a run is refused before anything of a bundle is read.
    """
    cfg = read_model_config(run_dir)
    net = _network(cfg, bundle, run_dir / MODEL_JSON)
    path = run_dir / GLOBAL_MODEL
    state = _read_state_dict(path)
    expected = net.state_dict()
    misfits = sorted(
        [f"missing {k}" for k in expected.keys() - state.keys()]
        + [f"unexpected {k}" for k in state.keys() - expected.keys()]
        + [f"{k} has shape {tuple(state[k].shape)}" for k in expected.keys() & state.keys()
           if state[k].shape != expected[k].shape]
    )  # fmt: skip
    if misfits:
        raise RunFolderError(
            f"{path}: not the weights of the network {MODEL_JSON} describes "
            f"({len(misfits)} misfits, e.g. {misfits[0]})"
        )
    net.load_state_dict(state)
    return cfg, net.eval()


def _network(cfg: RunConfig, bundle: Path | None, meta: Path) -> nn.Module:
    """A fresh network for `cfg`: medfed's own from validated settings, or a bundle run's
    from the checked `bundle` folder."""
    from medfed.shared_models.tasks import TASKS

    if cfg.task != "bundle":
        return TASKS[cfg.task].build_network(cfg)
    if bundle is None:
        raise RunFolderError(
            f"{meta}: a task = bundle run, whose network its bundle's configs (code) build; "
            f"the bundle path it names ({cfg.bundle}) is never followed: pass a bundle "
            "folder checked at this site"
        )
    checked = RunConfig.from_mapping({**cfg.to_mapping(), "bundle": str(bundle)})
    return TASKS[cfg.task].build_network(checked)


def _read_state_dict(path: Path) -> dict[str, Any]:
    """A state dict of tensors, read with weights_only (a pickled object is refused unrun)."""
    import pickle

    import torch  # late: the command line reads run folders without loading torch

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except OSError as err:
        raise RunFolderError(f"{path}: cannot be read ({err.strerror})") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as err:
        why = type(err).__name__
        raise RunFolderError(
            f"{path}: not a state dict of tensors (torch.load with weights_only refused it: {why})"
        ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise RunFolderError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def hold_writer_lock(run_dir: Path) -> int:
    """Take the run's writer lock for the life of this process (waits while a closer
    holds it for an instant); returns the descriptor, which must stay open."""
    fd = os.open(run_dir / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextmanager
def writer_gone(run_dir: Path) -> Iterator[bool | None]:
    """Whether the process that wrote the run is gone: True (and no new writer can start
    until the block ends), False while it lives, None when the folder has no lock
    (written by an older medfed)."""
    try:
        fd = os.open(run_dir / WRITER_LOCK, os.O_RDWR)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock
