"""FedBN at the hospital: the normalisation layers that never leave the site.

Under `strategy = "fedbn"` the coordinator sends and averages everything but
the normalisation layers (`shared_models.weights`, `local_norms`). Each
hospital keeps its own statistics and affine terms, which describe its
scanners, in two places: the node's `context.state`, which Flower hands to
every fresh ClientApp process of the run, and a file under the node's cache
folder, so a restarted node carries on with its own layers instead of
starting again from the network's initial values.
"""

from __future__ import annotations

import pickle
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.supercore import log
from torch import nn

from medfed.shared_models.atomic_files import atomic_write
from medfed.shared_models.config import RunConfig
from medfed.shared_models.run_folder import local_layers_caveat
from medfed.shared_models.weights import norm_keys

STATE_KEY = "medfed.fedbn-local-layers"


def layers_file(cache: Path, run_id: int) -> Path:
    """Where this node keeps its local layers of one run."""
    return cache / "fedbn" / f"run-{run_id}.pt"


def restore(net: nn.Module, context: Context, cache: Path) -> bool:
    """Put this site's own normalisation layers into `net`; False on its first round."""
    state = _kept(context, cache)
    if state is None:
        return False
    expected = {k: v.shape for k, v in net.state_dict().items() if k in set(norm_keys(net))}
    found = {k: v.shape for k, v in state.items()}
    if found != expected:  # another network under the same run id: start afresh, say so
        log(WARNING, "[medfed] kept normalisation layers do not fit the network; not used")
        return False
    net.load_state_dict(state, strict=False)
    return True


def keep(net: nn.Module, context: Context, cache: Path) -> None:
    """Remember `net`'s normalisation layers for this site's next round."""
    keys = set(norm_keys(net))
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k in keys}
    context.state[STATE_KEY] = ArrayRecord(state)
    path = layers_file(cache, context.run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_site_layers(net: nn.Module, path: Path) -> None:
    """Make a FedBN run's global network one hospital's model: put in the normalisation
    layers that hospital kept (its `layers_file`), for `medfed predict --site-layers`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, not a torch file, pickled code: name the file
        raise ValueError(f"{path}: not a file of kept normalisation layers ({err})") from None
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items() if k in set(norm_keys(net))}
    found = (
        {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        if isinstance(state, dict)
        else {}
    )
    if found != expected:
        missing = sorted(expected.keys() - found.keys())
        raise ValueError(
            f"{path}: its normalisation layers do not fit this run's network ({len(found)} "
            f"tensors, {len(expected)} expected{f'; e.g. no {missing[0]}' if missing else ''})"
        )
    net.load_state_dict(state, strict=False)


def site_model(cfg: RunConfig, net: nn.Module, site_layers: Path | None) -> str | None:
    """With `site_layers`, a FedBN run's network becomes that hospital's model; without,
    the caveat a FedBN global model carries (None for other strategies)."""
    if site_layers is None:
        return local_layers_caveat(cfg)
    if not cfg.keeps_norms_local:
        raise ValueError(
            f"--site-layers: run strategy {cfg.strategy} keeps no normalisation layers at "
            "the hospitals (only strategy = fedbn does)"
        )
    load_site_layers(net, site_layers.expanduser())
    return None


def _kept(context: Context, cache: Path) -> dict[str, torch.Tensor] | None:
    """The layers in the node's state, else on its disk, else None."""
    if STATE_KEY in context.state.array_records:
        return context.state.array_records[STATE_KEY].to_torch_state_dict()
    path = layers_file(cache, context.run_id)
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        log(WARNING, "[medfed] kept normalisation layers unreadable (%s); not used", err)
        return None
